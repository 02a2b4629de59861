"""`llm-pipeline up` / `down`: a Prefect server and an MLflow server with local storage, supervised until Ctrl-C
(or left running with --detach and stopped by `down`). A server that dies meanwhile is started again on the same
port and storage, so clients (`serve`, running stages) retry through the gap instead of losing both servers.

Both servers bind to 127.0.0.1 unless `--host` says otherwise; exposing them turns on authentication
(Prefect's basic auth string and MLflow's basic-auth app) with generated credentials kept in the work dir.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from flows.credentials import (
    client_credentials,
    ensure_credentials,
    mlflow_auth_env,
    prefect_auth_env,
    server_store_uri,
    write_private,
)
from flows.processes import (  # noqa: F401 - re-exported: `up`'s callers and tests use them from here
    STOP_GRACE_S,
    Server,
    ServerError,
    http_ok,
    pid_alive,
    port_free,
    stop_group,
    stop_groups,
    wait_healthy,
)
from flows.tracking import ml_view

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_WORK_DIR = Path(".llm-pipeline")
# The MLflow store sits where the embedded default writes (flows/tracking.py), so runs made without a server
# show up in the UI once `up` is running.
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
STATE_FILE = "servers.json"
# A server that dies this often within the window is crash-looping (bad config, full disk): `up` stops instead.
RESTART_LIMIT = 3
RESTART_WINDOW_S = 600.0
# Held while a Prefect server starts on a PREFECT_HOME (its first start migrates the database); the temporary
# servers of flows.temp_prefect take the same lock, so `up` and a run started together do not migrate it twice.
PREFECT_START_LOCK = "llm-pipeline-server-start.lock"


# ---------------------------------------------------------------------------------------------------------------
# Commands. Kept as plain argv builders so docker/compose.yaml can be checked against them (tests/test_docker.py).


def prefect_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def mlflow_command(
    host: str,
    port: int,
    backend_store_uri: str,
    artifacts_destination: str,
    *,
    workers: int = 1,
    auth: bool = False,
    allowed_hosts: list[str] | None = None,
) -> list[str]:
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination", artifacts_destination,
        # One worker is plenty for a team's tracking traffic on a laptop and keeps memory low; raise it with
        # --mlflow-workers for a busy shared server.
        "--workers", str(workers),
    ]  # fmt: skip
    if auth:
        argv += ["--app-name", "basic-auth"]
    if allowed_hosts:
        argv += ["--allowed-hosts", ",".join(allowed_hosts)]
    return argv


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def advertised_host(host: str) -> str:
    """The name a browser or client should use to reach a server bound to `host`."""
    if host in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class Endpoints:
    prefect_url: str  # the UI
    prefect_api_url: str
    mlflow_url: str  # UI and tracking URI

    @classmethod
    def make(cls, host: str, prefect_port: int, mlflow_port: int) -> Endpoints:
        h = _url_host(host)
        return cls(
            f"http://{h}:{prefect_port}", f"http://{h}:{prefect_port}/api", f"http://{h}:{mlflow_port}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Processes.


def _state_path(work_dir: Path) -> Path:
    return work_dir / "servers" / STATE_FILE


def read_state(work_dir: Path) -> dict[str, Any] | None:
    """The servers a running (or detached) `up` started from this work dir, if they are still alive."""
    path = _state_path(work_dir)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not all(pid_alive(int(pid)) for pid in state.get("pids", {}).values()):
        return None
    return state


class Stop(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: stop the servers."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Stop(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While the servers stop: a second Ctrl-C or SIGTERM must not interrupt that (and print a traceback)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _check_can_start(work_dir: Path, host: str, prefect_port: int, mlflow_port: int) -> None:
    running = read_state(work_dir)
    if running:
        raise ServerError(
            f"servers from {work_dir} are already running (Prefect {running['prefect_url']}, MLflow "
            f"{running['mlflow_url']}); stop them with `llm-pipeline down --work-dir {work_dir}`."
        )
    for name, port, flag in (
        ("Prefect", prefect_port, "--prefect-port"),
        ("MLflow", mlflow_port, "--mlflow-port"),
    ):
        if not port_free(host, port):
            raise ServerError(
                f"port {port} on {host} (for {name}) is already in use; pick another with {flag} PORT."
            )


def _server_envs(
    work_dir: Path, state_dir: Path, ep: Endpoints, auth: bool
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Environments of the Prefect and the MLflow server, and the client settings that reach them."""
    base = dict(os.environ)
    base.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    base.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    # MLflow's job runner serves GenAI features (online scoring, trace archival) this project does not use; it is
    # seven extra processes and makes shutdown slow.
    base.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Client settings in the caller's shell must not leak into the servers themselves.
    for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI"):
        base.pop(k, None)
    # Secrets reach the servers through owner-only files (flows.credentials), never their environment.
    for k in ("PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
              "PGPASSWORD"):
        base.pop(k, None)
    prefect_env = dict(base)
    prefect_env["PREFECT_HOME"] = str(work_dir / "prefect")
    # The UI is a static app that calls the API at this address; without it a server on a port other than 4200
    # serves a UI that talks to :4200.
    prefect_env["PREFECT_UI_API_URL"] = ep.prefect_api_url
    mlflow_env = dict(base)
    client_env = {"PREFECT_API_URL": ep.prefect_api_url, "MLFLOW_TRACKING_URI": ep.mlflow_url}
    if auth:
        creds = ensure_credentials(state_dir)
        prefect_env.update(prefect_auth_env(creds, state_dir))
        mlflow_env.update(mlflow_auth_env(creds, state_dir, work_dir))
        client_env.update(client_credentials(creds))
    return prefect_env, mlflow_env, client_env


