"""Reusing finished work: the one place where a stage decides that its outputs are already there.

A stage computes a key from what its outputs depend on (`work_key`), checks `finished(out_dir, key, outputs)` before
doing anything, and calls `mark_finished` once its outputs are in place. The record is written last and atomically,
so a run killed before the end leaves no record and is redone; a changed config or input changes the key.

    key = work_key(cfg, inputs={"model": model_dir}, extra={"format": FORMAT})
    if (done := finished(out_dir, key, outputs)) is not None:
        return done
    ... write outputs ...
    mark_finished(out_dir, key, result)

A stage with outputs that are reused independently (ingest's corpus and tasks) keeps one record per output, named by
`record=`. A record that does not match is removed as soon as `finished` says so: the caller is about to overwrite
the outputs it describes, and a run killed after replacing them must not leave the old record next to new outputs.

Resuming a half-finished run (training checkpoints) is the stage's own business; this module only skips work that
ended.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
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
             check: Callable[[], bool] | None = None, record: str = RECORD) -> StageResult | None:
    """The result of an earlier run with the same key whose outputs are all still there (and pass `check`).

    `check` verifies what existence cannot (shard sizes, a hash the outputs carry); it runs only when the key
    matches and every output exists.
    """
    path = Path(out_dir) / record
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        saved = None
    if (saved is None or saved.get("key") != key or not all(Path(p).exists() for p in outputs.values())
            or (check is not None and not check())):
        path.unlink(missing_ok=True)
        return None
    log.info("%s already holds the outputs of an identical run; reusing them", out_dir)
    kept = {name: Path(p) for name, p in (plots or {}).items() if Path(p).is_file()}
    return StageResult(outputs=dict(outputs), metrics=saved.get("metrics", {}), samples=saved.get("samples", []),
                       plots=kept)


def mark_finished(out_dir: Path, key: str, result: StageResult, record: str = RECORD) -> None:
    """Record that `result` is complete under `out_dir`; call it after every output is in place."""
    write_json(Path(out_dir) / record, {"key": key, "metrics": result.metrics, "samples": result.samples})


def sizes_match(folder: Path, entries: Iterable[Mapping[str, Any]]) -> bool:
    """Each {"file", "bytes"} entry of a manifest is there at its recorded size: a cheap `check` for sharded outputs
    that catches a truncated or deleted shard (the stage reading the shards verifies their sha256)."""
    for entry in entries:
        p = Path(folder) / entry["file"]
        if not p.exists() or p.stat().st_size != entry["bytes"]:
            return False
    return True
