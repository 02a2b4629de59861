"""Ingestion throughput: our `ingest` stage (cleaning + dedup + split on) against a plain pyarrow read-and-write
of the same Parquet files (the floor any Parquet-to-Parquet step pays), target ratio >= 0.5; and the stage with
`ingest.workers=N` (a local Dask cluster, started and stopped inside each timed run) against one worker, target
>= 1.4x for 2 workers on 2 cores. `fanout on a running cluster` times the same against a cluster started once,
outside the timing (`ingest.dask_address`): the cost of the fan-out without the cluster's start-up.

`--compressed`: the stage reading one .jsonl.gz file (gzip level 6) against the same corpus as plain .jsonl,
target ratio >= 0.5, and the peak memory (RSS high-water mark) of each; every ingest runs in a fresh process that
imports only the stage, so the peak is the stage's own. Streaming keeps that peak flat as the input grows: run it
at --mb 256 and --mb 1024 (target: the compressed peaks within 20 % of each other).

`--filters` (bench/ingest_filters.py): the stage with every quality filter and near-duplicate removal on against
them off, on generated web-like text: throughput ratio and peak memory against `ingest.memory_budget_mb`.
`--near-dup`: precision and recall of near-duplicate removal on planted near-copies.

    python -m bench.ingest [--quick] [--json] [--mb 64] [--repeats 3] [--workers 2] [--files 4]
    python -m bench.ingest --compressed [--json] [--mb 1024] [--repeats 2]
    python -m bench.ingest --filters [--json] [--mb 1024] [--files 8] [--workers 2] [--memory-budget-mb 2048]
                           [--only-near-dedup]
    python -m bench.ingest --near-dup [--json] [--pages 20000] [--change 0.05 0.1 0.2]

Prints MB/s of document text for each and the ratios; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would skew the timing

from bench import ingest_filters
from bench.common import add_repeat_args, alternate
from stages import ingest
from stages.data import builtin
from stages.runtime import fanout


def make_inputs(folder: Path, target_mb: float, doc_bytes: int = 2000, n_files: int = 4) -> tuple[list[Path], int]:
    """Parquet files of raw documents of about `doc_bytes` each (built-in generator text, joined), `target_mb` in all.

    A few percent are exact duplicates and carry stray control characters / CRLF, so every cleaning path runs."""
    docs, size, seed, current = [], 0, 0, ""
    while size < target_mb * 1e6:
        for i, d in enumerate(builtin.documents(seed, 4000)):
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


def ours(files: list[Path], out: Path, workers: int = 1, address: str | None = None) -> None:
    cfg = ingest.Config(sources=[ingest.FilesSource(paths=[str(f) for f in files])], workers=workers,
                        dask_address=address)
    ingest.run(cfg, None, out)


def best_times(files: list[Path], work: Path, repeats: int, workers: int) -> dict[str, float]:
    """Best wall time of each side, each writing a fresh folder (removed untimed after the call)."""
    import distributed

    with distributed.LocalCluster(**fanout.local_cluster_kwargs(workers)) as cluster:
        fns = {"baseline": functools.partial(baseline, files, work / "run-baseline"),
               "ours": functools.partial(ours, files, work / "run-ours"),
               "fanout": functools.partial(ours, files, work / "run-fanout", workers),
               "fanout_running": functools.partial(ours, files, work / "run-fanout_running", workers,
                                                   cluster.scheduler_address)}
        if workers == 1:
            del fns["fanout"], fns["fanout_running"]
        return alternate(fns, repeats, after=lambda name: shutil.rmtree(work / f"run-{name}", ignore_errors=True))


def cores_busy(files: list[Path], work: Path) -> float:
    """CPU seconds per wall second of one `workers=1` ingest (this process and its Arrow threads): the ceiling of
    any fan-out on this machine is cpus / this, before any of the fan-out's own costs."""
    import resource

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    ours(files, work / "run-cores")
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(work / "run-cores", ignore_errors=True)
    return (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall


def report(size: float, n_files: int, args: argparse.Namespace, best: dict[str, float], cores: float) -> dict:
    mbs = {k: size / 1e6 / t for k, t in best.items()}
    result = {
        "bench": "ingest",
        "input_mb": round(size / 1e6, 2),
        "doc_bytes": args.doc_bytes,
        "files": n_files,
        "cpus": os.cpu_count(),
        "baseline_mb_s": round(mbs["baseline"], 2),
        "ours_mb_s": round(mbs["ours"], 2),
        "ratio": round(mbs["ours"] / mbs["baseline"], 3),
        "target": 0.5,
    }
    print(f"input: {result['input_mb']} MB of text in {n_files} Parquet files, {os.cpu_count()} CPUs")
    print(f"{'pyarrow read+write':<36}{mbs['baseline']:>10.1f} MB/s")
    print(f"{'ingest (clean+dedup+split)':<36}{mbs['ours']:>10.1f} MB/s")
    print(f"ratio ours/baseline: {result['ratio']:.3f} (target >= 0.5)")
    if "fanout" in mbs:
        w = args.workers
        result.update({"workers": w, "fanout_mb_s": round(mbs["fanout"], 2),
                       "fanout_running_mb_s": round(mbs["fanout_running"], 2),
                       "fanout_ratio": round(mbs["fanout"] / mbs["ours"], 3),
                       "fanout_running_ratio": round(mbs["fanout_running"] / mbs["ours"], 3), "fanout_target": 1.4})
        cpus = os.cpu_count() or 1
        result.update({"one_worker_cores_busy": round(cores, 2), "fanout_ceiling": round(cpus / cores, 2)})
        print(f"one worker keeps {cores:.2f} of {cpus} cores busy: no fan-out here can exceed {cpus / cores:.2f}x")
        print(f"{f'ingest workers={w} (new cluster)':<36}{mbs['fanout']:>10.1f} MB/s")
        print(f"{f'ingest workers={w} (running cluster)':<36}{mbs['fanout_running']:>10.1f} MB/s")
        print(f"ratio workers={w}/workers=1: {result['fanout_ratio']:.3f} with the cluster's start-up, "
              f"{result['fanout_running_ratio']:.3f} on a running cluster (target >= 1.4 for 2 workers on 2 cores)")
    return result


def write_jsonl_corpus(path: Path, target_mb: float, doc_bytes: int = 2000) -> tuple[int, int]:
    """`path` (.jsonl) and `path`.gz (gzip level 6) holding the same documents of about `doc_bytes` each, `target_mb`
    of text in all, written as they are generated (a 1 GB corpus never sits in memory); (text bytes, documents).

    Documents join random built-in stories behind a running number, so they are distinct however large the corpus
    (the built-in generator alone is too slow for gigabytes); as in `make_inputs`, a few percent are duplicates
    and carry CRLF / control characters."""
    pool = [d for seed in range(4) for d in builtin.documents(seed, 4000)]
    rng = random.Random(0)
    size = n = 0
    with open(path, "wb") as plain, gzip.open(f"{path}.gz", "wb", compresslevel=6) as packed:
        while size < target_mb * 1e6:
            lines = []
            for _ in range(1000):
                parts, length = [f"Document {n}."], 0
                while length < doc_bytes:
                    parts.append(rng.choice(pool))
                    length += len(parts[-1]) + 1
                text = "\n".join(parts)
                if n % 50 == 0:
                    text = text.replace("\n", "\r\n") + "\x07"
                lines.append(json.dumps({"text": text}))
                if n % 40 == 0:
                    lines.append(lines[-1])
                size += len(text.encode()) * (1 + (n % 40 == 0))
                n += 1
            block = ("\n".join(lines) + "\n").encode()
            plain.write(block)
            packed.write(block)
    return size, n


# One ingest in a fresh interpreter that imports only the stage (the bench's own imports, torch among them, would
# dominate the peak memory); prints its wall time.
_INGEST_CHILD = """
import json, sys, time
from stages import ingest
cfg = ingest.Config(sources=[ingest.FilesSource(paths=[sys.argv[1]])])
t0 = time.perf_counter()
res = ingest.run(cfg, None, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": res.metrics["rows"]}))
"""


def ingest_in_child(src: Path, out: Path) -> tuple[float, float, int]:
    """(wall seconds of `ingest.run`, peak RSS of the process in MB, rows kept) for one ingest of `src`."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _INGEST_CHILD, str(src), str(out)], stdout=subprocess.PIPE,
                            env=env, cwd=Path(__file__).resolve().parent.parent)
    stdout = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the maximum over all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"the ingest of {src} failed (exit {proc.returncode}); see its output above")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    return result["seconds"], usage.ru_maxrss / 1024, result["rows"]  # ru_maxrss: KiB on Linux


def compressed_main(args: argparse.Namespace) -> dict:
    mb, repeats = args.mb or (64 if args.quick else 1024), args.repeats or 2
    with tempfile.TemporaryDirectory(prefix="bench-ingest-gz-") as tmp:
        work = Path(tmp)
        plain = work / "corpus.jsonl"
        t0 = time.perf_counter()
        size, n_docs = write_jsonl_corpus(plain, mb, args.doc_bytes)
        print(f"wrote {size / 1e6:.0f} MB of text in {n_docs} distinct documents ({plain.stat().st_size / 1e6:.0f} MB as "
              f"JSONL, {Path(f'{plain}.gz').stat().st_size / 1e6:.0f} MB as .jsonl.gz) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        runs: dict[str, list[tuple[float, float, int]]] = {"plain": [], "gzip": []}
        for _ in range(repeats):  # the sides alternate, so load from other processes hits both alike
            for name, src in (("plain", plain), ("gzip", Path(f"{plain}.gz"))):
                runs[name].append(ingest_in_child(src, work / f"out-{name}"))
                shutil.rmtree(work / f"out-{name}")
        gz_mb = Path(f"{plain}.gz").stat().st_size / 1e6
    if runs["plain"][0][2] != runs["gzip"][0][2]:
        raise SystemExit(f"the two ingests kept different rows: {runs['plain'][0][2]} vs {runs['gzip'][0][2]}")
    best = {k: min(r[0] for r in v) for k, v in runs.items()}
    peak = {k: max(r[1] for r in v) for k, v in runs.items()}
    mbs = {k: size / 1e6 / t for k, t in best.items()}
    result = {
        "bench": "ingest-compressed",
        "input_mb": round(size / 1e6, 2),
        "gzip_file_mb": round(gz_mb, 2),
        "documents": n_docs,
        "rows_kept": runs["plain"][0][2],
        "cpus": os.cpu_count(),
        "plain_mb_s": round(mbs["plain"], 2),
        "gzip_mb_s": round(mbs["gzip"], 2),
        "ratio": round(mbs["gzip"] / mbs["plain"], 3),
        "target": 0.5,
        "peak_rss_mb_plain": round(peak["plain"], 1),
        "peak_rss_mb_gzip": round(peak["gzip"], 1),
    }
    print(f"{'ingest corpus.jsonl':<36}{mbs['plain']:>10.1f} MB/s, peak RSS {peak['plain']:.0f} MB")
    print(f"{'ingest corpus.jsonl.gz':<36}{mbs['gzip']:>10.1f} MB/s, peak RSS {peak['gzip']:.0f} MB")
    print(f"ratio gzip/plain: {result['ratio']:.3f} (target >= 0.5); compare the peak at --mb 256 and --mb 1024 "
          f"(target: within 20 %)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_repeat_args(ap, "small input (~16 MB), 3 repeats: under a minute on 2 cores")
    ap.add_argument("--mb", type=float, default=None, help="MB of input text (default 64, 16 with --quick)")
    ap.add_argument("--doc-bytes", type=int, default=2000, help="approximate document size (web text: ~2-5 KB)")
    ap.add_argument("--workers", type=int, default=2, help="ingest.workers of the fan-out runs (1: skip them)")
    ap.add_argument("--files", type=int, default=4, help="input Parquet files (the fan-out's units)")
    ap.add_argument("--compressed", action="store_true", help="a .jsonl.gz corpus against the same .jsonl: "
                    "throughput ratio and peak memory (--mb defaults to 1024, --repeats to 2)")
    ap.add_argument("--filters", action="store_true", help="every quality filter and near-dedup on against off, "
                    "on generated web-like text (--mb defaults to 1024; --workers applies to the filtered run)")
    ap.add_argument("--memory-budget-mb", type=int, default=2048, help="ingest.memory_budget_mb of --filters")
    ap.add_argument("--only-near-dedup", action="store_true", help="--filters: turn on near-dedup only (the part "
                    "whose state grows with the corpus), for a memory measurement at sizes the filters make slow")
    ap.add_argument("--near-dup", action="store_true", help="near-duplicate removal's precision and recall")
    ap.add_argument("--pages", type=int, default=None, help="--near-dup: unrelated pages (default 20000)")
    ap.add_argument("--change", type=float, nargs="+", default=[0.05], help="--near-dup: shares of words changed")
    args = ap.parse_args()
    modes = {"compressed": compressed_main, "filters": ingest_filters.filters_main,
             "near_dup": ingest_filters.near_dup_main}
    for name, fn in modes.items():
        if getattr(args, name):
            if name == "filters" and args.files == 4:
                args.files = 8
            result = fn(args)
            if args.json:
                print(json.dumps(result))
            return
    mb = args.mb or (16 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 5)

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        files, size = make_inputs(work, mb, args.doc_bytes, args.files)
        best = best_times(files, work, repeats, args.workers)
        cores = statistics.median(cores_busy(files, work) for _ in range(3))
    result = report(size, len(files), args, best, cores)
    if args.json:
        print(json.dumps(result))

if __name__ == "__main__":
    main()
