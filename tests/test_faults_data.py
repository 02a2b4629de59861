"""Data-side fault injection (issue 7 items 3, 4, 5, 11): corrupt shards, disk full, kill -9 during ingestion, bad input files. Run: .venv/bin/pytest tests/test_faults_data.py"""

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm import data
from stages import ingest
from stages import tokenizer as tok_stage
from stages.common import StageError, sha256_tree
from stages.data import compression, corpus_reader, readers

ROOT = Path(__file__).resolve().parents[1]


def builtin(n=300, **kw):
    return ingest.BuiltinSource(n_documents=n, n_sft=10, n_pref=10, n_heldout=5, n_rl_prompts=5, **kw)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """A corpus and its token shards, built once; tests copy what they corrupt."""
    root = tmp_path_factory.mktemp("faults")
    corpus_dir = ingest.run(ingest.Config(sources=[builtin(600)], val_fraction=0.1), None, root).outputs["corpus"]
    out = tok_stage.run(tok_stage.Config(vocab_size=320), {"corpus": corpus_dir}, root).outputs
    return corpus_dir, out["tokens"]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _flip_byte(path: Path, where: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * where)
    raw[i] ^= 0x40
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ------------------------------------------------------------------------- 3: flipped byte / truncated shard


@pytest.mark.parametrize("damage", [_flip_byte, _truncate])
def test_corrupt_corpus_shard_is_detected_before_use(pipeline_dirs, tmp_path, damage):
    corpus_dir = _copy(pipeline_dirs[0], tmp_path / "corpus")
    damage(corpus_dir / "train-00000.parquet")
    with pytest.raises(StageError, match=r"corpus shard .*train-00000\.parquet is corrupt"):
        tok_stage.run(tok_stage.Config(vocab_size=320), {"corpus": corpus_dir}, tmp_path / "out")
    assert not (tmp_path / "out" / "tokens").exists()


@pytest.mark.parametrize("damage", [_flip_byte, _truncate])
def test_corrupt_token_shard_is_detected_before_use(pipeline_dirs, tmp_path, damage):
    tokens = _copy(pipeline_dirs[1], tmp_path / "tokens")
    damage(tokens / "val-00000.bin")
    with pytest.raises(data.DataError, match=r"token shard .*val-00000\.bin is (corrupt|truncated)"):
        data.PretrainLoader(tokens, batch_size=1, max_seq_len=16, split="val")
    with pytest.raises(data.DataError, match=r"val-00000\.bin"):
        list(data.eval_batches(tokens, 1, 16))
    data.PretrainLoader(tokens, batch_size=1, max_seq_len=16, split="train")  # the intact split still loads


def test_missing_token_shard(pipeline_dirs, tmp_path):
    tokens = _copy(pipeline_dirs[1], tmp_path / "tokens")
    (tokens / "train-00000.bin").unlink()
    with pytest.raises(data.DataError, match=r"train-00000\.bin is missing"):
        data.PretrainLoader(tokens, batch_size=1, max_seq_len=16)


# --------------------------------------------------------------------------------------------- 4: disk full


