"""The record that a stage's computation finished, written by the flow layer beside the outputs in the stage's
scratch folder before they are stored.

Reuse is decided in one place, `flows.stage_runner.run_stage`: a FINISHED MLflow run with the same cache key
whose stored outputs are whole is reused; otherwise the stage executes in `<work dir>/stages/<stage>/<key>`. When
that folder already holds this record for the same key, an earlier attempt computed everything and then died
(killed while uploading, tracking server gone, offline-tracking fallback): its outputs are stored under a new run
without computing them again. Stages never decide reuse; they only resume their own checkpoints.

The record lists every output file with its size, so a file removed or cut short since is caught and the stage
computes again; the outputs' sha256 manifest is made when they are stored (flows.outputs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm.files import atomic_file
from stages.common import StageResult

RECORD = "finished.json"
log = logging.getLogger(__name__)


def _files(outputs: Mapping[str, Path], out_dir: Path) -> dict[str, int]:
    files: dict[str, int] = {}
    for path in outputs.values():
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[f.relative_to(out_dir).as_posix()] = f.stat().st_size
    return files


def write_finished(out_dir: Path, key: str, result: StageResult, outputs: Mapping[str, Path]) -> None:
    """Record that `result` (whose checked `outputs` lie in `out_dir`) is complete for cache key `key`."""
    out_dir = out_dir.resolve()
    outputs = {name: Path(p).resolve() for name, p in outputs.items()}
    rel = {name: p.relative_to(out_dir).as_posix() for name, p in outputs.items()}
    plots = {name: Path(p).resolve().relative_to(out_dir).as_posix() for name, p in result.plots.items()
             if Path(p).resolve().is_relative_to(out_dir)}
    record = {"key": key, "outputs": rel, "files": _files(outputs, out_dir), "plots": plots,
              "metrics": result.metrics, "samples": result.samples}
    with atomic_file(out_dir / RECORD, "w") as f:
        json.dump(record, f, default=str)


def read_finished(out_dir: Path, key: str) -> StageResult | None:
    """The result an earlier attempt recorded for `key` in `out_dir`, if every output file is still there at its
    recorded size; None (and the record removed) otherwise."""
    path = out_dir / RECORD
    try:
        saved: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    whole = saved.get("key") == key and all(
        (out_dir / f).is_file() and (out_dir / f).stat().st_size == size for f, size in saved["files"].items())
    if not whole or not all((out_dir / p).exists() for p in saved["outputs"].values()):
        path.unlink(missing_ok=True)
        return None
    plots = {name: out_dir / p for name, p in saved.get("plots", {}).items() if (out_dir / p).is_file()}
    return StageResult(outputs={name: out_dir / p for name, p in saved["outputs"].items()},
                       metrics=saved.get("metrics", {}), samples=saved.get("samples", []), plots=plots)
