"""Compressed corpus files (stages/data/compression.py, read by stages/data/readers.py): .txt and .jsonl files compressed
with gzip, zstd, bzip2 or xz ingest to the same documents as the plain files, streamed; a truncated or corrupt
archive is a `bad_archive` record naming the file and the line where reading broke.
Run: .venv/bin/pytest tests/test_ingest_compressed.py"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import pickle
from pathlib import Path

import pytest
import zstandard

from stages import ingest
from stages.common import StageError
from stages.data import cleaning, compression, corpus_reader
from stages.runtime import fanout
from stages.world import corpus

COMPRESS = {
    ".gz": lambda data: gzip.compress(data, compresslevel=6),
    ".zst": lambda data: zstandard.ZstdCompressor(level=3).compress(data),
    ".bz2": lambda data: bz2.compress(data, compresslevel=1),  # 100 kB blocks: a cut file still decodes a part
    ".xz": lzma.compress,
}
assert tuple(COMPRESS) == compression.COMPRESSION_SUFFIXES


def documents(n: int = 300, seed: int = 5) -> list[str]:
    return list(corpus.pretraining_documents(seed, n))


def file_bytes(fmt: str, docs: list[str]) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    return "\n\n".join(docs).encode() + b"\n"  # .txt: a paragraph per document


def texts(res: ingest.StageResult) -> dict[str, list[str]]:
    return {split: [t for batch in corpus_reader.iter_texts(res.outputs["corpus"], split) for t in batch]
            for split in ("train", "val")}


def ingest_files(paths: list[Path], out: Path, **kw: object) -> ingest.StageResult:
    src = kw.pop("source", {})
    kw.setdefault("val_fraction", 0.1)
    return ingest.run(ingest.Config(sources=[ingest.FilesSource(paths=[str(p) for p in paths], **src)], **kw),
                      None, out)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, dict[str, list[str]]]]:
    """Per format: the plain file's bytes and the corpus ingested from it."""
    root = tmp_path_factory.mktemp("plain")
    out = {}
    for fmt in ("txt", "jsonl"):
        data = file_bytes(fmt, documents())
        (root / f"a.{fmt}").write_bytes(data)
        out[fmt] = data, texts(ingest_files([root / f"a.{fmt}"], root / fmt))
    return out


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_a_compressed_file_ingests_to_the_same_documents(plain, tmp_path, fmt, suffix):
    data, expected = plain[fmt]
    path = tmp_path / f"a.{fmt}{suffix}"
    path.write_bytes(COMPRESS[suffix](data))
    res = ingest_files([path], tmp_path / "out")
    got = texts(res)
    assert got == expected and len(got["train"]) + len(got["val"]) == 300
    assert res.metrics["bad_records"] == 0


