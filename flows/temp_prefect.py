"""A temporary Prefect server for one CLI process, started before the heavy imports so it boots meanwhile."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

from stages.common import StageError

log = logging.getLogger("llm-pipeline")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, even by kill -9, so no server is left behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


class TemporaryPrefect:
    """Without PREFECT_API_URL, Prefect would start a temporary local server at the first flow run, after all the
    imports (~10-20 s on 2 cores, serially). This starts one with Prefect's public command (`prefect server start`
    on 127.0.0.1, a free port, no UI, no scheduler: nothing is scheduled; storage in PREFECT_HOME) as a subprocess
    at once, so it boots while this process imports torch and MLflow; it is stopped at exit."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = ""
        self.port = 0
        self._lock: IO[str] | None = None
        self.log_path: Path | None = None

    def start(self) -> None:
        import atexit

        from flows.locks import try_lock, write_record

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.api = f"http://127.0.0.1:{self.port}/api"
        os.environ["PREFECT_API_URL"] = self.api  # before prefect is imported here: flows talk to this server
        atexit.register(self.stop)
        # Servers starting at once on one PREFECT_HOME would both migrate its database (sqlite: "duplicate
        # column"); the first start holds this lock until it answers, and a later one spawns only then.
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "temporary-server.log"
        self._lock = open(home / "llm-pipeline-server-start.lock", "a+", encoding="utf-8")  # noqa: SIM115
        if try_lock(self._lock):
            write_record(self._lock, f"a Prefect server to start on {home}")  # `up` waits for it (flows.supervisor)
            self._spawn()

    def _spawn(self) -> None:
        # its errors go to a file: a server stopped while it boots (this command failed early) logs its cancelled
        # start-up, which must not follow the command's one error line on the screen
        err = open(self.log_path, "ab") if self.log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-ui", "--no-scheduler", "--no-late-runs", "--analytics-off", "--log-level", "ERROR"],
            stdout=subprocess.DEVNULL,  # the banner would tell users to configure a server that goes away at exit
            stderr=err,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        if err is not subprocess.DEVNULL:
            err.close()  # the child holds its own copy
        log.info("starting a temporary Prefect server on %s (set PREFECT_API_URL to use your own)", self.api)

    def wait(self, timeout: float = 300) -> None:
        if self.proc is None and self._lock is not None:  # another process's server is starting: wait for it
            try:
                import fcntl

                fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX)
            except ImportError:  # no advisory locks on this platform: start regardless
                pass
            from flows.locks import write_record

            write_record(self._lock, "a Prefect server to start")
            self._spawn()
        try:
            self._wait_healthy(timeout)
        finally:
            if self._lock is not None:
                self._lock.close()  # closing drops the lock
                self._lock = None

    def _wait_healthy(self, timeout: float) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise StageError(f"the temporary Prefect server exited (code {self.proc and self.proc.returncode}; "
                                 f"its log: {self.log_path}); check that PREFECT_HOME is writable, or start one (`llm-pipeline up`) and set "
                                 "PREFECT_API_URL")
            try:
                with urllib.request.urlopen(self.api + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise StageError(f"the temporary Prefect server at {self.api} did not answer within {timeout:.0f}s; start "
                         "one (`llm-pipeline up`) and set PREFECT_API_URL, or retry on a less busy machine")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


_SERVER: list[TemporaryPrefect] = []


def started_server() -> TemporaryPrefect | None:
    """The temporary server this process started, if any (then PREFECT_API_URL names it, not the user's)."""
    return _SERVER[0] if _SERVER else None


def prestart_prefect() -> TemporaryPrefect | None:
    """The temporary server of this process (started on the first call), or None when PREFECT_API_URL is given."""
    if _SERVER:
        return _SERVER[0]
    # The CLI calls this before anything imports Prefect, whose settings are read once at import.
    if os.environ.get("PREFECT_API_URL"):
        return None
    server = TemporaryPrefect()
    server.start()
    _SERVER.append(server)
    return server