class _FullDisk:
    """A file object that accepts `budget` more bytes in total, then fails like a full disk."""

    budget = 0

    def __init__(self, f):
        self._f = f

    def write(self, b):
        if _FullDisk.budget < len(b):
            raise OSError(errno.ENOSPC, "No space left on device")
        _FullDisk.budget -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_while_writing_token_shards(pipeline_dirs, tmp_path, monkeypatch):
    corpus_dir = pipeline_dirs[0]
    first = tok_stage.run(tok_stage.Config(vocab_size=300), {"corpus": corpus_dir}, tmp_path)
    before = {k: sha256_tree(v) for k, v in first.outputs.items()}

    _FullDisk.budget = 20_000  # the first shard (several tens of KB) will not fit
    monkeypatch.setattr(data, "open", lambda *a, **k: _FullDisk(open(*a, **k)), raising=False)
    with pytest.raises(StageError, match="disk full"):
        tok_stage.run(tok_stage.Config(vocab_size=400, shard_max_tokens=5000), {"corpus": corpus_dir}, tmp_path)
    monkeypatch.undo()

    assert {k: sha256_tree(v) for k, v in first.outputs.items()} == before  # earlier outputs intact
    data.verify_shards(first.outputs["tokens"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer", "tokens"]  # no temp leftovers


def test_disk_full_while_writing_corpus_shards(tmp_path, monkeypatch):
    first = ingest.run(ingest.Config(sources=[builtin(200)]), None, tmp_path)
    before = sha256_tree(first.outputs["corpus"])
    real = pq.ParquetWriter.write_table
    calls = {"n": 0}

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(StageError, match="disk full while writing .*corpus"):
        ingest.run(ingest.Config(sources=[builtin(800)], row_group_bytes=4096), None, tmp_path)
    monkeypatch.undo()
    assert sha256_tree(first.outputs["corpus"]) == before
    assert not list(tmp_path.glob(".corpus*"))


@contextlib.contextmanager
def _tiny_tmpfs(path: Path, size: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the ENOSPC-injection tests cover it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_real_full_disk_tmpfs(tmp_path):
    """A real ENOSPC from the kernel: a 1 MB tmpfs, a first small run that fits, a second run that does not."""
    with _tiny_tmpfs(tmp_path / "mnt", "1m") as mnt:
        first = ingest.run(ingest.Config(sources=[builtin(300)]), None, mnt)
        before = sha256_tree(first.outputs["corpus"])
        with pytest.raises(StageError, match="disk full"):
            ingest.run(ingest.Config(sources=[builtin(20000)], compression_level=1), None, mnt)
        assert sha256_tree(first.outputs["corpus"]) == before
        corpus_reader.read_manifest(first.outputs["corpus"])  # verifies every shard's sha256
        assert not list(mnt.glob(".corpus*"))


# ------------------------------------------------------------------------------ 5: kill -9 during ingestion

_INGEST_SCRIPT = """
import sys
from pathlib import Path
from stages import ingest
from stages.data import corpus_reader, readers
cfg = ingest.Config.model_validate_json(sys.argv[1])
ingest.run(cfg, None, Path(sys.argv[2]))
"""


def test_kill_9_during_ingestion_then_rerun_equals_clean_run(tmp_path):
    cfg = ingest.Config(sources=[builtin(12000, seed=5)], shard_max_bytes=50_000, row_group_bytes=10_000)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _INGEST_SCRIPT, cfg.model_dump_json(), str(killed)],
                            cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            partial = [p for d in killed.glob(".corpus.*.tmp") for p in d.glob("*.parquet")]
            if len(partial) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "ingestion finished before it could be killed; make the test corpus bigger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "corpus").exists()  # nothing half-written under the final name
    assert list(killed.glob(".corpus.*.tmp"))  # the killed run's temporary folder is still there

    resumed = ingest.run(cfg, None, killed)
    clean = ingest.run(cfg, None, tmp_path / "clean")
    got = corpus_reader.read_manifest(resumed.outputs["corpus"])
    want = corpus_reader.read_manifest(clean.outputs["corpus"])
    assert [(s["file"], s["rows"], s["sha256"]) for s in got["shards"]] == \
        [(s["file"], s["rows"], s["sha256"]) for s in want["shards"]]
    assert len(got["shards"]) > 3
    assert not list(killed.glob(".corpus.*.tmp"))  # leftovers cleaned up
    assert sha256_tree(resumed.outputs["tasks"]) == sha256_tree(clean.outputs["tasks"])


# ------------------------------------------------------------------------------------------- 11: bad data


def _files_cfg(*paths, **kw):
    return ingest.Config(sources=[ingest.FilesSource(paths=[str(p) for p in paths], txt_unit="line")],
                         val_fraction=0.0, **kw)


def _good_lines(path: Path, n: int) -> Path:
    path.write_text("".join(f"good line number {i}\n" for i in range(n)))
    return path


def test_binary_garbage(tmp_path):
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(random.Random(0).randbytes(200_000))
    good = _good_lines(tmp_path / "good.txt", 100)
    with pytest.raises(StageError, match=r"garbage\.txt:\d+: invalid_utf8"):
        ingest.run(_files_cfg(good, garbage), None, tmp_path / "strict")
    assert not (tmp_path / "strict" / "corpus").exists()
    res = ingest.run(_files_cfg(good, garbage, max_bad_fraction=1.0), None, tmp_path / "lenient")
    assert res.metrics["dropped/invalid_utf8"] > 100 and res.metrics["bad_records"] >= 100
    kept = [t for b in corpus_reader.iter_texts(res.outputs["corpus"]) for t in b]
    assert kept[:100] == [f"good line number {i}" for i in range(100)]


def test_invalid_utf8_line(tmp_path):
    path = _good_lines(tmp_path / "a.txt", 3000)
    with open(path, "ab") as f:
        f.write(b"caf\xe9 au lait\nlast good line\n")
    res = ingest.run(_files_cfg(path), None, tmp_path / "ok")  # 1 bad in 3002 < 0.1%: quarantined
    assert res.metrics["dropped/invalid_utf8"] == 1 and res.metrics["rows"] == 3001
    q = json.loads((res.outputs["corpus"] / "quarantine.jsonl").read_text())
    assert q == {"where": f"{path}:3001", "reason": "invalid_utf8"}
    small = tmp_path / "small.txt"
    small.write_bytes(b"fine\n\xff\xfe broken\nfine too\n")
    with pytest.raises(StageError, match=r"small\.txt:2: invalid_utf8"):
        ingest.run(_files_cfg(small), None, tmp_path / "strict")


def test_100mb_single_line_is_dropped_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.write(b"before\n")
        block = b"x" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b"\nafter\n")
    tracemalloc.start()
    try:
        res = ingest.run(_files_cfg(path), None, tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.metrics["dropped/too_long"] == 1
    assert [t for b in corpus_reader.iter_texts(res.outputs["corpus"]) for t in b] == ["before", "after"]
    assert peak < 24 * (1 << 20), f"peak Python memory {peak / 2**20:.0f} MiB: the long line was buffered"


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(StageError, match="corpus is empty"):
        ingest.run(_files_cfg(empty), None, tmp_path / "out")
    assert not (tmp_path / "out" / "corpus").exists()
    assert not list((tmp_path / "out").glob(".corpus*"))


def test_parquet_with_the_wrong_schema(tmp_path):
    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    cfg = ingest.Config(sources=[ingest.FilesSource(paths=[str(path)])])
    with pytest.raises(StageError, match=r"wrong\.parquet: Parquet file has no column 'text' .*\['body'\]"):
        ingest.run(cfg, None, tmp_path / "out")
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(StageError, match=r"numbers\.parquet: column 'text' has type int64"):
        ingest.run(ingest.Config(sources=[ingest.FilesSource(paths=[str(numbers)])]), None, tmp_path / "out")
    assert not (tmp_path / "out" / "corpus").exists()


def test_corrupt_parquet_input(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1" + random.Random(1).randbytes(5000))
    good = _good_lines(tmp_path / "good.txt", 50)
    with pytest.raises(StageError, match=r"bad\.parquet.*bad_parquet"):
        ingest.run(ingest.Config(sources=[ingest.FilesSource(paths=[str(good), str(bad)], txt_unit="line")]),
                   None, tmp_path / "out")
    res = ingest.run(ingest.Config(sources=[ingest.FilesSource(paths=[str(good), str(bad)], txt_unit="line")],
                                   max_bad_fraction=0.05), None, tmp_path / "out")
    assert res.metrics["dropped/bad_parquet"] == 1 and res.metrics["rows"] == 50


def test_unreadable_file(tmp_path, monkeypatch):
    locked = _good_lines(tmp_path / "locked.txt", 5)
    good = _good_lines(tmp_path / "good.txt", 5000)
    real_open = open

    def guarded_open(path, *a, **k):  # root ignores file modes, so deny access the way the OS would
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(readers, "open", guarded_open, raising=False)
    monkeypatch.setattr(compression, "open", guarded_open, raising=False)  # files are opened through open_binary
    with pytest.raises(StageError, match=r"locked\.txt.*unreadable"):
        ingest.run(_files_cfg(locked), None, tmp_path / "out")
    res = ingest.run(_files_cfg(good, locked), None, tmp_path / "out")  # 1 bad record in 5001: quarantined
    assert res.metrics["dropped/unreadable"] == 1 and res.metrics["rows"] == 5000
