"""Advisory file locks shared by every process on one machine (the work dir's `locks/` folder and the store's).

The OS drops a lock when its process dies, so a killed run never leaves one behind. Machines do not share these
locks, so inside a Prefect run a stage's lock is also a Prefect global concurrency limit of one slot (`stage_lock`):
runs on different machines against one Prefect server then compute a stage once too.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)
# A held slot is leased and renewed while its process lives; a dead holder's slot frees itself after this.
LEASE_S = 300.0


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing), waiting for other holders."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def try_lock(f: IO[str]) -> bool:
    """Take an exclusive lock on the open file `f` without waiting; False when another holder has one (or the
    platform has no advisory locks, so that nothing is ever taken for abandoned)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _in_prefect_run() -> bool:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _enter_prefect_limit(name: str) -> Any:
    """Take the one slot of the global concurrency limit `name` (created on first use); returns the entered
    context, or None when not in a Prefect run or the API cannot be reached (this machine's lock still holds)."""
    if not _in_prefect_run():
        return None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                except Exception:  # another run created it at the same moment (a conflict, or a 500 on SQLite)
                    client.read_global_concurrency_limit_by_name(name)
        cm = concurrency(name, occupy=1, lease_duration=LEASE_S, strict=True,
                         raise_on_lease_renewal_failure=False)  # a Prefect outage must not stop a training stage
        cm.__enter__()
        return cm
    except Exception as e:
        log.warning("no Prefect concurrency limit %s (%s); only this machine's lock keeps the stage from running "
                    "twice", name, e)
        return None


@contextlib.contextmanager
def stage_lock(work_dir: Path, stage: str, key: str) -> Iterator[None]:
    """Held while one process computes `stage` for cache key `key`: a file lock for the processes of this
    machine, and inside a Prefect run a one-slot global concurrency limit `llm-stage-<stage>-<key>` for runs on
    other machines served by the same Prefect server. Another holder is waited for."""
    with file_lock(work_dir / "locks" / f"{stage}-{key[:32]}.lock"):
        cm = _enter_prefect_limit(re.sub(r"[^a-z0-9-]", "-", f"llm-stage-{stage}-{key[:16]}".lower()))
        try:
            yield
        finally:
            if cm is not None:
                try:
                    cm.__exit__(None, None, None)
                except Exception as e:  # the lease runs out by itself
                    log.warning("could not release the Prefect concurrency slot: %s", e)
