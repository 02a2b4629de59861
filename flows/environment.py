"""Checks of the environment a command needs, made before any pipeline work so that a broken one fails within
seconds with one line naming the fix (flows.errors prints it): a writable work dir with room on its disk, the
Prefect server given in PREFECT_API_URL, and the MLflow store."""

from __future__ import annotations

import errno
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from stages.common import StageError

PROBE_BYTES = 1 << 20  # a work dir that cannot take 1 MiB cannot take a checkpoint either


class EnvironmentProblem(StageError):
    """The machine is not set up for the command (the user fixes it; never retried)."""


def check_work_dir(work_dir: str | Path, hint: str, what: str = "work dir") -> Path:
    """The work dir exists (made if missing), is writable and has room for a 1 MiB file; `hint` says how to pick
    another one (e.g. `--set pipeline.work_dir=DIR`); `what` names the folder in messages."""
    work = Path(work_dir).resolve()
    probe = work / f".write-check-{os.getpid()}"
    try:
        work.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free_mb(work)
            raise EnvironmentProblem(
                f"no space left on the disk of the {what} {work} ({free} free); free some space or use a {what} "
                f"on another disk ({hint})") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            problem = "is on a read-only file system" if e.errno == errno.EROFS else "is not writable by this user"
            raise EnvironmentProblem(f"the {what} {work} {problem}; use a writable one ({hint})") from None
        raise EnvironmentProblem(f"cannot write to the {what} {work} ({e.strerror or e}); use another one "
                                 f"({hint})") from None
    return work


def _free_mb(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def check_prefect_api(timeout: float = 5.0) -> None:
    """When PREFECT_API_URL names a server, it answers its health check (else the flow would retry for minutes)."""
    api = os.environ.get("PREFECT_API_URL", "").strip().rstrip("/")
    if not api:
        return
    req = urllib.request.Request(f"{api}/health")
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - the user's own server URL
            if 200 <= r.status < 300:
                return
            problem = f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code}" + (" (wrong PREFECT_API_AUTH_STRING)" if e.code == 401 else "")
    except (OSError, ValueError) as e:
        problem = str(getattr(e, "reason", e))
    raise EnvironmentProblem(
        f"the Prefect server at PREFECT_API_URL={api} does not answer ({problem}); start it (`llm-pipeline up`), "
        "or unset PREFECT_API_URL to run with a temporary local one")


def check_tracking_store(work_dir: str | Path, offline: bool = False) -> str:
    """The MLflow store this process would log to answers and is created (once, under its lock); its URI."""
    from flows.store import kind, prepare_store
    from flows.tracking import check_server, embedded_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or embedded_uri(work_dir)
    if kind(uri) == "http":
        if not offline:
            check_server(uri)
        return uri
    prepare_store(uri)
    return uri
