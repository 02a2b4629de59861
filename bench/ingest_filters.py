"""The quality modes of `bench.ingest`.

`--filters`: ingest of generated web-like text (`bench.web_corpus`: templated pages, 5 % planted near-copies, 2 %
exact copies, 5 % junk pages) with every filter on (`ingest.quality` with the language filter, and
`ingest.near_dedup`) against the same ingest with them off: throughput ratio, the peak memory of each ingest (a
fresh process that imports only the stage: its RSS high-water mark, and with `--workers` > 1 the sampled peak of the
whole process tree, Dask's worker processes included) against `ingest.memory_budget_mb` and the stage's own
estimate (`ingest_quality.plan_memory`, which lowers `--workers` when the budget cannot hold them), and what the
filters removed.

`--near-dup`: precision and recall of near-duplicate removal on its own: unrelated templated pages with near-copies
of 10 % of them (each `--change` share of the words replaced at random positions), how many copies are removed and
how many unrelated pages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench.web_corpus import near_dup_corpus, web_stream
from stages import ingest
from stages.data import ingest_quality
from stages.data.readers import split_units

ROOT = Path(__file__).resolve().parent.parent
# What `--filters` turns on: everything, or only the part whose state grows with the corpus (`--only-near-dedup`:
# the quality filters hold nothing between batches, so their memory does not depend on the corpus size).
ALL_ON = {"quality": {"enabled": True, "language": {"enabled": True}}, "near_dedup": {"enabled": True}}
NEAR_DEDUP_ON = {"near_dedup": {"enabled": True}}

_CHILD = """
import json, sys, time
from stages import ingest
cfg = ingest.Config.model_validate(json.loads(sys.argv[1]))
t0 = time.perf_counter()
res = ingest.run(cfg, None, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0, "metrics": res.metrics}))
"""


def write_web_corpus(folder: Path, target_mb: float, n_files: int, seed: int = 0) -> tuple[list[Path], int, Counter]:
    """`n_files` Parquet files of web-like documents, `target_mb` MB of text in all, written as generated (a corpus
    of gigabytes never sits in memory); (files, text bytes, documents by kind)."""
    per_file = target_mb * 1e6 / n_files
    stream = web_stream(seed, copy_share=0.05, dup_share=0.02, junk_share=0.05)
    files, kinds, total = [], Counter(), 0
    schema = pa.schema([("text", pa.string())])
    for i in range(n_files):
        path = folder / f"web-{i:03d}.parquet"
        size = 0
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            while size < per_file:
                block = [next(stream) for _ in range(1000)]
                kinds.update(d.kind for d in block)
                size += sum(len(d.text.encode()) for d in block)
                writer.write_table(pa.table({"text": [d.text for d in block]}, schema=schema))
        files.append(path)
        total += size
    return files, total, kinds


def ingest_child(config: dict, out: Path) -> dict:
    """One ingest in a fresh interpreter: wall seconds, metrics, the process's peak RSS and the sampled peak RSS of
    its whole tree (MB)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(config), str(out)], stdout=subprocess.PIPE,
                            env=env, cwd=ROOT)
    peak_tree, done = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        me, t0, ticks = psutil.Process(proc.pid), time.perf_counter(), 0
        while not done.wait(0.5):
            try:
                tree = [me, *me.children(recursive=True)]
                peak_tree = max(peak_tree, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
            except psutil.Error:
                continue
            ticks += 1
            if ticks % 600 == 0:  # a long run shows its memory so far, in case it is stopped before the end
                print(f"  {time.perf_counter() - t0:.0f} s: peak RSS of the process tree so far {peak_tree:.0f} MB",
                      flush=True)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"the ingest into {out} failed (exit {os.waitstatus_to_exitcode(status)}); see above")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    return {**result, "peak_rss_mb": usage.ru_maxrss / 1024, "peak_tree_mb": max(peak_tree, usage.ru_maxrss / 1024)}


def memory_plan(config: dict) -> ingest_quality.MemoryPlan:
    """What the ingest will run with under its memory budget (`ingest_quality.plan_memory`, the stage's own plan):
    the worker processes and the estimated peak of the process tree."""
    cfg = ingest.Config.model_validate(config)
    quiet = logging.getLogger("stages.ingest")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the ingest itself says when it lowers the workers
    try:
        return ingest_quality.plan_memory(cfg, split_units(cfg.sources))
    finally:
        quiet.setLevel(level)


def _processes(workers: int) -> str:
    return "one process" if workers == 1 else f"{workers} worker processes"


def _removed_by_filter(metrics: dict) -> dict[str, int]:
    by = Counter()
    for k, v in metrics.items():
        if k.startswith("dropped/"):
            by[k.removeprefix("dropped/").split(".")[0]] += int(v)
    return dict(sorted(by.items()))


