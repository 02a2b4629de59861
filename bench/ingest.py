"""Ingestion throughput: our `ingest` stage (cleaning + dedup + split on) against a plain pyarrow read-and-write
of the same Parquet files (the floor any Parquet-to-Parquet step pays), target ratio >= 0.5; and the stage with
`ingest.workers=N` (a local Dask cluster, started and stopped inside each timed run) against one worker, target
>= 1.4x for 2 workers on 2 cores. `fanout on a running cluster` times the same against a cluster started once,
outside the timing (`ingest.dask_address`): the cost of the fan-out without the cluster's start-up.

    python -m bench.ingest [--quick] [--json] [--mb 64] [--repeats 3] [--workers 2] [--files 4]

Prints MB/s of document text for each and the ratios; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would skew the timing

from bench.common import add_repeat_args, alternate
from stages import corpus, fanout, ingest


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_repeat_args(ap, "small input (~16 MB), 3 repeats: under a minute on 2 cores")
    ap.add_argument("--mb", type=float, default=None, help="MB of input text (default 64, 16 with --quick)")
    ap.add_argument("--doc-bytes", type=int, default=2000, help="approximate document size (web text: ~2-5 KB)")
    ap.add_argument("--workers", type=int, default=2, help="ingest.workers of the fan-out runs (1: skip them)")
    ap.add_argument("--files", type=int, default=4, help="input Parquet files (the fan-out's units)")
    args = ap.parse_args()
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
