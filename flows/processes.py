"""Processes the supervisor (`llm-pipeline up`) runs: free ports, health checks, starting a server in its own process
group and stopping groups (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE_S = 6.0  # how long a stopping server may take before it is killed (`up` and `serve` stop within 10 s)


class ServerError(Exception):
    """A problem starting or finding the servers that the user can fix; the message says how."""


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the servers bind: connections of a stopped server lingering in TIME_WAIT do not block a restart.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when something answers `url` with a 2xx, or with 401 (up, but behind auth)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except urllib.error.HTTPError as e:
        return e.code == 401
    except (OSError, ValueError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pid: int, grace_s: float = 20.0) -> None:
    """SIGTERM the process group led by `pid` (servers spawn workers), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop_groups(pids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process groups led by `pids` all at once, SIGKILL what is left after `grace_s` (so two servers
    stop within one grace period, not one after the other)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                alive.remove(pid)
            except PermissionError:
                pass
        if alive:
            time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str
    log: Path
    proc: subprocess.Popen | None = None

    def start(self, cwd: Path) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # A session of its own: Ctrl-C in the terminal reaches only `up`, which then stops each server's
            # whole process group in order, instead of the servers' workers dying in random order.
            self.proc = subprocess.Popen(
                self.argv, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


def wait_healthy(servers: list[Server], timeout_s: float) -> None:
    pending = list(servers)
    deadline = time.monotonic() + timeout_s
    while pending:
        for s in list(pending):
            assert s.proc is not None
            if s.proc.poll() is not None:
                raise ServerError(
                    f"the {s.name} server exited with code {s.proc.returncode} while starting; "
                    f"its log {s.log} ends with:\n{s.log_tail()}"
                )
            if http_ok(s.health_url):
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise ServerError(
                f"{names} did not answer its health check within {timeout_s:.0f} s; see {pending[0].log} "
                f"(raise --timeout on a slow machine)."
            )
        if pending:
            time.sleep(0.5)
