"""`ingest.memory_budget_mb` covers the whole process tree (stages/data/ingest_quality.py `plan_memory`,
stages/runtime/fanout.py `workers_within`): each Dask worker process counts at its measured cost, growing with the
largest input unit, beside the stage's own process and the near-duplicate matching's share; `ingest.workers` is
lowered, with one log line, until the sum fits, and the corpus is the same bytes whatever runs.
Run: .venv/bin/pytest tests/test_filter_budget.py"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.web_corpus import web_stream
from stages import ingest
from stages.data import ingest_quality as iq
from stages.data.readers import split_units
from stages.runtime import fanout

ALL_ON = {"quality": {"enabled": True, "language": {"enabled": True}}, "near_dedup": {"enabled": True}}


def test_workers_within_counts_each_worker_against_the_budget():
    assert fanout.workers_within(8, 2048, 500, 400) == 3  # 500 + 3 * 400 <= 2048 < 500 + 4 * 400
    assert fanout.workers_within(2, 2048, 500, 400) == 2  # never more than asked
    assert fanout.workers_within(4, 1000, 300, 400) == 1  # not even two: the stage's process does the work
    assert fanout.workers_within(4, 200, 300, 400) == 1


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three Parquet files of generated web pages with near-copies, copies and junk (~0.2 MB of text each)."""
    root = tmp_path_factory.mktemp("budget")
    stream = web_stream(3, copy_share=0.2, dup_share=0.02, junk_share=0.05)
    paths = []
    for i in range(3):
        pq.write_table(pa.table({"text": [next(stream).text for _ in range(150)]}), root / f"web-{i}.parquet")
        paths.append(str(root / f"web-{i}.parquet"))
    return paths


def _cfg(paths: list[str], **kw: object) -> ingest.Config:
    return ingest.Config.model_validate({"sources": [{"type": "files", "paths": paths}], "val_fraction": 0.2,
                                         **ALL_ON, **kw})


def _plan(cfg: ingest.Config) -> iq.MemoryPlan:
    return iq.plan_memory(cfg, split_units(cfg.sources))


def test_the_plan_never_exceeds_the_budget_with_more_than_one_process(web):
    """Worker processes plus the stage's process plus the near-dedup share stay within every budget."""
    for budget in range(256, 4097, 64):
        for workers in (1, 2, 3, 8):
            plan = _plan(_cfg(web, memory_budget_mb=budget, workers=workers))
            assert 1 <= plan.workers <= workers
            if plan.workers > 1:
                assert plan.estimate_mb <= budget and "below the about" not in plan.note
                assert plan.near_dedup_budget_bytes == budget << 20
            if plan.workers < workers:
                assert f"ingest.workers={workers} lowered to {plan.workers}" in plan.note
    small, large = (_plan(_cfg(web, memory_budget_mb=mb, workers=8)) for mb in (1024, 2048))
    assert 1 <= small.workers < large.workers < 8  # a larger budget holds more workers


def test_larger_units_mean_fewer_workers(web, monkeypatch):
    cfg = _cfg(web, memory_budget_mb=2048, workers=4)
    assert _plan(cfg).workers == 4
    monkeypatch.setattr(iq, "unit_text_mb", lambda unit: (200.0, 100_000))  # files of 200 MB of text each
    plan = _plan(cfg)
    assert plan.workers < 4 and plan.estimate_mb <= 2048


def test_a_budget_below_one_process_shrinks_the_near_dedup_share(web):
    plan = _plan(_cfg(web, memory_budget_mb=256, workers=2))
    assert plan.workers == 1 and "below the about" in plan.note
    assert plan.near_dedup_budget_bytes < 256 << 20


def test_a_remote_cluster_is_not_capped(web):
    plan = _plan(_cfg(web, memory_budget_mb=256, workers=4, dask_address="tcp://127.0.0.1:8786"))
    assert plan.workers == 4


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_ingest_over_budget_runs_fewer_workers_with_the_same_bytes(web, tmp_path, caplog):
    """A real ingest: 3 workers asked for, the budget holds 2, then none (the stage's process alone); the mapper
    is opened for as many as fit (none at all when one process runs), and the corpus is the same bytes."""
    opened = []

    def factory(workers, address, stage):
        opened.append(workers)
        return contextlib.nullcontext(type("M", (), {"map": lambda self, fn, items, labels=None: map(fn, items)})())

    one = ingest.run(_cfg(web), None, tmp_path / "one")
    two_fit = next(mb for mb in range(600, 4096, 16) if _plan(_cfg(web, memory_budget_mb=mb, workers=3)).workers == 2)
    caplog.clear()
    with fanout.using(factory), caplog.at_level(logging.WARNING, logger="stages.ingest"):
        two = ingest.run(_cfg(web, workers=3, memory_budget_mb=two_fit), None, tmp_path / "two")
        alone = ingest.run(_cfg(web, workers=3, memory_budget_mb=600), None, tmp_path / "alone")
    assert opened == [2]
    lowered = [r.getMessage() for r in caplog.records if "lowered to" in r.getMessage()]
    assert len(lowered) == 2 and "lowered to 2" in lowered[0] and "lowered to 1" in lowered[1]
    assert one.metrics["rows"] > 300 and one.metrics["dropped/near_duplicate"] > 0
    for res in (two, alone):
        assert _tree(res.outputs["corpus"]) == _tree(one.outputs["corpus"])
        assert res.metrics == one.metrics
