"""A stage's progress in the Prefect UI: one progress artifact per stage flow run, kept up to date from the
process's live tqdm bars (pretrain steps with loss, SFT/reward/PPO trainer steps, ingest documents, tokenizer
encoding), so the stages themselves stay free of Prefect and the console bars stay as they are."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 3.0


def _active_bars() -> list[Any]:
    """Open, enabled tqdm bars of this process, outermost first (every tqdm subclass shares one registry)."""
    try:
        from tqdm.std import tqdm
    except ImportError:
        return []
    with tqdm.get_lock():
        bars = [b for b in list(tqdm._instances) if not getattr(b, "disable", True)]
    return sorted(bars, key=lambda b: abs(getattr(b, "pos", 0)))


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def describe_bar(bar: Any) -> tuple[float | None, str]:
    """(percent done or None when the total is unknown, one line: count, rate, elapsed, ETA and the bar's
    postfix such as the loss)."""
    d = bar.format_dict
    n, total, elapsed = d.get("n", 0), d.get("total"), d.get("elapsed", 0.0)
    unit = str(d.get("unit") or "it").strip()
    name = str(d.get("prefix") or "").strip().rstrip(":") or "progress"
    rate = d.get("rate") or (n / elapsed if elapsed else None)
    parts = [f"{n}/{total} {unit}" if total else f"{n} {unit}"]
    if rate:
        parts.append(f"{rate:.3g} {unit}/s")
    parts.append(f"elapsed {_duration(elapsed)}")
    pct = None
    if total:
        pct = max(0.0, min(100.0, 100.0 * n / total))
        if rate and n < total:
            parts.append(f"ETA {_duration((total - n) / rate)}")
    if d.get("postfix"):
        parts.append(str(d["postfix"]).strip(", "))
    return pct, f"{name}: " + " · ".join(parts)


class ProgressMirror:
    """Publishes the live bars to a Prefect progress artifact every `interval_s` from a daemon thread."""

    def __init__(self, stage: str, interval_s: float) -> None:
        self.stage = stage
        self.interval_s = interval_s
        self.artifact_id: Any = None
        self.progress = 0.0
        self.last = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from prefect.artifacts import create_progress_artifact

        key = re.sub(r"[^a-z0-9-]", "-", self.stage.lower()) + "-progress"
        self.artifact_id = create_progress_artifact(0.0, key=key, description=f"{self.stage}: starting")
        self._thread = threading.Thread(target=self._loop, name=f"{self.stage}-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except Exception as e:  # a view of the run: an unreachable Prefect API must not stop training
                log.debug("progress artifact not updated: %s", e)

    def publish(self, final: str | None = None) -> None:
        from prefect.artifacts import update_progress_artifact

        bars = _active_bars()
        if final is not None:
            lines = [f"{self.stage}: {final}"] + ([self.last] if self.last else [])
            self.progress = 100.0 if final == "finished" else self.progress
        elif bars:
            described = [describe_bar(b) for b in bars]
            # The outermost bar with a total sets the percentage (an epoch's steps rather than an eval loop's).
            self.progress = next((p for p, _ in described if p is not None), self.progress)
            lines = [text for _, text in described]
            self.last = lines[0]
        else:
            return
        update_progress_artifact(self.artifact_id, self.progress, description="\n\n".join(lines))

    def stop(self, final: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
        try:
            self.publish(final)
        except Exception as e:
            log.debug("progress artifact not finalised: %s", e)


@contextmanager
def prefect_progress(stage: str, interval_s: float | None = None) -> Iterator[ProgressMirror | None]:
    """Inside a Prefect flow run: mirror the stage's progress bars to its progress artifact while the block runs."""
    mirror: ProgressMirror | None = ProgressMirror(stage, interval_s or DEFAULT_INTERVAL_S)
    try:
        mirror.start()
    except Exception as e:  # no Prefect run context, or the API is down: the stage runs without the view
        log.debug("no progress artifact for %s: %s", stage, e)
        mirror = None
    started = time.monotonic()
    try:
        yield mirror
    except BaseException:
        if mirror is not None:
            mirror.stop(f"stopped after {_duration(time.monotonic() - started)}")
        raise
    if mirror is not None:
        mirror.stop("finished")
