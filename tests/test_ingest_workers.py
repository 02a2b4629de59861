"""Ingestion fan-out (`ingest.workers`, `ingest.dask_address`; stages/runtime/fanout.py, flows/fanout_prefect.py): the
corpus built on several Dask worker processes, directly or as Prefect task runs, is byte-identical to the one
built in one process. Run: .venv/bin/pytest tests/test_ingest_workers.py"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import ingest
from stages.common import StageError
from stages.runtime import fanout
from stages.world import corpus


def make_corpus(folder: Path) -> list[str]:
    """Several .txt / .jsonl / .parquet files with duplicates within and across files, bad records (invalid UTF-8,
    malformed JSON, a missing field, a null, a corrupt Parquet file) and documents the length filters drop."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = list(corpus.pretraining_documents(7, 900))
    (folder / "a.txt").write_text("\n\n".join(docs[:200] + docs[10:20]) + "\n\nx\n\n" + "long " * 400)
    (folder / "b.txt").write_bytes("\n\n".join(docs[200:300] + docs[:5]).encode() + b"\n\nbad \xff\xfe utf8\n")
    lines = [json.dumps({"text": d}) for d in docs[300:500] + docs[150:160]]
    lines[7:7] = ["{not json", json.dumps({"body": "no text field"}), json.dumps({"text": 3})]
    (folder / "c.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": docs[500:700] + [None] + docs[290:310] + ["caf\u0065\u0301\r\n ok\x07"]}),
                   folder / "d.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": docs[700:900]}), folder / "e.parquet")
    (folder / "f.parquet").write_bytes(b"PAR1 not really parquet")
    return [str(folder / "*.txt"), str(folder / "c.jsonl"), str(folder / "*.parquet")]


def config(paths: list[str], **kw: object) -> ingest.Config:
    return ingest.Config(sources=[ingest.FilesSource(paths=paths, txt_unit="paragraph")], max_chars=1500,
                         min_chars=2, val_fraction=0.2, shard_max_bytes=40_000, row_group_bytes=10_000,
                         max_bad_fraction=0.05, **kw)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_corpus(a: ingest.StageResult, b: ingest.StageResult) -> None:
    ta, tb = tree(a.outputs["corpus"]), tree(b.outputs["corpus"])
    assert sorted(ta) == sorted(tb)
    assert [n for n in ta if ta[n] != tb[n]] == []
    assert a.metrics == b.metrics and a.samples == b.samples


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], ingest.StageResult]:
    root = tmp_path_factory.mktemp("fanout")
    paths = make_corpus(root / "in")
    return paths, ingest.run(config(paths), None, root / "one")


def test_the_corpus_exercises_dedup_quarantine_and_several_shards(single):
    _, res = single
    m = res.metrics
    assert m["dropped/duplicate"] >= 40 and m["dropped/too_short"] >= 1 and m["dropped/too_long"] >= 1
    quarantine = [json.loads(q) for q in (res.outputs["corpus"] / "quarantine.jsonl").read_text().splitlines()]
    assert [(Path(q["where"].split(" ")[0]).name.split(":")[0], q["reason"]) for q in quarantine] == [
        ("b.txt", "invalid_utf8"), ("c.jsonl", "bad_json"), ("c.jsonl", "missing_field"),
        ("c.jsonl", "not_a_string"), ("d.parquet#201", "missing_field"), ("f.parquet", "bad_parquet")]
    assert m["bad_records"] == len(quarantine)
    assert m["shards"] >= 6 and m["rows/val"] > 0


def test_two_workers_give_the_same_bytes(single, tmp_path):
    paths, one = single
    environ = dict(os.environ)
    two = ingest.run(config(paths, workers=2), None, tmp_path / "two")
    assert_same_corpus(one, two)
    # Dask's nannies set OMP_NUM_THREADS=1 here to pass it to their workers; a training stage started after
    # ingest in the same process would pass it on to its own workers.
    assert dict(os.environ) == environ


def test_a_corpus_built_with_workers_is_reused_by_one_worker(single, tmp_path):
    paths, _ = single
    calls = []

    class Counting:
        def map(self, fn, items, labels=None):
            items = list(items)
            calls.append(len(items))
            return map(fn, items)

    def factory(workers, address, stage):
        import contextlib
        return contextlib.nullcontext(Counting())

    with fanout.using(factory):
        first = ingest.run(config(paths, workers=3), None, tmp_path)
    assert calls == [6]  # a unit per input file
    shard = first.outputs["corpus"] / "train-00000.parquet"
    before = shard.stat().st_mtime_ns
    again = ingest.run(config(paths), None, tmp_path)
    assert shard.stat().st_mtime_ns == before and again.metrics == first.metrics


def test_an_error_in_a_unit_fails_the_stage(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    cfg = ingest.Config(sources=[ingest.FilesSource(paths=[str(tmp_path / "a.txt"), str(tmp_path / "b.parquet")])],
                        workers=2)
    with pytest.raises(StageError, match="no column 'text'"):
        ingest.run(cfg, None, tmp_path / "out")
    assert not (tmp_path / "out" / "corpus").exists()


@pytest.mark.parametrize("address, match", [
    ("localhost", "not a Dask scheduler address"),
    ("tcp://127.0.0.1:9", "no Dask scheduler answered"),
])
def test_a_bad_dask_address_names_the_setting(tmp_path, monkeypatch, address, match):
    monkeypatch.setattr(fanout, "CONNECT_TIMEOUT_S", 2.0)
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    cfg = ingest.Config(sources=[ingest.FilesSource(paths=[str(tmp_path / "a.txt")])], dask_address=address)
    with pytest.raises(StageError, match=match) as e:
        ingest.run(cfg, None, tmp_path / "out")
    assert "ingest.dask_address" in str(e.value) and "unset" in str(e.value)


def test_an_existing_cluster_by_address(single, tmp_path):
    import distributed

    paths, one = single
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://", host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        # workers left at 1: an address alone sends the units to that cluster
        res = ingest.run(config(paths, dask_address=cluster.scheduler_address), None, tmp_path / "addr")
        assert cluster.scheduler.task_prefixes, "no unit ran on the cluster"
    assert_same_corpus(one, res)


@pytest.mark.slow
def test_units_run_as_prefect_tasks_with_the_same_bytes(single, tmp_path):
    """Through the ingest stage flow: the units are task runs on prefect-dask's runner, the corpus the same bytes."""
    import flows_fakes as ff
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.stage_flow import ingest_flow

    ff.prefect_harness()
    paths, one = single
    wd = ff.work_dir(tmp_path)
    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    state = ingest_flow(config=config(paths, workers=2), pipeline=ff.section(wd), return_state=True)
    assert state.is_completed(), state
    assert {k: os.environ.get(k) for k in threads} == threads
    (corpus_dir,) = (wd / "artifacts" / "ingest").glob("*/corpus")  # where the stage run stored it
    assert tree(corpus_dir) == tree(one.outputs["corpus"])
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    units = sorted((r.name, r.state_type.value) for r in runs if r.task_key.startswith("_run_unit"))
    assert units == [(n, "COMPLETED") for n in ("a.txt", "b.txt", "c.jsonl", "d.parquet", "e.parquet", "f.parquet")]
