"""Stage locks across machines: inside Prefect runs, two holders of one stage key that share no file lock (two
work dirs stand in for two machines) still never hold it at once; different keys run side by side."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import flows_fakes as ff

from flows.locks import stage_lock

# Longer than starting a Prefect flow run in a thread takes, so holders of different keys overlap.
HOLD_S = 4.0


def _intervals(tmp_path: Path, keys: list[str]) -> list[tuple[float, float]]:
    from prefect import flow

    spans: list[tuple[float, float]] = []

    @flow(persist_result=False)
    def hold(machine: str, key: str) -> None:
        with stage_lock(tmp_path / machine, "pretrain", key):
            start = time.monotonic()
            time.sleep(HOLD_S)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold, args=(f"machine-{i}", k)) for i, k in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(spans) == len(keys), "a holder never got the lock"
    return sorted(spans)


def test_one_stage_key_is_held_once_across_machines_other_keys_run_alongside(tmp_path: Path) -> None:
    ff.prefect_harness()
    (a0, a1), (b0, b1) = _intervals(tmp_path, ["k" * 64, "k" * 64])
    assert b0 >= a1 - 0.05, "the same key was held on two machines at once"
    (c0, c1), (d0, d1) = _intervals(tmp_path / "other", ["a" * 64, "b" * 64])
    assert d0 < c1, "different keys waited for each other"
