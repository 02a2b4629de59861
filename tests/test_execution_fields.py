"""Execution-only config fields (`EXECUTION_FIELDS` in a stage module: how the work is spread, never what it
computes), which flows/cache_key.py leaves out of the cache key so that changing one reuses a finished run. A field
may be declared so only with a proof here: the stage run directly with two values of that field, and nothing else
changed, writes byte-identical output folders. Every declared field must have an entry in PROOFS.
Run: .venv/bin/pytest tests/test_execution_fields.py"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from bench.web_corpus import near_dup_corpus
from flows.cache_key import execution_fields
from flows.specs import STAGES
from stages import ingest
from stages import tokenizer as tok_stage
from stages.common import StageResult
from stages.data import near_dedup
from stages.runtime import fanout

CLUSTER = "<address of a running local Dask cluster>"  # stands for the `dask_cluster` fixture's address

# (stage, field) -> (the field's default, another value). The default is what the shared baseline run uses; the
# proof runs the stage once more with the other value and compares every output file byte for byte.
PROOFS: dict[tuple[str, str], tuple[Any, Any]] = {
    ("ingest", "workers"): (1, 2),
    ("ingest", "dask_address"): (None, CLUSTER),
    # 256 is the least allowed value. It cannot make the matching sort in key ranges on small data: a band is split
    # only beyond max(65536, budget / 4 / 48 bytes) records, 1.4 million documents at 256 MiB, so both values take
    # the whole-file path here; test_key_ranges_and_whole_bands_give_the_same_bytes scales the budget down to cover
    # the key-range path as well.
    ("ingest", "memory_budget_mb"): (2048, 256),
    ("tokenizer", "workers"): (1, 2),
    ("tokenizer", "dask_address"): (None, CLUSTER),
}
# Metrics that measure time, not output (the tokenizer reports them; none is written to a file).
TIMINGS = {"tokenizer/train_seconds", "encode/tokens_per_s"}


def declared() -> set[tuple[str, str]]:
    return {(spec.name, f) for spec in STAGES for f in getattr(spec.load(), "EXECUTION_FIELDS", ())}


def test_every_declared_execution_field_has_a_proof():
    pairs = declared()
    missing = sorted(f"{s}.{f}" for s, f in pairs - set(PROOFS))
    assert not missing, (f"execution-only fields without a byte-identity proof: {missing}; add each to PROOFS in "
                         "tests/test_execution_fields.py (and a way to run its stage), or undeclare it")
    stale = sorted(f"{s}.{f}" for s, f in set(PROOFS) - pairs)
    assert not stale, f"PROOFS lists fields no stage declares execution-only: {stale}"
    for spec in STAGES:  # the cache key leaves out exactly these
        assert execution_fields(spec.name) == {f for s, f in pairs if s == spec.name}, spec.name


def test_the_proofs_vary_one_field_from_its_default():
    configs = {"ingest": ingest.Config, "tokenizer": tok_stage.Config}
    for (stage, field), (default, other) in PROOFS.items():
        assert configs[stage].model_fields[field].default == default, (stage, field)
        assert other != default


# ------------------------------------------------------------------------------------------------ data and runs
def write_inputs(folder: Path) -> list[str]:
    """Web pages with planted near-copies in three .jsonl files shaped like a public web dataset (a "text" field
    beside "id" and "url"), plus exact duplicates across files, a too-short document and a malformed line."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [d.text for d in near_dup_corpus(600, copy_share=0.1, change=0.05, seed=11)]
    docs += docs[40:70] + ["ok"]
    rows = [json.dumps({"id": f"doc-{i:05d}", "url": f"https://example.org/{i}", "text": t})
            for i, t in enumerate(docs)]
    rows.insert(123, '{"id": "broken", "text": ')
    paths = []
    for i in range(3):
        path = folder / f"part-{i}.jsonl"
        path.write_text("".join(r + "\n" for r in rows[i::3]))
        paths.append(str(path))
    return paths


