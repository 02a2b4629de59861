"""Tokenizer fan-out (`tokenizer.workers`, stages/runtime/fanout.py): the corpus encoded a Parquet row group per Dask worker
process gives the same token shards, byte for byte, as one process, and the setting does not change what is
reused. Run: .venv/bin/pytest tests/test_tokenizer_workers.py"""

from __future__ import annotations

import os

import pytest

from stages import ingest
from stages import tokenizer as tok_stage


def tree(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Several shards of several row groups per split: many units, of different sizes."""
    cfg = ingest.Config(sources=[ingest.BuiltinSource(n_documents=3000, tasks=False)], val_fraction=0.1,
                        shard_max_bytes=200_000, row_group_bytes=40_000)
    return ingest.run(cfg, None, tmp_path_factory.mktemp("ingest")).outputs["corpus"]


def test_two_workers_write_the_same_token_shards(corpus_dir, tmp_path):
    environ = dict(os.environ)
    cfg = tok_stage.Config(vocab_size=400, shard_max_tokens=50_000, encode_batch_docs=100)
    one = tok_stage.run(cfg, {"corpus": corpus_dir}, tmp_path / "one")
    two = tok_stage.run(cfg.model_copy(update={"workers": 2}), {"corpus": corpus_dir}, tmp_path / "two")
    for name in ("tokenizer", "tokens"):
        a, b = tree(one.outputs[name]), tree(two.outputs[name])
        assert sorted(a) == sorted(b) and [f for f in a if a[f] != b[f]] == []
    assert len([f for f in tree(one.outputs["tokens"]) if f.endswith(".bin")]) >= 4
    timings = {"tokenizer/train_seconds", "encode/tokens_per_s"}
    assert {k: v for k, v in one.metrics.items() if k not in timings} == \
        {k: v for k, v in two.metrics.items() if k not in timings}
    assert dict(os.environ) == environ  # Dask's nannies leave this process's environment as it was
