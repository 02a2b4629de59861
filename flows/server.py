"""`llm-pipeline up` / `down` (a Prefect server and an MLflow server with local storage) and `llm-pipeline serve`
(the pipeline and every stage as Prefect deployments, so they can be started from the Prefect UI).

Both servers bind to 127.0.0.1 unless `--host` says otherwise; exposing them turns on authentication
(Prefect's basic auth string and MLflow's basic-auth app) with generated credentials kept in the work dir.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_WORK_DIR = Path(".llm-pipeline")
# The MLflow store sits where the embedded default writes (flows/tracking.py), so runs made without a server
# show up in the UI once `up` is running.
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
STATE_FILE = "servers.json"


class ServerError(Exception):
    """A problem starting or finding the servers that the user can fix; the message says how."""


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
# Credentials (only when exposed beyond loopback).


def _load_env_file(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("export "):
                line = line[len("export ") :]
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = v.strip("'\"")
    return out


def _write_private(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_credentials(state_dir: Path) -> dict[str, str]:
    """Server-side secrets for exposed servers: taken from the environment when set, else generated once.

    They are stable across restarts because MLflow creates its admin user only on the first start.
    """
    path = state_dir / "credentials.env"
    saved = _load_env_file(path)
    prefect_auth = os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or saved.get(
        "PREFECT_SERVER_API_AUTH_STRING"
    )
    mlflow_user = (
        os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or saved.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    )
    mlflow_pw = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or saved.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    prefect_auth = prefect_auth or f"admin:{secrets.token_urlsafe(18)}"
    mlflow_pw = mlflow_pw or secrets.token_urlsafe(18)
    # Signs MLflow's CSRF tokens; must stay the same across restarts and workers.
    flask_key = (
        os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or saved.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or secrets.token_urlsafe(32)
    )
    creds = {
        "PREFECT_SERVER_API_AUTH_STRING": prefect_auth,
        "MLFLOW_AUTH_ADMIN_USERNAME": mlflow_user,
        "MLFLOW_AUTH_ADMIN_PASSWORD": mlflow_pw,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_key,
    }
    if creds != saved:
        _write_private(path, "".join(f"{k}={v}\n" for k, v in creds.items()))
    return creds


def client_credentials(creds: dict[str, str]) -> dict[str, str]:
    """What a client (CLI, worker, notebook) exports to talk to the authenticated servers."""
    return {
        "PREFECT_API_AUTH_STRING": creds["PREFECT_SERVER_API_AUTH_STRING"],
        "MLFLOW_TRACKING_USERNAME": creds["MLFLOW_AUTH_ADMIN_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": creds["MLFLOW_AUTH_ADMIN_PASSWORD"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Processes.


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


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
    out: Any = None,
) -> int:
    """Start both servers, wait until they answer, print where they are; block until Ctrl-C unless `detach`."""
    out = out or sys.stdout
    work_dir = Path(work_dir).resolve()
    state_dir = work_dir / "servers"
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

    exposed = not is_loopback(host)
    auth = exposed if auth is None else auth
    adv = advertise or advertised_host(host)
    ep = Endpoints.make(adv, prefect_port, mlflow_port)
    (work_dir / MLFLOW_ARTIFACTS).mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)

    base = dict(os.environ)
    base.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    base.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    # MLflow's job runner serves GenAI features (online scoring, trace archival) this project does not use; it is
    # seven extra processes and makes shutdown slow.
    base.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Client settings in the caller's shell must not leak into the servers themselves.
    for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI"):
        base.pop(k, None)
    prefect_env = dict(base)
    prefect_env["PREFECT_HOME"] = str(work_dir / "prefect")
    # The UI is a static app that calls the API at this address; without it a server on a port other than 4200
    # serves a UI that talks to :4200.
    prefect_env["PREFECT_UI_API_URL"] = ep.prefect_api_url
    mlflow_env = dict(base)
    creds: dict[str, str] = {}
    if auth:
        creds = ensure_credentials(state_dir)
        prefect_env["PREFECT_SERVER_API_AUTH_STRING"] = creds["PREFECT_SERVER_API_AUTH_STRING"]
        ini = state_dir / "mlflow_auth.ini"
        _write_private(
            ini,
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{work_dir / 'mlflow_auth.db'}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        )
        mlflow_env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"] = creds["MLFLOW_AUTH_ADMIN_USERNAME"]
        mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"] = creds["MLFLOW_AUTH_ADMIN_PASSWORD"]
        mlflow_env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = creds["MLFLOW_FLASK_SERVER_SECRET_KEY"]

    allowed = None
    if exposed:
        allowed = [
            "localhost",
            "localhost:*",
            "127.0.0.1",
            "127.0.0.1:*",
            adv,
            f"{adv}:*",
            "10.*",
            "192.168.*",
        ]
    loop = _url_host(host if not exposed else "127.0.0.1")
    servers = [
        Server("Prefect", prefect_command(host, prefect_port), prefect_env,
               f"http://{loop}:{prefect_port}/api/health", state_dir / "prefect.log"),
        Server("MLflow",
               mlflow_command(host, mlflow_port, f"sqlite:///{work_dir / MLFLOW_DB}", str(work_dir / MLFLOW_ARTIFACTS),
                              workers=mlflow_workers, auth=auth, allowed_hosts=allowed),
               mlflow_env, f"http://{loop}:{mlflow_port}/health", state_dir / "mlflow.log"),
    ]  # fmt: skip

    client_env = {"PREFECT_API_URL": ep.prefect_api_url, "MLFLOW_TRACKING_URI": ep.mlflow_url}
    if auth:
        client_env.update(client_credentials(creds))
    state_path = _state_path(work_dir)
    leave_running = False
    with _sigterm_as_interrupt():
        try:
            print(
                f"Starting Prefect and MLflow servers (storage and logs under {work_dir}) ...",
                file=out,
                flush=True,
            )
            for s in servers:
                s.start(cwd=work_dir)
            wait_healthy(servers, timeout_s)
            env_sh = state_dir / "env.sh"
            _write_private(env_sh, "".join(f"export {k}={v}\n" for k, v in client_env.items()))
            state = {
                **asdict(ep),
                "pids": {s.name: s.proc.pid for s in servers if s.proc},
                "env": client_env,  # the file is owner-readable only: it may hold the client credentials
            }
            _write_private(state_path, json.dumps(state, indent=2) + "\n")
            _print_banner(out, ep, client_env, env_sh, servers, exposed, auth, detach, state_dir)
            if detach:
                leave_running = True
                return 0
            while True:
                for s in servers:
                    assert s.proc is not None
                    if s.proc.poll() is not None:
                        raise ServerError(
                            f"the {s.name} server stopped unexpectedly (exit code {s.proc.returncode}); its log "
                            f"{s.log} ends with:\n{s.log_tail()}"
                        )
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("\nStopping the servers ...", file=out, flush=True)
            return 0
        finally:
            if not leave_running:
                for s in servers:
                    if s.proc is not None:
                        stop_group(s.proc.pid)
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            s.proc.wait(timeout=5)
                with contextlib.suppress(FileNotFoundError):
                    state_path.unlink()
                print("Servers stopped.", file=out, flush=True)


def _print_banner(
    out: Any, ep: Endpoints, client_env: dict[str, str], env_sh: Path, servers: list[Server],
    exposed: bool, auth: bool, detach: bool, state_dir: Path,
) -> None:  # fmt: skip
    lines = [
        "",
        f"  Prefect UI:  {ep.prefect_url}",
        f"  MLflow UI:   {ep.mlflow_url}",
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
    for name, pid in state.get("pids", {}).items():
        if pid_alive(int(pid)):
            print(f"Stopping {name} (pid {pid}) ...", file=out, flush=True)
            stop_group(int(pid))
    path.unlink(missing_ok=True)
    print("Servers stopped.", file=out)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Deployments.


CLIENT_VARS = (
    "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)  # fmt: skip


def resolve_server_env(work_dir: Path = DEFAULT_WORK_DIR) -> dict[str, str]:
    """Client settings (server URLs, credentials): from the environment, else from the servers `up` started from
    `work_dir` (so `llm-pipeline up --detach && llm-pipeline serve` needs no exports)."""
    env = {k: os.environ[k] for k in CLIENT_VARS if os.environ.get(k)}
    state = read_state(Path(work_dir).resolve())
    if state:
        recorded = state.get("env", {})
        # Only fill in what belongs to a server the environment does not already name.
        for prefix, url_var in (("PREFECT_", "PREFECT_API_URL"), ("MLFLOW_", "MLFLOW_TRACKING_URI")):
            if url_var not in env:
                env.update({k: v for k, v in recorded.items() if k.startswith(prefix) and k in CLIENT_VARS})
    return env


def build_deployments(
    flows: dict[str, Any],
    name: str,
    parameters: dict[str, dict[str, Any]] | None = None,
    tags: list[str] | None = None,
) -> list[Any]:
    """One deployment per flow, all under the same deployment name (the config's), e.g. `pipeline/tiny`."""
    from prefect.types.entrypoint import EntrypointType

    parameters = parameters or {}
    out = []
    for key, flow in flows.items():
        # A module entrypoint (`flows.stages.sft_flow`) resolves through the package wherever the worker runs;
        # a file path would depend on the directory `serve` was started from.
        kwargs: dict[str, Any] = {
            "name": name,
            "tags": [*(tags or []), key],
            "entrypoint_type": EntrypointType.MODULE_PATH,
        }
        if parameters.get(key):
            kwargs["parameters"] = parameters[key]
        if flow.description:
            kwargs["description"] = flow.description
        out.append(flow.to_deployment(**kwargs))
    return out


def default_config() -> Path | None:
    """The config `llm-pipeline run` uses without --config, so the UI's forms start from the same values."""
    try:
        from flows.cli import DEFAULT_CONFIG
    except ImportError:
        return None
    path = Path(DEFAULT_CONFIG)
    return path if path.is_file() else None


def config_parameters(cfg: Any, flows: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Deployment defaults from a loaded pipeline config, so the UI's run form starts from that config's values."""
    from flows.config import dump_config

    full = dump_config(cfg)
    params: dict[str, dict[str, Any]] = {}
    for key in flows:
        if key == "pipeline":
            params[key] = {"config": full}
        elif key in full:
            params[key] = {"config": full[key], "pipeline": full["pipeline"]}
    return params


def pipeline_flows() -> dict[str, Any]:
    from flows.pipeline import pipeline_flow
    from flows.stage_flow import STAGE_FLOWS

    return {"pipeline": pipeline_flow, **STAGE_FLOWS}


def serve(
    work_dir: Path = DEFAULT_WORK_DIR,
    name: str = "default",
    limit: int = 1,
    flows: dict[str, Any] | None = None,
    parameters: dict[str, dict[str, Any]] | None = None,
    config: Path | None = None,
    overrides: list[str] | None = None,
    out: Any = None,
) -> int:
    """Register the deployments against the Prefect server and run their flow runs here until Ctrl-C."""
    out = out or sys.stdout
    env = resolve_server_env(work_dir)
    if "PREFECT_API_URL" not in env:
        raise ServerError(
            "no Prefect server to serve the deployments to: start one with `llm-pipeline up` (same --work-dir) "
            "or export PREFECT_API_URL=http://HOST:4200/api."
        )
    api = env["PREFECT_API_URL"].rstrip("/")
    if not http_ok(f"{api}/health", timeout=5):
        raise ServerError(
            f"the Prefect server at PREFECT_API_URL={api} does not answer; is `llm-pipeline up` running?"
        )
    if "MLFLOW_TRACKING_URI" not in env:
        print(
            "Note: MLFLOW_TRACKING_URI is not set, so runs are tracked in the local embedded store; "
            "start `llm-pipeline up` for an MLflow server.",
            file=out,
        )
    # The environment reaches the flow-run subprocesses (and MLflow in them); Prefect may already have read its
    # settings in this process, so they are also overridden explicitly.
    os.environ.update(env)
    from prefect import serve as prefect_serve
    from prefect.settings import temporary_settings

    updates: dict[str, Any] = {"api.url": api}
    if env.get("PREFECT_API_AUTH_STRING"):
        updates["api.auth_string"] = env["PREFECT_API_AUTH_STRING"]

    flows = flows if flows is not None else pipeline_flows()
    if parameters is None:
        from flows.config import load_config

        config = config if config is not None else default_config()
        try:
            cfg = load_config(config, overrides)
        except Exception as e:  # flows.config.ConfigError: a StageError naming the file and key
            raise ServerError(str(e)) from None
        parameters = config_parameters(cfg, flows)
    deployments = build_deployments(flows, name, parameters, tags=["llm-pipeline"])
    ui = api[: -len("/api")] if api.endswith("/api") else api
    print(
        f"Serving {len(deployments)} deployments ({', '.join(f'{k}/{name}' for k in flows)}) from {api}.\n"
        f"Start runs from the Prefect UI: {ui}/deployments",
        file=out,
        flush=True,
    )
    with temporary_settings(updates=updates):
        prefect_serve(*deployments, limit=limit, print_starting_message=False)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# CLI.


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def _run(fn: Any) -> Any:
    def call(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return call


def _deployment_name(config: Path | None) -> str:
    config = config if config is not None else default_config()
    return config.stem if config is not None else "default"


def register(subparsers: Any) -> None:
    """Add `up`, `down` and `serve` to the `llm-pipeline` command line."""
    p = subparsers.add_parser(
        "up",
        help="start a Prefect server and an MLflow server with local storage",
        description="Start a Prefect server and an MLflow server (SQLite + artifact folder under the work dir) on "
        "127.0.0.1, wait until both answer, print the UI addresses and the variables to export. Ctrl-C stops both.",
    )
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="interface to bind both servers to; anything but loopback turns on authentication "
                   f"(default {DEFAULT_HOST})")  # fmt: skip
    p.add_argument(
        "--prefect-port",
        type=_port,
        default=DEFAULT_PREFECT_PORT,
        help="Prefect server port (default %(default)s)",
    )
    p.add_argument(
        "--mlflow-port",
        type=_port,
        default=DEFAULT_MLFLOW_PORT,
        help="MLflow server port (default %(default)s)",
    )
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="where both servers keep their data and logs (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--detach", action="store_true", help="return once both answer; stop later with `llm-pipeline down`"
    )
    p.add_argument("--advertise", default=None,
                   help="host name clients and browsers use to reach the servers (default: --host, or this "
                   "machine's name when bound to 0.0.0.0)")  # fmt: skip
    p.add_argument(
        "--auth",
        action="store_true",
        help="turn on authentication on loopback too (a shared machine: other users reach 127.0.0.1)",
    )
    p.add_argument("--no-auth", action="store_true",
                   help="with a non-loopback --host, do not turn on authentication (only behind an authenticating "
                   "proxy)")  # fmt: skip
    p.add_argument(
        "--mlflow-workers", type=int, default=1, help="MLflow server worker processes (default %(default)s)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait for both health checks (default %(default)s)",
    )
    p.set_defaults(
        func=_run(
            lambda a: up(
                a.work_dir, a.host, a.prefect_port, a.mlflow_port, detach=a.detach,
                auth=True if a.auth else False if a.no_auth else None, advertise=a.advertise, mlflow_workers=a.mlflow_workers,
                timeout_s=a.timeout,
            )
        )
    )  # fmt: skip

    p = subparsers.add_parser("down", help="stop servers started with `llm-pipeline up --detach`")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="the work dir given to `up` (default %(default)s)",
    )
    p.set_defaults(func=_run(lambda a: down(a.work_dir)))

    p = subparsers.add_parser(
        "serve",
        help="serve the pipeline and every stage as Prefect deployments (run them from the Prefect UI)",
        description="Register the `pipeline` flow and each stage flow as deployments on the Prefect server at "
        "PREFECT_API_URL (or the servers `llm-pipeline up` started from --work-dir) and execute the runs started "
        "from the UI here, until Ctrl-C.",
    )
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="where `llm-pipeline up` recorded its servers, used when the env vars are unset (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="pipeline config whose values the UI's run forms start from (default: the one `llm-pipeline run` uses)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value in those defaults; repeatable",
    )
    p.add_argument(
        "--name",
        default=None,
        help="deployment name shown in the UI as FLOW/NAME (default: the config file's name, or 'default')",
    )
    p.add_argument("--limit", type=int, default=1,
                   help="flow runs executed at once by this process (default %(default)s: training runs should not "
                   "share a machine)")  # fmt: skip
    p.set_defaults(
        func=_run(
            lambda a: serve(
                a.work_dir, a.name or _deployment_name(a.config), a.limit,
                config=a.config, overrides=a.overrides,
            )
        )
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.server")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
