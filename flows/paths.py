"""Checks on names that come from outside (MLflow tags, the command line, a stage's result) before they touch the
file system: artifact paths stay relative, files stay inside their folder, run ids are plain ids."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from stages.common import StageError

SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # an output name, used as a folder name
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def safe_artifact_path(rel: str, what: str = "artifact path") -> str:
    """An artifact path relative to its run: posix, no absolute path, no `..`; anything else is refused."""
    if not rel or "\\" in rel or "\0" in rel:
        raise StageError(f"{what} {rel!r} is not a plain relative path; refusing to use it")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")) or rel.startswith("~"):
        raise StageError(f"{what} {rel!r} would escape its folder (absolute or '..'); refusing to use it")
    return p.as_posix()


def check_inside(path: Path, root: Path, what: str) -> Path:
    """`path` (symlinks resolved) must lie under `root`; a StageError names it otherwise."""
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise StageError(f"{what} {path} resolves to {real}, outside {root}; refusing to use it")
    return real


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise StageError(f"{run_id!r} is not an MLflow run id (letters, digits, '-', '_'); pass e.g. --from-run <id>")
    return run_id