def test_open_binary_and_data_suffix(tmp_path):
    data = b"line one\nline two\n" * 1000
    for suffix, compress in COMPRESS.items():
        path = tmp_path / f"x.jsonl{suffix.upper()}"  # suffixes are matched case-insensitively
        path.write_bytes(compress(data[:7000]) + compress(data[7000:]))  # two members/frames: one stream
        with compression.open_binary(path) as f:
            assert f.readline() == b"line one\n" and f.read() == data[9:]
        assert compression.data_suffix(path) == ".jsonl"
    assert compression.data_suffix("a.TXT") == ".txt" and compression.data_suffix("a.parquet") == ".parquet"
    assert compression.data_suffix("dir.v2/a.gz") == ""
    assert compression.compression_of("a.jsonl") is None and compression.compression_of("a.txt.xz") == ".xz"
    plain = tmp_path / "p.txt"
    plain.write_bytes(data)
    with compression.open_binary(plain) as f:
        assert f.read() == data


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_a_truncated_archive_keeps_the_documents_before_the_break(tmp_path, suffix):
    docs = documents(3000)
    packed = COMPRESS[suffix](file_bytes("jsonl", docs))
    path = tmp_path / f"cut.jsonl{suffix}"
    path.write_bytes(packed[: len(packed) // 2])
    res = ingest_files([path], tmp_path / "out", val_fraction=0.0, max_bad_fraction=1.0)
    kept = texts(res)["train"]
    assert 0 < len(kept) < len(docs) and kept == [cleaning.clean_text(d) for d in docs[: len(kept)]]
    assert res.metrics["dropped/bad_archive"] == 1 == res.metrics["bad_records"]
    (q,) = [json.loads(x) for x in (res.outputs["corpus"] / "quarantine.jsonl").read_text().splitlines()]
    assert q["reason"] == "bad_archive"
    assert q["where"].startswith(f"{path}:{len(kept) + 1} (") and "truncated" in q["where"]


def test_a_truncated_archive_fails_the_stage_above_the_threshold(tmp_path):
    packed = COMPRESS[".gz"](file_bytes("jsonl", documents()))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(StageError, match=r"cut\.jsonl\.gz:\d+ \(EOFError: .*bad_archive.*max_bad_fraction"):
        ingest_files([path], tmp_path / "out")
    assert not (tmp_path / "out" / "corpus").exists()


def test_a_file_not_compressed_as_its_suffix_says(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes(file_bytes("txt", documents(50)))
    fake = tmp_path / "fake.txt.zst"
    fake.write_bytes(b"plain text, not zstd\n")
    res = ingest_files([good, fake], tmp_path / "out", max_bad_fraction=1.0)
    assert res.metrics["rows"] == 50 and res.metrics["dropped/bad_archive"] == 1
    (q,) = [json.loads(x) for x in (res.outputs["corpus"] / "quarantine.jsonl").read_text().splitlines()]
    assert q["where"].startswith(f"{fake}:1 (ZstdError")


def test_declared_format_on_a_compressed_file_and_format_errors(tmp_path, plain):
    data, expected = plain["jsonl"]
    path = tmp_path / "dump.gz"  # no format extension: only a declared format can say what it holds
    path.write_bytes(COMPRESS[".gz"](data))
    res = ingest_files([path], tmp_path / "out", source={"format": "jsonl"})
    assert texts(res) == expected
    with pytest.raises(StageError, match=r"dump\.gz: cannot tell the format from the extension '' under '\.gz'"):
        ingest_files([path], tmp_path / "auto")
    parquet = tmp_path / "a.parquet.gz"
    parquet.write_bytes(COMPRESS[".gz"](b"PAR1"))
    with pytest.raises(StageError, match=r"a\.parquet\.gz: a Parquet file cannot be read through '\.gz'"):
        ingest_files([parquet], tmp_path / "pq")


def test_globs_rerun_and_changed_archive(tmp_path, plain):
    data, _ = plain["jsonl"]
    half = len(data) // 2
    cut = data.rindex(b"\n", 0, half) + 1
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(COMPRESS[".gz"](data[:cut]))
    (tmp_path / "in" / "b.jsonl.zst").write_bytes(COMPRESS[".zst"](data[cut:]))
    src = {"paths": [str(tmp_path / "in" / "*.jsonl.*")]}
    cfg = ingest.Config(sources=[ingest.FilesSource(**src)], val_fraction=0.1)
    first = ingest.run(cfg, None, tmp_path / "out")
    assert first.metrics["rows"] == 300
    shard = first.outputs["corpus"] / "train-00000.parquet"
    before = shard.stat().st_mtime_ns
    assert ingest.run(cfg, None, tmp_path / "out").metrics == first.metrics  # same archives: reused
    assert shard.stat().st_mtime_ns == before
    # a changed archive (the compressed file's size and mtime) redoes the corpus
    (tmp_path / "in" / "b.jsonl.zst").write_bytes(COMPRESS[".zst"](data[cut:] + file_bytes("jsonl", ["one more"])))
    assert ingest.run(cfg, None, tmp_path / "out").metrics["rows"] == 301


def test_fanout_reads_a_compressed_file_as_one_unit(tmp_path, plain):
    """Units and results cross a pickle boundary, as they do to Dask worker processes."""
    data, _ = plain["txt"]
    for i, suffix in enumerate(COMPRESS):
        part = data.split(b"\n\n")[i * 60:(i + 1) * 60]
        (tmp_path / f"p{i}.txt{suffix}").write_bytes(COMPRESS[suffix](b"\n\n".join(part) + b"\n"))
    cut = COMPRESS[".gz"](data)
    (tmp_path / "z-cut.txt.gz").write_bytes(cut[: len(cut) // 3])
    paths = [tmp_path / "p*.txt.*", tmp_path / "z-cut.txt.gz"]
    one = ingest_files(paths, tmp_path / "one", max_bad_fraction=0.5)
    units = []

    class Pickling:
        def map(self, fn, items, labels=None):
            items = list(items)
            units.extend(labels)
            return (pickle.loads(pickle.dumps(fn(pickle.loads(pickle.dumps(item))))) for item in items)

    with fanout.using(lambda workers, address, stage: contextlib.nullcontext(Pickling())):
        two = ingest_files(paths, tmp_path / "two", max_bad_fraction=0.5, workers=2)
    assert units == ["p0.txt.gz", "p1.txt.zst", "p2.txt.bz2", "p3.txt.xz", "z-cut.txt.gz"]
    assert texts(two) == texts(one) and two.metrics == one.metrics
    # the cut archive holds the first documents again: read up to the break, then dropped as duplicates
    assert one.metrics["dropped/bad_archive"] == 1 and one.metrics["dropped/duplicate"] > 0
    assert one.metrics["rows"] == 240
    for name in ("quarantine.jsonl", "manifest.json"):
        assert (two.outputs["corpus"] / name).read_bytes() == (one.outputs["corpus"] / name).read_bytes()
