"""What every stage shares: the result type, the tracker protocol and user-facing errors.

Atomic writes and hashing live in `llm.files`; they are re-exported here because every stage uses them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llm.files import atomic_dir, atomic_file, fsync_dir, sha256_file, sha256_tree, write_json

__all__ = ["ListTracker", "NullTracker", "StageError", "StageResult", "Tracker", "TransientError", "atomic_dir",
           "atomic_file", "fsync_dir", "read_json", "require_path", "sha256_file", "sha256_tree", "write_json"]


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
