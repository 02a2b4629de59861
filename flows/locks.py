"""Advisory file locks shared by every process on one machine (the work dir's `locks/` folder and the store's).

The OS drops a lock when its process dies, so a killed run never leaves one behind. Machines do not share these
locks. Prefect's global concurrency limits would, but in Prefect 3.9 a slot's lease lives in the memory of the
server process that granted it: a holder killed, or a server restarted, leaves the slot taken for good, and every
later run of that stage would wait forever. So runs on different machines may compute the same stage twice (the
second finished run is simply the newer cache entry); they never corrupt one another.

A process of ours that takes a lock writes who it is into the lock file (pid, command, since when). Another process
of ours that finds the lock taken says once what it waits for and who holds it, and waits for as long as that
holder lives: computing a stage takes what it takes. A lock held by anything else (a process that left no record,
or a record that names a process which is not the holder) is waited on for at most `lock_timeout_s()` seconds
(LLM_PIPELINE_LOCK_TIMEOUT_S), then `LockTimeoutError` names the lock file and, where the system says, the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from stages.common import StageError

log = logging.getLogger(__name__)

LOCK_TIMEOUT_ENV = "LLM_PIPELINE_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 120.0
_OURS = "llm-pipeline"  # the `by` field of the holder record our processes write


class LockTimeoutError(StageError):
    """A lock held by something other than an llm-pipeline process for longer than the configured time."""


def lock_timeout_s() -> float:
    """How long to wait for a lock whose holder is not one of our processes (LLM_PIPELINE_LOCK_TIMEOUT_S)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise StageError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def _command_line() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    return " ".join(argv)[:300]


def write_record(f: IO[str], what: str) -> None:
    """Say in the lock file who holds it (read by processes that wait for it)."""
    with contextlib.suppress(OSError):  # a full disk must not stop a lock from working; waiters then know less
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"by": _OURS, "pid": os.getpid(), "host": socket.gethostname(), "what": what,
                            "command": _command_line(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()


def _read_record(path: Path) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return rec if isinstance(rec, dict) else {}


def flock_holders(path: Path) -> list[int]:
    """Pids holding a lock on `path` according to the kernel (/proc/locks), [] where it does not say."""
    try:
        st = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF" (a waiter's line has "->" after the number)
        parts = [p for p in parts if p != "->"]
        if len(parts) >= 6 and parts[5] == dev and parts[4].isdigit():
            pids.append(int(parts[4]))
    return pids


def _process(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def describe_holder(path: Path, what: str = "") -> tuple[bool, str]:
    """(held by one of our processes, who holds the lock in words); `what` is what the caller waits for."""
    rec = _read_record(path)
    kernel = flock_holders(path)
    pid = rec.get("pid") if isinstance(rec.get("pid"), int) else None
    same_host = rec.get("host") in (None, socket.gethostname())
    ours = (rec.get("by") == _OURS and pid is not None and same_host and _pid_alive(pid)
            and (not kernel or pid in kernel))
    if ours:
        purpose = "" if rec.get("what") in (None, what) else f" for {rec['what']}"
        return True, f"llm-pipeline process {pid} ({rec.get('command', '?')}){purpose} since {rec.get('since', '?')}"
    if kernel:
        return False, ", ".join(f"process {p}" + (f" ({cmd})" if (cmd := _process(p)) else "") for p in kernel)
    return False, "a process that left no record of itself (not an llm-pipeline process)"


def wait_for_lock(take: Callable[[], bool], holder: Callable[[], tuple[bool, str]], what: str, where: str,
                  fix: str, timeout_s: float | None = None, max_delay_s: float = 0.5) -> None:
    """Call `take` until it gets the lock. `holder()` says (held by one of our processes, who holds it in words):
    a wait on our own processes is unbounded, one on anything else ends after `timeout_s` (default: the configured
    lock timeout) with a `LockTimeoutError` naming `where` the lock is, its holder and `fix`."""
    if take():
        return
    limit = lock_timeout_s() if timeout_s is None else timeout_s
    started = time.monotonic()
    foreign_since: float | None = None
    said = ""
    delay = 0.05
    while True:
        ours, who = holder()
        # once per holder, not once per poll, and not for the moment a store takes to open
        if who != said and time.monotonic() - started > 0.5:
            log.warning("waiting for %s: %s holds %s", what, who, where)
            said = who
        if ours:
            foreign_since = None
        else:
            foreign_since = foreign_since or time.monotonic()
            if time.monotonic() - foreign_since >= limit:
                raise LockTimeoutError(
                    f"gave up waiting for {what} after {time.monotonic() - started:.0f} s: {where} is held by {who}. "
                    f"{fix}, or raise {LOCK_TIMEOUT_ENV} (now {limit:g} s)."
                )
        time.sleep(delay)
        delay = min(delay * 2, max_delay_s)
        if take():
            if said:
                log.info("done waiting for %s (%.1f s)", what, time.monotonic() - started)
            return


def acquire(f: IO[str], path: Path, what: str, timeout_s: float | None = None) -> None:
    """Take an exclusive lock on the open lock file `f` (at `path`), waiting as the module docstring says."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # no advisory locks on this platform
        return
    wait_for_lock(lambda: try_lock(f), lambda: describe_holder(path, what), what, f"the lock file {path}",
                  "Stop that process, or, if it is meant to hold the lock this long,", timeout_s)
    write_record(f, what)


@contextlib.contextmanager
def file_lock(path: Path, what: str | None = None, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing), waiting for other holders (see the module docstring).

    `what` says in the waiting line and in the holder record what the lock is for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        acquire(f, path, what or f"the lock {path.name}", timeout_s)
        try:
            yield
        finally:
            with contextlib.suppress(ImportError, OSError):
                import fcntl

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
    with file_lock(work_dir / "locks" / f"{stage}-{key[:32]}.lock",
                   f"stage {stage} (cache key {key[:12]}) to be computed, to reuse it"):
        yield