def allowed_hosts(advertised: list[str]) -> list[str]:
    """Host headers an exposed MLflow server answers (it refuses others, against DNS rebinding): loopback and the
    names the user advertised, each with any port; no address range is let in that the user did not name."""
    names = ["localhost", "127.0.0.1", *advertised]
    return [h for n in dict.fromkeys(names) for h in (_url_host(n), f"{_url_host(n)}:*")]


def advertised_names(advertise: str | None, host: str) -> list[str]:
    """`--advertise` as a list (comma-separated names and addresses); the first is the one printed in addresses."""
    names = [n.strip() for n in (advertise or "").split(",") if n.strip()]
    return names or [advertised_host(host)]


def _start_and_record(
    servers: list[Server], work_dir: Path, ep: Endpoints, client_env: dict[str, str], timeout_s: float, out: Any
) -> Path:
    """Start the servers, wait until they answer, record them for `down`/`serve`; returns the env.sh written."""
    print(f"Starting Prefect and MLflow servers (storage and logs under {work_dir}) ...", file=out, flush=True)
    from flows.locks import file_lock

    prefect_home = Path(servers[0].env.get("PREFECT_HOME", work_dir / "prefect"))
    with file_lock(prefect_home / PREFECT_START_LOCK, f"the Prefect server on {prefect_home} to start"):
        for s in servers:
            s.start(cwd=work_dir)
        wait_healthy(servers, timeout_s)
    env_sh = work_dir / "servers" / "env.sh"
    write_private(env_sh, "".join(f"export {k}={v}\n" for k, v in client_env.items()))
    _record(servers, work_dir, ep, client_env)
    return env_sh


def _record(servers: list[Server], work_dir: Path, ep: Endpoints, client_env: dict[str, str]) -> None:
    state = {
        **asdict(ep),
        "pids": {s.name: s.proc.pid for s in servers if s.proc},
        "env": client_env,  # the file is owner-readable only: it may hold the client credentials
    }
    write_private(_state_path(work_dir), json.dumps(state, indent=2) + "\n")


