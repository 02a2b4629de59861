"""Reusing finished work: the one place where a stage decides that its outputs are already there.

A stage computes a key from what its outputs depend on (`work_key`), checks `finished(out_dir, key, outputs)` before
doing anything, and calls `mark_finished` once its outputs are in place. The record is written last and atomically,
so a run killed before the end leaves no record and is redone; a changed config or input changes the key.

    key = work_key(cfg, inputs={"model": model_dir}, extra={"format": FORMAT})
    if (done := finished(out_dir, key, outputs)) is not None:
        return done
    ... write outputs ...
    mark_finished(out_dir, key, result)

Resuming a half-finished run (training checkpoints) is the stage's own business; this module only skips work that
ended.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llm.files import sha256_tree, write_json
from stages.common import StageResult

RECORD = "result.json"
log = logging.getLogger("stages.reuse")


def work_key(cfg: BaseModel | Mapping[str, Any] | None = None, *, inputs: Mapping[str, Path | None] | None = None,
             extra: Mapping[str, Any] | None = None, exclude: set[str] | None = None) -> str:
    """sha256 of what a stage's outputs depend on: its config (minus `exclude`), the content of its input artifacts
    (files or folders, hashed by content so a copied input gives the same key) and any other `extra` facts."""
    if isinstance(cfg, BaseModel):
        cfg = cfg.model_dump(mode="json", exclude=exclude)
    elif cfg is not None and exclude:
        cfg = {k: v for k, v in cfg.items() if k not in exclude}
    content = {name: sha256_tree(p) for name, p in sorted((inputs or {}).items()) if p is not None}
    blob = json.dumps({"cfg": cfg, "inputs": content, "extra": dict(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def finished(out_dir: Path, key: str, outputs: Mapping[str, Path], plots: Mapping[str, Path] | None = None,
             check: Callable[[], bool] | None = None) -> StageResult | None:
    """The result of an earlier run with the same key whose outputs are all still there (and pass `check`)."""
    path = Path(out_dir) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("key") != key or not all(Path(p).exists() for p in outputs.values()):
        return None
    if check is not None and not check():
        return None
    log.info("%s already holds the outputs of an identical run; reusing them", out_dir)
    kept = {name: Path(p) for name, p in (plots or {}).items() if Path(p).is_file()}
    return StageResult(outputs=dict(outputs), metrics=record.get("metrics", {}), samples=record.get("samples", []),
                       plots=kept)


def mark_finished(out_dir: Path, key: str, result: StageResult) -> None:
    """Record that `result` is complete under `out_dir`; call it after every output is in place."""
    write_json(Path(out_dir) / RECORD, {"key": key, "metrics": result.metrics, "samples": result.samples})
