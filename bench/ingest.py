"""Ingestion throughput: our `ingest` stage (cleaning + dedup + split on) against a plain pyarrow read-and-write
of the same Parquet files (the floor any Parquet-to-Parquet step pays). Target ratio >= 0.5.

    python -m bench.ingest [--quick] [--json] [--mb 64] [--repeats 3]

Prints MB/s of document text for both and the ratio ours/baseline; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would skew the timing

from bench.common import add_repeat_args, alternate
from stages import corpus, ingest


def make_inputs(folder: Path, target_mb: float, doc_bytes: int = 2000, n_files: int = 4) -> tuple[list[Path], int]:
    """Parquet files of raw documents of about `doc_bytes` each (built-in generator text, joined), `target_mb` in all.

    A few percent are exact duplicates and carry stray control characters / CRLF, so every cleaning path runs."""
    docs, size, seed, current = [], 0, 0, ""
    while size < target_mb * 1e6:
        for i, d in enumerate(corpus.pretraining_documents(seed, 4000)):
            current = f"{current}\n{d}" if current else d
            if len(current) >= doc_bytes:
                if i % 50 == 0:
                    current = current.replace("\n", "\r\n") + "\x07"
                docs.append(current)
                if i % 40 == 0:
                    docs.append(current)
                size += len(current.encode())
                current = ""
        seed += 1
    files = []
    per = (len(docs) + n_files - 1) // n_files
    for i in range(n_files):
        path = folder / f"input-{i}.parquet"
        pq.write_table(pa.table({"text": docs[i * per : (i + 1) * per]}), path, compression="zstd")
        files.append(path)
    return files, size


def baseline(files: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        pq.write_table(pq.read_table(f), out / f"out-{i}.parquet", compression="zstd", compression_level=3)


def ours(files: list[Path], out: Path) -> None:
    cfg = ingest.Config(sources=[ingest.FilesSource(paths=[str(f) for f in files])])
    ingest.run(cfg, None, out)


def best_times(files: list[Path], work: Path, repeats: int) -> tuple[float, float]:
    """Best wall time of each side, each writing a fresh folder (removed untimed after the call)."""
    fns = {fn.__name__: functools.partial(fn, files, work / f"run-{fn.__name__}") for fn in (baseline, ours)}
    best = alternate(fns, repeats, after=lambda name: shutil.rmtree(work / f"run-{name}", ignore_errors=True))
    return best["baseline"], best["ours"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_repeat_args(ap, "small input (~16 MB), 3 repeats: under a minute on 2 cores")
    ap.add_argument("--mb", type=float, default=None, help="MB of input text (default 64, 16 with --quick)")
    ap.add_argument("--doc-bytes", type=int, default=2000, help="approximate document size (web text: ~2-5 KB)")
    args = ap.parse_args()
    mb = args.mb or (16 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 5)

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        files, size = make_inputs(work, mb, args.doc_bytes)
        t_base, t_ours = best_times(files, work, repeats)
    base_mbs, ours_mbs = size / 1e6 / t_base, size / 1e6 / t_ours
    result = {
        "bench": "ingest",
        "input_mb": round(size / 1e6, 2),
        "doc_bytes": args.doc_bytes,
        "cpus": os.cpu_count(),
        "baseline_mb_s": round(base_mbs, 2),
        "ours_mb_s": round(ours_mbs, 2),
        "ratio": round(ours_mbs / base_mbs, 3),
        "target": 0.5,
    }
    print(f"input: {result['input_mb']} MB of text in {len(files)} Parquet files, {os.cpu_count()} CPUs")
    print(f"{'pyarrow read+write':<28}{base_mbs:>10.1f} MB/s")
    print(f"{'ingest (clean+dedup+split)':<28}{ours_mbs:>10.1f} MB/s")
    print(f"ratio ours/baseline: {result['ratio']:.3f} (target >= 0.5)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