def filters_main(args: argparse.Namespace) -> dict:
    mb = args.mb or (32 if args.quick else 1024)
    budget = args.memory_budget_mb
    with tempfile.TemporaryDirectory(prefix="bench-ingest-filters-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        files, size, kinds = write_web_corpus(work, mb, args.files)
        print(f"wrote {size / 1e6:.0f} MB of text, {sum(kinds.values())} documents ({dict(kinds)}) in "
              f"{len(files)} Parquet files in {time.perf_counter() - t0:.0f} s", flush=True)
        base = {"sources": [{"type": "files", "paths": [str(f) for f in files]}], "memory_budget_mb": budget}
        runs, planned = {}, {}
        on = NEAR_DEDUP_ON if args.only_near_dedup else ALL_ON
        for name, extra in (("off", {}), ("on", {**on, "workers": args.workers})):
            planned[name] = memory_plan({**base, **extra})
            runs[name] = ingest_child({**base, **extra}, work / f"out-{name}")
            shutil.rmtree(work / f"out-{name}")
            r = runs[name]
            print(f"filters {name}: {size / 1e6 / r['seconds']:.2f} MB/s ({r['seconds']:.0f} s), peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB (process tree {r['peak_tree_mb']:.0f} MB; estimated "
                  f"{planned[name].estimate_mb:.0f} MB, {_processes(planned[name].workers)}), "
                  f"{r['metrics']['rows']:.0f} documents kept", flush=True)
    on, off = runs["on"], runs["off"]
    result = {
        "bench": "ingest-filters", "input_mb": round(size / 1e6, 1), "documents": dict(kinds), "cpus": os.cpu_count(),
        "on": "near_dedup" if args.only_near_dedup else "all", "workers_on": args.workers,
        "workers_on_run": planned["on"].workers, "estimate_mb_on": round(planned["on"].estimate_mb), "off_mb_s": round(size / 1e6 / off["seconds"], 2),
        "on_mb_s": round(size / 1e6 / on["seconds"], 3), "ratio": round(off["seconds"] / on["seconds"], 4),
        "peak_rss_mb_off": round(off["peak_rss_mb"]), "peak_rss_mb_on": round(on["peak_rss_mb"]),
        "peak_tree_mb_on": round(on["peak_tree_mb"]), "memory_budget_mb": budget,
        "rows_off": int(off["metrics"]["rows"]), "rows_on": int(on["metrics"]["rows"]),
        "removed_on": _removed_by_filter(on["metrics"]),
    }
    peak = max(result["peak_rss_mb_on"], result["peak_tree_mb_on"])
    print(f"ratio on/off: {result['ratio']:.4f}; removed with filters on: {result['removed_on']}")
    print(f"peak memory with filters on: {peak} MB ({'under' if peak < budget else 'OVER'} the {budget} MB budget)")
    return result


def near_dup_main(args: argparse.Namespace) -> dict:
    pages = args.pages or (3000 if args.quick else 20000)
    rows = []
    for change in args.change:
        with tempfile.TemporaryDirectory(prefix="bench-near-dup-") as tmp:
            work = Path(tmp)
            docs = list(near_dup_corpus(pages, copy_share=0.1, change=change, seed=11))
            src = work / "web.jsonl"
            src.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
            cfg = {"sources": [{"type": "files", "paths": [str(src)]}], "near_dedup": {"enabled": True}}
            run = ingest_child(cfg, work / "out")
            kept = {t for shard in sorted((work / "out" / "corpus").glob("*.parquet"))
                    for t in pq.read_table(shard, columns=["text"]).column(0).to_pylist()}
        page_texts = {d.text for d in docs if d.kind == "page"}
        copy_texts = {d.text for d in docs if d.kind == "copy"}
        removed_copies, removed_pages = len(copy_texts - kept), len(page_texts - kept)
        rows.append({"change": change, "pages": len(page_texts), "copies": len(copy_texts),
                     "copies_removed": round(removed_copies / len(copy_texts), 4),
                     "pages_removed": round(removed_pages / len(page_texts), 5),
                     "precision": round(removed_copies / max(1, removed_copies + removed_pages), 4),
                     "seconds": round(run["seconds"], 1)})
        r = rows[-1]
        print(f"{change:.0%} of the words changed: {removed_copies}/{len(copy_texts)} copies removed "
              f"({r['copies_removed']:.1%}), {removed_pages}/{len(page_texts)} unrelated pages removed "
              f"({r['pages_removed']:.2%}), {r['seconds']} s", flush=True)
    return {"bench": "ingest-near-dup", "config": "ngram 5, 32 bands x 4 rows, threshold 0.5 (the defaults)",
            "rows": rows}
