"""Advisory file locks shared by every process on one machine (the work dir's `locks/` folder and the store's).

The OS drops a lock when its process dies, so a killed run never leaves one behind. Machines do not share these
locks. Prefect's global concurrency limits would, but in Prefect 3.9 a slot's lease lives in the memory of the
server process that granted it: a holder killed, or a server restarted, leaves the slot taken for good, and every
later run of that stage would wait forever. So runs on different machines may compute the same stage twice (the
second finished run is simply the newer cache entry); they never corrupt one another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO


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


@contextlib.contextmanager
def stage_lock(work_dir: Path, stage: str, key: str) -> Iterator[None]:
    """Held while one process of this machine computes `stage` for cache key `key`; another one waits."""
    with file_lock(work_dir / "locks" / f"{stage}-{key[:32]}.lock"):
        yield