def _restart(
    s: Server, servers: list[Server], work_dir: Path, ep: Endpoints, client_env: dict[str, str], timeout_s: float,
    history: list[float], out: Any,
) -> None:  # fmt: skip
    """Start a server that died again with the same command (port, database); `history` holds its restarts."""
    assert s.proc is not None
    code, now = s.proc.returncode, time.monotonic()
    history[:] = [t for t in history if now - t < RESTART_WINDOW_S]
    if len(history) >= RESTART_LIMIT:
        raise ServerError(
            f"the {s.name} server stopped unexpectedly (exit code {code}) {len(history) + 1} times within "
            f"{RESTART_WINDOW_S / 60:.0f} minutes; not restarting it again. Its log {s.log} ends with:\n{s.log_tail()}"
        )
    history.append(now)
    print(f"The {s.name} server stopped unexpectedly (exit code {code}); starting it again on the same port and "
          f"storage (log: {s.log}) ...", file=out, flush=True)  # fmt: skip
    # Its workers may outlive the main process and keep the port: the whole group goes first.
    stop_group(s.proc.pid, grace_s=10)
    s.start(cwd=work_dir)
    _record(servers, work_dir, ep, client_env)  # `down` and `serve` find the new pid
    wait_healthy([s], timeout_s)
    print(f"The {s.name} server is back.", file=out, flush=True)


def _watch(
    servers: list[Server], work_dir: Path, ep: Endpoints, client_env: dict[str, str], timeout_s: float, out: Any
) -> NoReturn:
    """Block until interrupted, restarting a server that stops meanwhile (see `_restart`)."""
    restarts: dict[str, list[float]] = {s.name: [] for s in servers}
    while True:
        for s in servers:
            assert s.proc is not None
            if s.proc.poll() is not None:
                _restart(s, servers, work_dir, ep, client_env, timeout_s, restarts[s.name], out)
        time.sleep(1.0)


def _stop_all(servers: list[Server], work_dir: Path, out: Any, why: str = "") -> None:
    """Stop both servers at once within STOP_GRACE_S (then SIGKILL) and say so in one line."""
    with _signals_ignored():
        if why:
            print(f"\n{why}: stopping the servers ... ", end="", file=out, flush=True)
        stop_groups([s.proc.pid for s in servers if s.proc is not None and s.proc.poll() is None])
        for s in servers:
            if s.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    s.proc.wait(timeout=1)
        with contextlib.suppress(OSError):
            _state_path(work_dir).unlink()
        print("Servers stopped.", file=out, flush=True)


