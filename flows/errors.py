"""What a user sees when a command fails: one line that says what failed and what to do, and the path of a log
file that keeps the traceback (`--debug` prints it as well). Exit code 2 for what the user fixes (config, data,
references, and the environment: a server that does not answer, a lock held by another program, a read-only or
full disk), 1 for an internal error (a bug: the log file is what to report).

The log goes to `<work dir>/logs/`, else (read-only, full, not there) to `$XDG_STATE_HOME/llm-pipeline/logs`
(default `~/.local/state/...`), else to a private folder in the system's temporary directory.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from stages.common import StageError

USER_ERROR = 2
INTERNAL_ERROR = 1
LOG_DIR_ENV = "LLM_PIPELINE_LOG_DIR"  # where processes started by this one (flow runs) save tracebacks too

_SAVED: dict[int, Path] = {}  # id(exception) -> its log file (an error logged by Prefect, then escaping main)
_SECRET_IN_URL = re.compile(r"(://[^:/@\s]+:)[^@/\s]+@")


def redact(text: str) -> str:
    """Passwords inside URLs (`scheme://user:password@host`) replaced by ***."""
    return _SECRET_IN_URL.sub(r"\1***@", text)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _os_error(e: OSError, work_dir_hint: str) -> str | None:
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.EROFS:
        return f"cannot write{where}: read-only file system. Use a writable work dir ({work_dir_hint})."
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device (writing{where or ' a file'}). Free some space, or use a work dir on "
                f"another disk ({work_dir_hint}).")
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where or ' ' + _first_line(e)}. Fix its permissions or use another work dir ({work_dir_hint})."
    if isinstance(e, ConnectionError | TimeoutError) or e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH,
                                                                     errno.ENETUNREACH, errno.ETIMEDOUT):
        return f"a server did not answer ({_first_line(e)}). Check that it runs and that its address is right."
    return None


_DB_MESSAGES = (
    ("database is locked", "the MLflow store is locked by another program (SQLite: database is locked). Close the "
     "program that keeps it open for writing (a sqlite3 shell, a database browser) and retry."),
    ("readonly database", "the MLflow store is read-only (SQLite: attempt to write a readonly database). Point "
     "MLFLOW_TRACKING_URI or the work dir at a writable place."),
    ("unable to open database file", "cannot open the MLflow store's database file (SQLite: unable to open database "
     "file). Check that its folder exists and is writable."),
    ("database or disk is full", "no space left for the MLflow store (SQLite: database or disk is full). Free some "
     "space or move the store."),
    ("disk i/o error", "the MLflow store could not be written (SQLite: disk I/O error); the disk is full or failing. "
     "Free some space or move the store."),
    ("could not connect to server", "cannot reach the MLflow database server. Start it or fix MLFLOW_TRACKING_URI."),
    ("connection refused", "a server refused the connection. Start it, or fix the address you gave."),
    ("max retries exceeded", "a server did not answer. Start it, or fix the address you gave."),
    ("out-of-date database schema", None),  # MLflow's own message says what to run
)


def classify(exc: BaseException, work_dir_hint: str = "--work-dir DIR") -> tuple[int, str]:
    """(exit code, the one line to print) for an exception that escaped a command."""
    from pydantic import ValidationError

    for e in _chain(exc):
        if isinstance(e, StageError | ValidationError) or type(e).__name__ == "ServerError":
            return USER_ERROR, str(e).strip()
    for e in _chain(exc):
        if isinstance(e, OSError) and (msg := _os_error(e, work_dir_hint)):
            return USER_ERROR, msg
        low = str(e).lower()
        for marker, msg in _DB_MESSAGES:
            if marker in low:
                return USER_ERROR, msg or _first_line(e)
        if type(e).__module__.startswith(("requests", "urllib3", "httpx", "httpcore")) and any(
                n in type(e).__name__ for n in ("Connect", "Timeout", "MaxRetry", "Protocol")):
            return USER_ERROR, f"a server did not answer ({_first_line(e)}). Start it, or fix the address you gave."
    return INTERNAL_ERROR, (f"internal error ({type(exc).__name__}: {_first_line(exc)}). This is a bug in "
                            "llm-pipeline; please report it with the log file below.")


def log_dirs(work_dir: str | Path | None = None) -> list[Path]:
    """Where a traceback may go, in order of preference (see the module docstring)."""
    dirs = []
    if os.environ.get(LOG_DIR_ENV):
        dirs.append(Path(os.environ[LOG_DIR_ENV]))
    if work_dir is not None:
        dirs.append(Path(work_dir) / "logs")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    dirs.append(Path(state) / "llm-pipeline" / "logs")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    dirs.append(Path(tempfile.gettempdir()) / f"llm-pipeline-{uid}")
    return list(dict.fromkeys(d.absolute() for d in dirs))


def _private_dir(d: Path) -> bool:
    """`d` exists (made if missing) as a folder of ours that is not a symlink (matters in shared /tmp)."""
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(d)
    import stat

    return stat.S_ISDIR(st.st_mode) and (not hasattr(os, "getuid") or st.st_uid == os.getuid())


def save_traceback(exc: BaseException, work_dir: str | Path | None = None) -> tuple[Path | None, str]:
    """Write the traceback of `exc` to a new log file; (its path, '') or (None, why it could not be written)."""
    if id(exc) in _SAVED and _SAVED[id(exc)].exists():
        return _SAVED[id(exc)], ""
    text = redact(
        f"llm-pipeline error log, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        f"command: {' '.join(sys.argv)}\ncwd: {os.getcwd()}\npython: {sys.version.split()[0]}\n\n"
        + "".join(traceback.format_exception(exc))
    )
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{len(_SAVED)}.log"
    why = "no folder to write it to"
    for d in log_dirs(work_dir):
        path = d / name
        try:
            if not _private_dir(d):
                why = f"{d} is not a private folder of this user"
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                path.unlink(missing_ok=True)  # a half-written log on a full disk helps nobody
                raise
        except OSError as e:
            why = f"{d}: {e.strerror or e}"
            continue
        _SAVED[id(exc)] = path
        return path, ""
    return None, why


def report(exc: BaseException, work_dir: str | Path | None = None, debug: bool = False,
           work_dir_hint: str = "--work-dir DIR", prog: str = "llm-pipeline") -> int:
    """Print what failed and what to do (one line) and where the traceback is; returns the exit code."""
    code, line = classify(exc, work_dir_hint)
    path, why = save_traceback(exc, work_dir)
    err = sys.stderr
    try:
        if debug:
            traceback.print_exception(exc, file=err)
        print(f"{prog}: error: {redact(line)}", file=err)
        if path is not None:
            print(f"{prog}: the traceback is in {path}" + ("" if debug else " (--debug prints it)"), file=err)
        else:
            print(f"{prog}: could not save the traceback ({why}); --debug prints it", file=err)
        err.flush()
    except OSError:  # stderr itself is gone (a closed pipe): the exit code still says it
        pass
    return code
