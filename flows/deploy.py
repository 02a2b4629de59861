"""`llm-pipeline serve`: the pipeline and every stage as Prefect deployments on a Prefect server, their runs
(started from the Prefect UI) executed by this process; client settings come from the environment or from the
servers `llm-pipeline up` recorded."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flows.specs import DEBUG_ENV, default_config
from flows.supervisor import DEFAULT_WORK_DIR, ServerError, http_ok, read_state

CLIENT_VARS = (
    "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)  # fmt: skip
# Prefect's client retries a failed request 5 times, 2..32 s apart (about a minute); the runner's poll loop stops
# `serve` after three such failures in a row (killing the flow runs it executes), and a flow run fails on its first
# call that runs out of retries. Two more retries (64 s, 128 s) carry `serve` and its flow runs through a Prefect
# server outage of about four minutes (a server that `up` or compose starts again takes well under one).
CLIENT_MAX_RETRIES = 7


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
        # A module entrypoint (`flows.stage_flow.sft_flow`) resolves through the package wherever the worker runs;
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


def _connect(work_dir: Path, out: Any) -> tuple[str, dict[str, Any]]:
    """The Prefect server's API URL (checked to answer) and the Prefect settings to run against it; the client
    environment is exported to this process, so flow-run subprocesses (and MLflow in them) get it too."""
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
    # Prefect may already have read its settings in this process, so they are also overridden explicitly.
    os.environ.update(env)
    updates: dict[str, Any] = {"api.url": api}
    if not os.environ.get("PREFECT_CLIENT_MAX_RETRIES"):
        # Through the settings, the flow-run processes `serve` starts get it too.
        updates["client.max_retries"] = CLIENT_MAX_RETRIES
    if env.get("PREFECT_API_AUTH_STRING"):
        updates["api.auth_string"] = env["PREFECT_API_AUTH_STRING"]
    return api, updates


def _load(config: Path | None, overrides: list[str] | None) -> Any:
    from flows.config import load_config

    config = config if config is not None else default_config()
    try:
        return load_config(config, overrides)
    except Exception as e:  # flows.config.ConfigError: a StageError naming the file and key
        raise ServerError(str(e)) from None


def deploy(work_dir: Path = DEFAULT_WORK_DIR, name: str = "default", config: Path | None = None,
           overrides: list[str] | None = None, cpu_pool: str = "cpu", gpu_pool: str = "gpu", gpu_slots: int = 1,
           out: Any = None) -> int:
    """The pipeline and every stage as deployments in two work pools (flows.pools); workers run them."""
    from prefect.settings import temporary_settings

    from flows.pools import deploy_to_pools, ensure_pools

    out = out or sys.stdout
    if gpu_slots < 1:
        raise ServerError(f"--gpu-slots {gpu_slots}: give the number of GPU machines (at least 1).")
    api, updates = _connect(work_dir, out)
    flows = pipeline_flows()
    cfg = _load(config, [*(overrides or []), "pipeline.dispatch=deployments", f"pipeline.deployment={name}"])
    with temporary_settings(updates=updates):
        ensure_pools(cpu_pool, gpu_pool, gpu_slots)
        built = build_deployments(flows, name, config_parameters(cfg, flows), tags=["llm-pipeline"])
        placed = deploy_to_pools(dict(zip(flows, built, strict=True)), cpu_pool, gpu_pool)
    ui = api[: -len("/api")] if api.endswith("/api") else api
    print(f"Deployed to {api}:", file=out)
    for key, pool in placed.items():
        print(f"  {key}/{name:<20} work pool {pool}", file=out)
    print(f"Work pool {gpu_pool} runs at most {gpu_slots} flow run(s) at once (one per GPU machine). Start a worker "
          f"on each machine:\n  prefect worker start --pool {cpu_pool}\n  prefect worker start --pool {gpu_pool} "
          f"--limit 1\nthen run Deployments -> pipeline/{name} from the UI: {ui}/deployments", file=out, flush=True)
    return 0


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
    api, updates = _connect(work_dir, out)
    from prefect.settings import temporary_settings

    flows = flows if flows is not None else pipeline_flows()
    if parameters is None:
        cfg = _load(config, overrides)
        _check_runs_can_start(cfg)
        parameters = config_parameters(cfg, flows)
    deployments = build_deployments(flows, name, parameters, tags=["llm-pipeline"])
    ui = api[: -len("/api")] if api.endswith("/api") else api
    print(
        f"Serving {len(deployments)} deployments ({', '.join(f'{k}/{name}' for k in flows)}) from {api}.\n"
        f"Start runs from the Prefect UI: {ui}/deployments",
        file=out,
        flush=True,
    )
    try:
        with temporary_settings(updates=updates):
            _run_until_stopped(deployments, limit, Path(work_dir), out)
    except Exception as e:
        cause = _lost_server(e)
        if cause is None:
            raise
        # Prefect's own ending is a nest of task-group tracebacks; say what happened and what to do instead.
        raise ServerError(
            f"lost the Prefect server at {api}: it did not answer for minutes, so Prefect's runner gave up "
            f"({type(cause).__name__}: {cause}). The flow runs this process executed were stopped with it and may "
            "still show as Running in the UI. Once the server is back (`llm-pipeline up`), start `llm-pipeline "
            "serve` again and rerun them: stages that finished are reused."
        ) from None
    return 0


def _check_runs_can_start(cfg: Any) -> None:
    """What the served runs need, checked before serving: a writable work dir with room, and their MLflow store
    (a server that answers, or a database created once under its lock)."""
    from flows.environment import check_tracking_store, check_work_dir
    from flows.errors import LOG_DIR_ENV

    os.environ.setdefault(LOG_DIR_ENV, str(Path(cfg.pipeline.work_dir).resolve() / "logs"))  # flow runs' errors
    try:
        check_work_dir(cfg.pipeline.work_dir, "--set pipeline.work_dir=DIR")
        check_tracking_store(cfg.pipeline.work_dir, cfg.pipeline.offline_tracking)
    except Exception as e:  # a StageError (one line naming the fix): serve reports it like its own problems
        from stages.common import StageError

        if isinstance(e, StageError):
            raise ServerError(str(e)) from None
        raise


# `serve` stops within this on the first Ctrl-C or SIGTERM, whatever the Prefect server is doing: Prefect's own
# shutdown calls the server (cancelling runs, pausing deployments) and retries for minutes when it is gone too.
STOP_GRACE_S = 6.0


def _run_until_stopped(deployments: list[Any], limit: int, work_dir: Path, out: Any) -> None:
    """Prefect's runner for `deployments` in this process, stopped by the first Ctrl-C or SIGTERM (see
    `_GracefulStop`); connection errors while the Prefect server restarts are logged in one line each."""
    import asyncio

    from prefect.runner import Runner

    stopper = _GracefulStop(work_dir, out)

    class _Runner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:  # Prefect installs this for SIGTERM
            stopper(signal.SIGTERM, self)

    runner = _Runner(pause_on_shutdown=False, limit=limit)
    # Ours from here on, not only once Prefect's runner has started and installed its own SIGTERM handler: the
    # addresses are printed before, and a signal in between would otherwise end the process without its line.
    old = {sig: signal.signal(sig, lambda signum, frame: stopper(signum, runner))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for d in deployments:
            runner.add_deployment(d)
        quiet_connection_tracebacks()
        asyncio.run(runner.start())
    except (KeyboardInterrupt, asyncio.CancelledError):
        if not stopper.started:
            raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if stopper.started:
        stopper.finish()


class _GracefulStop:
    """The first Ctrl-C or SIGTERM: one line, the runner asked to stop, and whatever Prefect prints while it tears
    down (connection errors of a server that stops at the same moment) goes to a log file instead of the terminal;
    after STOP_GRACE_S the flow runs still going are killed and the process exits. Later signals are ignored."""

    def __init__(self, work_dir: Path, out: Any) -> None:
        self.work_dir, self.out = work_dir, out
        self.started = False

    def __call__(self, signum: int, runner: Any) -> None:
        if self.started:
            return
        self.started = True
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping serve (flow runs still going are stopped with it) ...", file=self.out, flush=True)
        self._divert_output()
        threading.Thread(target=self._deadline, name="serve-stop-deadline", daemon=True).start()
        runner.stopping = True
        if getattr(runner, "_loop", None) is not None and getattr(runner, "started", False):
            runner.execute_in_background(runner.astop)
        else:
            self.finish()

    def _divert_output(self) -> None:
        from flows.errors import log_dirs

        for d in log_dirs(self.work_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
                fd = os.open(d / f"serve-stop-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError:
                continue
            break
        else:
            fd = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def _deadline(self) -> None:
        time.sleep(STOP_GRACE_S)
        self.finish()

    def finish(self) -> None:
        """Stop the flow runs this process started (SIGTERM, then SIGKILL) and leave at once."""
        with contextlib.suppress(Exception):
            import psutil

            children = psutil.Process().children(recursive=True)
            for c in children:
                with contextlib.suppress(psutil.Error):
                    c.terminate()
            _, alive = psutil.wait_procs(children, timeout=1.5)
            for c in alive:
                with contextlib.suppress(psutil.Error):
                    c.kill()
        with contextlib.suppress(Exception):
            logging.shutdown()
        os._exit(0)


class _ConnectionTracebackFilter(logging.Filter):
    """A lost connection to the Prefect server (it restarts, or stops) is one line, not a traceback: the message
    plus the error's own line. Other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_connection_error(exc) and not os.environ.get(DEBUG_ENV):
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            record.args = None
            record.exc_info, record.exc_text = None, None
        return True