def with_field(cfg: BaseModel, field: str, value: Any) -> BaseModel:
    """The config with one field set, validated."""
    return type(cfg).model_validate({**cfg.model_dump(), field: value})


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_bytes(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    assert len(ta) >= 3
    differing = [name for name in ta if ta[name] != tb[name]]
    assert differing == [], f"files that differ: {differing}"


def assert_same_result(a: StageResult, b: StageResult) -> None:
    assert {k: v for k, v in a.metrics.items() if k not in TIMINGS} == \
        {k: v for k, v in b.metrics.items() if k not in TIMINGS}
    assert a.samples == b.samples


@pytest.fixture(scope="module")
def ingest_cfg(tmp_path_factory: pytest.TempPathFactory) -> ingest.Config:
    """Near-dedup and the quality filters on, several shards of several row groups, a quarantined record."""
    paths = write_inputs(tmp_path_factory.mktemp("inputs"))
    return ingest.Config(sources=[ingest.FilesSource(paths=paths)], near_dedup={"enabled": True},
                         quality={"enabled": True}, min_chars=20, val_fraction=0.1, shard_max_bytes=200_000,
                         row_group_bytes=40_000, max_bad_fraction=0.01)


@pytest.fixture(scope="module")
def tok_cfg() -> tok_stage.Config:
    return tok_stage.Config(vocab_size=400, shard_max_tokens=40_000, encode_batch_docs=50)


@pytest.fixture(scope="module")
def baseline(ingest_cfg, tok_cfg, tmp_path_factory) -> dict[str, tuple[Path, StageResult]]:
    """Each stage run once with every execution field at its default: (out_dir, result)."""
    root = tmp_path_factory.mktemp("baseline")
    ing = ingest.run(ingest_cfg, None, root / "ingest")
    m = ing.metrics
    assert m["dropped/duplicate"] >= 30 and m["dropped/near_duplicate"] >= 30 and m["bad_records"] == 1
    assert m["dropped/too_short"] >= 1 and m["shards"] >= 4
    tok = tok_stage.run(tok_cfg, {"corpus": ing.outputs["corpus"]}, root / "tokenizer")
    assert len([f for f in tree(tok.outputs["tokens"]) if f.endswith(".bin")]) >= 4
    return {"ingest": (root / "ingest", ing), "tokenizer": (root / "tokenizer", tok)}


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """A local Dask cluster of two worker processes on 127.0.0.1, as a remote one would be reached by address.
    Its nannies set OMP_NUM_THREADS in this process's environment: restored afterwards."""
    import distributed

    with fanout.environ_kept(), fanout.quiet_port_warning(), distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, protocol="tcp://", host="127.0.0.1",
            dashboard_address=None) as cluster:
        yield cluster


def tasks_run(cluster: Any) -> int:
    """Tasks the cluster's scheduler has been given, over all task prefixes."""
    return sum(sum(tp.state_counts.values()) for tp in cluster.scheduler.task_prefixes.values())


def run_stage(stage: str, cfg: BaseModel, inputs: dict[str, Path], out_dir: Path) -> StageResult:
    runs: dict[str, Callable[..., StageResult]] = {"ingest": ingest.run, "tokenizer": tok_stage.run}
    return runs[stage](cfg, inputs or None, out_dir)


# ------------------------------------------------------------------------------------------------ the proofs
@pytest.mark.parametrize("stage, field", sorted(PROOFS))
def test_two_values_give_byte_identical_outputs(stage, field, ingest_cfg, tok_cfg, baseline, request, tmp_path):
    default, other = PROOFS[(stage, field)]
    cluster = request.getfixturevalue("dask_cluster") if other == CLUSTER else None
    value = cluster.scheduler_address if cluster is not None else other
    base_cfg = {"ingest": ingest_cfg, "tokenizer": tok_cfg}[stage]
    assert getattr(base_cfg, field) == default
    inputs = {"corpus": baseline["ingest"][1].outputs["corpus"]} if stage == "tokenizer" else {}
    before = tasks_run(cluster) if cluster is not None else 0
    res = run_stage(stage, with_field(base_cfg, field, value), inputs, tmp_path / "out")
    if cluster is not None:
        assert tasks_run(cluster) > before, "no unit ran on the cluster"
    base_dir, base_res = baseline[stage]
    assert_same_bytes(base_dir, tmp_path / "out")
    assert_same_result(base_res, res)


class _SpyIndex(near_dedup.Index):
    """The near-dedup index, recording for each band whether it was matched whole or in key ranges; with
    `records_per_mb` set, the budget allows that many records per MiB instead of about 1400 (no 65536 floor)."""

    records_per_mb: int | None = None
    paths: list[str] = []

    def __init__(self, folder: Path, cfg: near_dedup.NearDedupConfig, memory_budget_bytes: int) -> None:
        super().__init__(folder, cfg, memory_budget_bytes)
        if self.records_per_mb is not None:
            self.max_sorted = (memory_budget_bytes >> 20) * self.records_per_mb

    def _partitions(self, path: Path) -> Iterator[Any]:
        n = path.stat().st_size // near_dedup.BAND_RECORD.itemsize
        self.paths.append("whole" if n <= self.max_sorted else "ranges")
        return super()._partitions(path)


def test_key_ranges_and_whole_bands_give_the_same_bytes(ingest_cfg, baseline, monkeypatch, tmp_path):
    """memory_budget_mb on both matching paths: with the budget scaled down to 1 record per MiB, 256 sorts every
    band in key ranges, 2048 whole; the corpus is the same bytes, and the same as the unscaled baseline's."""
    # unscaled, even the least budget sorts every band of this corpus whole (see PROOFS)
    least = near_dedup.Index(tmp_path / "least", ingest_cfg.near_dedup, 256 << 20).max_sorted
    assert least > 1_000_000 > baseline["ingest"][1].metrics["records_read"]
    monkeypatch.setattr(near_dedup, "Index", _SpyIndex)
    monkeypatch.setattr(_SpyIndex, "records_per_mb", 1)
    taken = {}
    for mb in (256, 2048):
        monkeypatch.setattr(_SpyIndex, "paths", [])
        ingest.run(with_field(ingest_cfg, "memory_budget_mb", mb), None, tmp_path / str(mb))
        taken[mb] = set(_SpyIndex.paths)
    assert taken == {256: {"ranges"}, 2048: {"whole"}}
    assert_same_bytes(tmp_path / "256", tmp_path / "2048")
    assert_same_bytes(baseline["ingest"][0], tmp_path / "256")