def up(
    work_dir: Path = DEFAULT_WORK_DIR,
    host: str = DEFAULT_HOST,
    prefect_port: int = DEFAULT_PREFECT_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    *,
    detach: bool = False,
    auth: bool | None = None,
    advertise: str | None = None,
    mlflow_workers: int = 1,
    timeout_s: float = 180.0,
    backend_store_uri: str | None = None,
    out: Any = None,
) -> int:
    """Start both servers, wait until they answer, print where they are; block until Ctrl-C unless `detach`.

    `backend_store_uri`: MLflow's database (default: SQLite in the work dir, where the embedded store writes); a
    PostgreSQL URI works through the pinned psycopg2 driver. It is created and migrated before the server starts,
    under the store's lock (flows.store), so a run opening the same store at the same moment waits for it."""
    from flows.environment import check_work_dir
    from flows.store import prepare_store, redact

    out = out or sys.stdout
    work_dir = check_work_dir(work_dir, "--work-dir DIR")
    state_dir = work_dir / "servers"
    _check_can_start(work_dir, host, prefect_port, mlflow_port)
    exposed = not is_loopback(host)
    auth = exposed if auth is None else auth
    names = advertised_names(advertise, host)
    ep = Endpoints.make(names[0], prefect_port, mlflow_port)
    (work_dir / MLFLOW_ARTIFACTS).mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    store = backend_store_uri or f"sqlite:///{work_dir / MLFLOW_DB}"
    prepare_store(store, "mlflow-artifacts:/")  # what `mlflow server --serve-artifacts` would do, once, locked
    prefect_env, mlflow_env, client_env = _server_envs(work_dir, state_dir, ep, auth)
    # a password in the URI goes to an owner-only file libpq reads, not onto the server's command line
    server_store, store_env = server_store_uri(store, state_dir)
    mlflow_env.update(store_env)
    loop = _url_host(host if not exposed else "127.0.0.1")
    servers = [
        Server("Prefect", prefect_command(host, prefect_port), prefect_env,
               f"http://{loop}:{prefect_port}/api/health", state_dir / "prefect.log"),
        Server("MLflow",
               mlflow_command(host, mlflow_port, server_store, str(work_dir / MLFLOW_ARTIFACTS),
                              workers=mlflow_workers, auth=auth, allowed_hosts=allowed_hosts(names) if exposed else None),
               mlflow_env, f"http://{loop}:{mlflow_port}/health", state_dir / "mlflow.log"),
    ]  # fmt: skip
    leave_running = False
    why = ""
    with _sigterm_as_interrupt():
        try:
            env_sh = _start_and_record(servers, work_dir, ep, client_env, timeout_s, out)
            _print_banner(out, ep, client_env, env_sh, servers, exposed, auth, detach, state_dir, redact(store))
            if detach:
                leave_running = True
                return 0
            _watch(servers, work_dir, ep, client_env, timeout_s, out)
        except Stop as e:
            why = str(e) or "SIGINT"
            return 0
        except KeyboardInterrupt:
            why = "SIGINT"
            return 0
        finally:
            if not leave_running:
                _stop_all(servers, work_dir, out, why)


def _print_banner(
    out: Any, ep: Endpoints, client_env: dict[str, str], env_sh: Path, servers: list[Server],
    exposed: bool, auth: bool, detach: bool, state_dir: Path, store: str = "",
) -> None:  # fmt: skip
    lines = [
        "",
        f"  Prefect UI:  {ep.prefect_url}",
        f"  MLflow UI:   {ml_view(ep.mlflow_url + '/#/experiments')}",
        *([f"  MLflow store: {store}"] if store else []),
        "",
        "  Point the CLI, `llm-pipeline serve` and notebooks at them (also written to " + str(env_sh) + "):",
        *(
            f"    export {k}={v}"
            for k, v in client_env.items()
            if k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
        ),
        *([f"    source {env_sh}    # the same, plus the client credentials"] if auth else []),
        "",
        "  Logs: " + ", ".join(str(s.log) for s in servers),
    ]
    if auth:
        lines += [
            f"  Authentication is on; the credentials are in {state_dir / 'credentials.env'} (owner-readable only).",
        ]
    elif exposed:
        lines += ["  WARNING: exposed on the network WITHOUT authentication (--no-auth)."]
    lines += ["  Stop with `llm-pipeline down`." if detach else "  Press Ctrl-C to stop both servers.", ""]
    print("\n".join(lines), file=out, flush=True)


def down(work_dir: Path = DEFAULT_WORK_DIR, out: Any = None) -> int:
    out = out or sys.stdout
    work_dir = Path(work_dir).resolve()
    path = _state_path(work_dir)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        print(f"No servers recorded in {path}; nothing to stop.", file=out)
        return 0
    pids = [int(pid) for pid in state.get("pids", {}).values() if pid_alive(int(pid))]
    if pids:
        print(f"Stopping {', '.join(state.get('pids', {}))} (pids {', '.join(map(str, pids))}) ...", file=out,
              flush=True)
        stop_groups(pids)
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise ServerError(f"the servers are stopped, but their record {path} could not be removed ({e.strerror}); "
                          "remove it by hand (its work dir is not writable)") from None
    print("Servers stopped.", file=out)
    return 0