def _is_connection_error(exc: BaseException) -> bool:
    import httpx

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, httpx.TransportError | ConnectionError | TimeoutError) or type(e).__module__.startswith(
                "websockets"):
            return True
        e = e.__cause__ or e.__context__
    return False


def quiet_connection_tracebacks() -> None:
    """Put `_ConnectionTracebackFilter` on every log handler configured so far (Prefect's and the CLI's)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if not any(isinstance(f, _ConnectionTracebackFilter) for f in h.filters):
                h.addFilter(_ConnectionTracebackFilter())


def _lost_server(e: BaseException) -> BaseException | None:
    """The error in what Prefect's runner raises when it gives up on an unreachable server (its poll loop's
    "Service exceeded error threshold", or the connection error of pausing the deployments on the way out)."""
    import httpx

    if isinstance(e, BaseExceptionGroup):
        return next((c for sub in e.exceptions if (c := _lost_server(sub)) is not None), None)
    if isinstance(e, httpx.TransportError) or (isinstance(e, RuntimeError) and "error threshold" in str(e)):
        return e
    return None


def deployment_name(config: Path | None) -> str:
    """The deployments' name: the config file's stem (`pipeline/tiny`), else `default`."""
    config = config if config is not None else default_config()
    return config.stem if config is not None else "default"
