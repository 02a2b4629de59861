"""Multi-process pretraining from inside the stage, with PyTorch's elastic launcher (the engine behind torchrun).

The stage process stays the one MLflow knows: it starts the workers (`elastic_launch`, one agent per machine),
rank 0 appends its metrics to a file that a thread here forwards to the stage's tracker (per-step losses, evals,
MFU, the final metrics; the other ranks log nothing), and rank 0 writes the outputs and the finished record as in a
one-process run, so caching and lineage do not change. A worker that fails (an exception, or killed) ends the
launch; the stage then fails with that rank's error, and a rerun resumes from the last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from stages.common import StageError, Tracker

log = logging.getLogger(__name__)

METRICS_FILE = ".rank0-metrics.jsonl"


class LaunchSettings(BaseModel):
    """How many worker processes train: one per device on each machine, like torchrun's flags."""

    nproc_per_node: int = Field(1, ge=1, description="Worker processes on this machine (one per GPU; gloo "
                                "processes on CPU). >1 launches them from the stage with PyTorch's elastic launcher.")
    nnodes: int = Field(1, ge=1, description="Machines taking part: node 0 runs the stage, each other machine "
                        "`python -m stages.pretrain` with the same settings, its own node_rank and --out set to the "
                        "stage's output folder, on storage every machine sees at the same path (all ranks write "
                        "their part of each checkpoint there).")
    node_rank: int = Field(0, ge=0, description="This machine's rank among nnodes (0 logs and writes outputs).")
    rdzv_endpoint: str = Field("", description="host:port where the machines meet (node 0's address) when "
                               "nnodes > 1; empty = a free port on 127.0.0.1 for one machine.")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def should_launch(cfg: LaunchSettings) -> bool:
    """True in the stage process when more than one worker is asked for (never inside a worker)."""
    return cfg.world_size > 1 and "TORCHELASTIC_RUN_ID" not in os.environ and "RANK" not in os.environ


class FileTracker:
    """A worker's tracker: one JSON line per call, flushed at once so the stage process sees it promptly."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        line = json.dumps({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class _Forwarder(threading.Thread):
    """Tails rank 0's metrics file into the stage's tracker until stopped, then delivers what is left."""

    def __init__(self, path: Path, tracker: Tracker) -> None:
        super().__init__(name="rank0-metrics", daemon=True)
        self.path, self.tracker = path, tracker
        self.offset = 0
        self.done = threading.Event()

    def _drain(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.offset)
                while (line := f.readline()).endswith("\n"):  # a line still being written waits for the next pass
                    self.offset = f.tell()
                    rec = json.loads(line)
                    self.tracker.log_metrics(rec["metrics"], step=rec["step"])
        except FileNotFoundError:
            pass

    def run(self) -> None:
        while not self.done.wait(0.5):
            self._drain()
        self._drain()


def _endpoint(cfg: LaunchSettings) -> tuple[str, str, dict[str, Any]]:
    """(rendezvous backend, endpoint, its configs)."""
    if cfg.nnodes == 1 and not cfg.rdzv_endpoint:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return "c10d", f"127.0.0.1:{s.getsockname()[1]}", {}
    if not cfg.rdzv_endpoint or ":" not in cfg.rdzv_endpoint:
        raise StageError(f"pretrain.nnodes={cfg.nnodes}: set pretrain.rdzv_endpoint to host:port of node 0 (a "
                         "free port every machine can reach), and pretrain.node_rank on each machine.")
    if cfg.node_rank >= cfg.nnodes:
        raise StageError(f"pretrain.node_rank={cfg.node_rank} must be below pretrain.nnodes={cfg.nnodes}.")
    # static rendezvous: each machine knows its rank, as with torchrun --node-rank
    return "static", cfg.rdzv_endpoint, {"rank": cfg.node_rank}


def _run_id(cfg: LaunchSettings, endpoint: str) -> str:
    """The rendezvous id: the machines' agents meet under it in node 0's store, so every node must derive the same
    one from what they share (the endpoint and the sizes); one machine alone gets a fresh one per launch."""
    if cfg.nnodes == 1:
        return f"pretrain-{uuid.uuid4().hex[:12]}"
    shared = f"{endpoint}/{cfg.nnodes}x{cfg.nproc_per_node}"
    return "pretrain-" + hashlib.sha256(shared.encode()).hexdigest()[:12]


def _failure_message(err: Any) -> str:
    """'rank N (exit code C): <its error>' for the first failed worker."""
    rank, failure = err.get_first_failure()
    msg = failure.message
    if isinstance(msg, dict):  # an error file written by the worker's @record handler
        msg = msg.get("message", msg)
        if isinstance(msg, dict):
            msg = msg.get("message") or json.dumps(msg)[:2000]
    text = str(msg or "").strip()
    if failure.exitcode is not None and failure.exitcode < 0 and not text.startswith("Signal"):
        text = f"killed by signal {-failure.exitcode}. {text}".strip()
    return f"rank {rank} (exit code {failure.exitcode}): {text[-2000:] or 'no error message'}"


def launch(cfg: LaunchSettings, out_dir: Path, tracker: Tracker, worker: Callable[..., Any], *args: Any) -> None:
    """Run `worker(*args, metrics_path)` on every rank; returns when all finished, else raises StageError."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if getattr(cfg, "device", "auto") != "cpu" and torch.cuda.is_available():
        if cfg.nproc_per_node > torch.cuda.device_count():
            raise StageError(f"pretrain.nproc_per_node={cfg.nproc_per_node} but this machine has "
                             f"{torch.cuda.device_count()} GPUs; use one process per GPU.")
    backend, endpoint, rdzv_configs = _endpoint(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / METRICS_FILE
    metrics.unlink(missing_ok=True)
    config = LaunchConfig(
        min_nodes=cfg.nnodes, max_nodes=cfg.nnodes, nproc_per_node=cfg.nproc_per_node,
        run_id=_run_id(cfg, endpoint), rdzv_backend=backend, rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs, max_restarts=0, monitor_interval=0.5, start_method="spawn",
    )
    log.info("pretrain: launching %d worker processes on this machine (%d in all, rendezvous %s %s)",
             cfg.nproc_per_node, cfg.world_size, backend, endpoint)
    forwarder = _Forwarder(metrics, tracker)
    forwarder.start()
    # One share of the CPU threads per worker unless set: n processes each using every core would oversubscribe
    # the machine. The workers inherit the environment at spawn; this process's own is restored after.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node)))
    # The agent logs a worker's failure with its own traceback; the StageError below says it once, plainly.
    quiet = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, worker)(*args, str(metrics))
    except ChildFailedError as e:
        raise StageError(f"pretrain worker {_failure_message(e)}. Rerun the stage to resume from the last "
                         "complete checkpoint.") from None
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
        forwarder.done.set()
        forwarder.join()
