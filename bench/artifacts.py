"""Bytes stored against bytes of distinct content after a pipeline run (issue 31): one copy of every output.

    .venv/bin/python -m bench.artifacts [--config configs/tiny.yaml] [--quick] [--s3] [--json]
    .venv/bin/python -m bench.artifacts --work-dir DIR          # measure an existing work dir (embedded store)

Runs `llm-pipeline run` in a fresh work dir and prints the bytes stored across the work dir, the artifact root and
the MLflow store, each file counted once however many hard links it has, against the bytes of distinct content
(the same files deduplicated by sha256). Target: at most 1.2x. With --s3 the artifact root is a bucket of an S3 API
server on 127.0.0.1 (moto's server mode): its objects count as stored, and the work dir's cache of outputs read
from the bucket is reported separately. The largest duplicated contents are listed with where they are.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "llm-artifacts"
TARGET = 1.2


def _sha(read: Any) -> str:
    h = hashlib.sha256()
    while block := read(1 << 22):
        h.update(block)
    return h.hexdigest()


def _area(rel: Path) -> str:
    top = rel.parts[0] if rel.parts else ""
    if top == "artifacts":
        return "artifact root"
    if top in ("mlartifacts", "mlflow.db"):
        return "MLflow store"
    return "rest of the work dir"


def measure(work: Path, fs: Any = None, bucket_path: str = "") -> dict[str, Any]:
    """Stored bytes (hard links once) and distinct bytes (by sha256) of the work dir, minus its cache, plus the
    objects under `bucket_path` of `fs` when given; the cache is measured on its own."""
    seen: set[tuple[int, int]] = set()
    areas: dict[str, int] = {}
    content: dict[str, tuple[int, list[str]]] = {}
    cache_bytes = 0

    def add(area: str, size: int, sha: str, where: str) -> None:
        areas[area] = areas.get(area, 0) + size
        content.setdefault(sha, (size, []))[1].append(where)

    for f in sorted(work.rglob("*")):
        if f.is_symlink() or not f.is_file():
            continue
        rel = f.relative_to(work)
        st = f.stat()
        if rel.parts[0] == "cache":
            cache_bytes += st.st_size
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with open(f, "rb") as fh:
            add(_area(rel), st.st_size, _sha(fh.read), str(rel))
    if fs is not None:
        fs.invalidate_cache()
        for path, info in sorted(fs.find(bucket_path, detail=True).items()):
            with fs.open(path, "rb") as fh:
                add("S3 bucket", int(info["size"]), _sha(fh.read), f"s3://{path}")
    stored = sum(areas.values())
    distinct = sum(size for size, _ in content.values())
    dups = sorted(((size * (len(w) - 1), w) for size, w in content.values() if len(w) > 1), reverse=True)[:6]
    return {"stored_bytes": stored, "distinct_bytes": distinct, "ratio": round(stored / max(distinct, 1), 4),
            "areas": areas, "cache_bytes": cache_bytes, "duplicates": [{"extra_bytes": n, "where": w[:4]}
                                                                       for n, w in dups]}


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """An S3 API server on 127.0.0.1 (moto's server mode) with an empty bucket; yields the environment a client
    needs (credentials are moto's test values)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        bucket_fs().mkdir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def bucket_fs() -> Any:
    """An s3fs file system for the server `s3_server` started (reading the environment it set)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def run_pipeline(config: Path, work: Path, env: dict[str, str], *sets: str) -> tuple[subprocess.CompletedProcess,
                                                                                       float]:
    """`llm-pipeline run` of `config` in `work` (embedded MLflow store, a temporary Prefect server)."""
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    argv = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--set", f"pipeline.work_dir={work}"]
    for s in sets:
        argv += ["--set", s]
    t0 = time.monotonic()
    r = subprocess.run(argv, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=3600)
    return r, time.monotonic() - t0


def _print(name: str, m: dict[str, Any]) -> None:
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    print(f"{name}: stored {mb(m['stored_bytes'])} for {mb(m['distinct_bytes'])} of distinct content: "
          f"{m['ratio']:.3f}x (target <= {TARGET}x)")
    for area, n in sorted(m["areas"].items()):
        print(f"  {area:<22} {mb(n)}")
    print(f"  {'cache (separately)':<22} {mb(m['cache_bytes'])}")
    for d in m["duplicates"]:
        print(f"  duplicate +{mb(d['extra_bytes'])}: {', '.join(d['where'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--quick", action="store_true", help="configs/smoke.yaml (about a minute on 2 cores)")
    parser.add_argument("--s3", action="store_true", help="the artifact root in a bucket of a local S3 API server")
    parser.add_argument("--work-dir", type=Path, help="measure this work dir instead of running a pipeline")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    config = ROOT / "configs" / "smoke.yaml" if args.quick else Path(args.config)
    result: dict[str, Any] = {"bench": "artifacts", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                              "date": time.strftime("%Y-%m-%d")}
    if args.work_dir:
        result.update(config=str(args.work_dir), **measure(args.work_dir.resolve()))
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-artifacts-")) / "work"
        with s3_server() if args.s3 else contextlib.nullcontext({}) as env:
            sets = [f"pipeline.artifact_root=s3://{BUCKET}/root"] if args.s3 else []
            r, wall = run_pipeline(config, work, env, *sets)
            if r.returncode != 0:
                sys.exit(f"the pipeline failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
            m = measure(work, bucket_fs() if args.s3 else None, BUCKET)
        result.update(config=config.name + (" --s3" if args.s3 else ""), pipeline_s=round(wall, 1), work_dir=str(work),
                      **m)
    _print(result["config"], result)
    if args.json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
