"""What every stage shares: the result type, the tracker protocol, atomic writes, hashing, and user-facing errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Content hash of a file or a folder (relative paths + file contents, sorted), stable across machines."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f.relative_to(p).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Write to `path` through a temporary sibling; rename into place only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are shared (MLflow server, other users)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary sibling name; swap it into place only when the block succeeds.

    An existing folder at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs are shared (MLflow server, other users)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    p = Path(path)
    if not p.exists():
        raise StageError(f"{what} {p} does not exist; run the stage that produces it first.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{what} {p} is not valid JSON ({e}); delete it and rerun the stage that wrote it.") from e


def require_path(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise StageError(f"{what} not found at {p}; pass the output of the upstream stage.")
    return p
