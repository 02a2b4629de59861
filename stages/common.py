"""What every stage shares: the result type, the tracker protocol, user-facing errors (a full disk among them) and
the device a stage setting names.

Atomic writes and hashing live in `llm.files`; they are re-exported here because every stage uses them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

from pydantic import BaseModel

from llm.files import atomic_dir, atomic_file, fsync_dir, sha256_file, sha256_tree, write_json

__all__ = ["DISK_FULL_ERRNOS", "ListTracker", "NullTracker", "StageError", "StageResult", "Tracker", "TransientError",
           "atomic_dir", "atomic_file", "disk_full_error", "fingerprint", "fsync_dir", "read_json", "remove_stale", "require_path",
           "sha256_file", "sha256_tree", "sizes_match", "stage_device", "stop_when_disk_full", "write_json"]


class StageError(Exception):
    """An error the user can fix (bad config, bad data, missing artifact).

    Deterministic: the orchestration layer never retries it. The message names the file/field and the fix.
    """


class TransientError(Exception):
    """A failure worth retrying (tracking server or storage hiccup)."""


class Tracker(Protocol):
    """The only way a stage reports progress. The flow layer backs it with MLflow; tests use `ListTracker`."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...


class NullTracker:
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass


class ListTracker:
    """Keeps every logged metric in memory; handy in tests and notebooks."""

    def __init__(self) -> None:
        self.history: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.history.append((step, {k: float(v) for k, v in metrics.items()}))

    def series(self, name: str) -> list[float]:
        return [m[name] for _, m in self.history if name in m]


@dataclass
class StageResult:
    """What a stage hands back to whoever called it.

    outputs: named artifacts (files or folders) written under the stage's `out_dir`.
    metrics: final metrics, e.g. {"eval/exact_match": 0.62}.
    samples: rows of a small table (e.g. prompt / response / expected) shown as a sample table.
    plots: named PNG files under `out_dir` (loss curves, ...).
    """

    outputs: dict[str, Path]
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)


def read_json(path: str | Path, what: str = "file", producer: str = "the stage that produces it") -> Any:
    """Parse a JSON file another stage wrote; a missing or broken one is a StageError saying to rerun `producer`."""
    p = Path(path)
    if not p.exists():
        raise StageError(f"{what} {p} does not exist; run {producer} first.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{what} {p} is not valid JSON ({e}); delete it and rerun {producer}.") from e


def require_path(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise StageError(f"{what} not found at {p}; pass the output of the upstream stage.")
    return p


def stage_device(name: str, setting: str) -> torch.device:
    """`llm.device.resolve_device` for a stage setting: a device the machine lacks is a StageError naming it."""
    from llm.device import (
        resolve_device,  # here, not at the top: the CLI imports this module and must stay light
    )

    try:
        return resolve_device(name, setting)
    except ValueError as e:
        raise StageError(str(e)) from e


# Out of space, out of quota, or over a file-size limit: the user must make room; retrying will not help.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full_error(e: OSError, where: Path) -> StageError:
    return StageError(f"disk full while writing {where} ({e.strerror or e}); free space on that disk (or move the "
                      f"work directory) and rerun. Nothing under the final name was touched.")


@contextlib.contextmanager
def stop_when_disk_full(where: Path) -> Iterator[None]:
    """Turn a full disk inside the block into a StageError naming `where` (other OSErrors pass through)."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(e, where) from e
        raise


def remove_stale(out_dir: Path, names: tuple[str, ...]) -> None:
    """Remove the temporary folders a killed run left for `names` (atomic_dir's `.<name>.*.tmp`); they never sit
    under a final name, so nothing finished is lost."""
    for name in names:
        for stale in Path(out_dir).glob(f".{name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def fingerprint(cfg: BaseModel | Mapping[str, Any] | None = None, *, inputs: Mapping[str, Path | None] | None = None,
                extra: Mapping[str, Any] | None = None, exclude: set[str] | None = None) -> str:
    """sha256 of what a piece of work depends on: a config (minus `exclude`), the content of input files or folders
    and other `extra` facts. Stages stamp partial work with it, so an interrupted attempt is resumed only by the same
    job; whether a finished stage reruns at all is the flow layer's decision (flows.finished)."""
    if isinstance(cfg, BaseModel):
        cfg = cfg.model_dump(mode="json", exclude=exclude)
    elif cfg is not None and exclude:
        cfg = {k: v for k, v in cfg.items() if k not in exclude}
    content = {name: sha256_tree(p) for name, p in sorted((inputs or {}).items()) if p is not None}
    blob = json.dumps({"cfg": cfg, "inputs": content, "extra": dict(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def sizes_match(folder: Path, entries: Iterable[Mapping[str, Any]]) -> bool:
    """Each {"file", "bytes"} entry of a manifest is there at its recorded size: a cheap check that a sharded output
    an earlier attempt left is whole (the stage reading the shards verifies their sha256)."""
    for entry in entries:
        p = Path(folder) / entry["file"]
        if not p.exists() or p.stat().st_size != entry["bytes"]:
            return False
    return True
