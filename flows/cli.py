"""`llm-pipeline`: run the whole pipeline or one stage, plus `generate`/`export` (llm.cli), `up`/`down`
(flows.supervisor) and `serve` (flows.deploy). The command line is defined here only.

    llm-pipeline run   [--config FILE] [--set section.key=value ...] [--force]
    llm-pipeline stage NAME [--from-run RUN_ID | stage=RUN_ID ...] [--config FILE] [--set ...] [--force]
    llm-pipeline generate REF ... / export REF ...   (REF: a folder, an MLflow run id, or models:/name/version)
    llm-pipeline up / serve / deploy                   (local Prefect + MLflow servers, UI deployments, work pools)
    llm-pipeline gc [--keep N] [--yes]                 (stored outputs nothing needs any more, flows.cleanup)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.cleanup import add_gc_command
from flows.deploy import deploy, deployment_name, serve
from flows.errors import LOG_DIR_ENV
from flows.specs import DEBUG_ENV, DEFAULT_CONFIG, STAGES, default_config, stage_config
from flows.supervisor import (
    DEFAULT_HOST,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_PREFECT_PORT,
    DEFAULT_WORK_DIR,
    down,
    up,
)
from flows.temp_prefect import TemporaryPrefect, prestart_prefect
from stages.common import StageError

STAGE_NAMES = tuple(s.name for s in STAGES)
log = logging.getLogger("llm-pipeline")


def _prepare_env(work_dir: str | Path | None = None) -> None:
    """Defaults that must be set before Prefect is imported: no analytics offline, a writable Prefect home."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # the ephemeral Prefect server (no PREFECT_API_URL) may need longer than the 20 s default on a busy 2-core box
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if work_dir is None:
        return
    home = Path.home()
    if "PREFECT_HOME" not in os.environ and not os.access(home if home.exists() else home.parent, os.W_OK):
        os.environ["PREFECT_HOME"] = str(Path(work_dir or ".llm-pipeline").resolve() / "prefect")


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"pipeline YAML (default: {DEFAULT_CONFIG} if it exists)")
    _add_set(p, "override one config value, e.g. --set pretrain.max_steps=50 (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun stages even when nothing changed")


WORK_DIR_HINT = "--set pipeline.work_dir=DIR"
_LOG_WORK_DIR: list[Path] = []  # the work dir of this command once known: its logs/ keeps error tracebacks


def _load(args: argparse.Namespace) -> Any:
    from flows.config import load_config

    cfg = load_config(args.config or default_config(), args.overrides)
    _LOG_WORK_DIR[:] = [Path(cfg.pipeline.work_dir)]
    # error logs of this process's flow runs go there too (flows.prefect_ui), falling back as flows.errors says
    os.environ.setdefault(LOG_DIR_ENV, str(Path(cfg.pipeline.work_dir).resolve() / "logs"))
    _prepare_env(cfg.pipeline.work_dir)
    return cfg


def _check_environment(cfg: Any) -> None:
    """Before any pipeline work: a writable work dir with room, a writable artifact root, and the Prefect server
    PREFECT_API_URL names."""
    from flows.environment import check_prefect_api, check_work_dir
    from flows.temp_prefect import started_server

    check_work_dir(cfg.pipeline.work_dir, WORK_DIR_HINT)
    from flows.artifacts import ROOT_ENV, open_store, root_url

    if cfg.pipeline.artifact_root.strip() or os.environ.get(ROOT_ENV, "").strip():  # else in the work dir, checked
        open_store(root_url(cfg.pipeline.artifact_root, cfg.pipeline.work_dir)).check(
            f"pipeline.artifact_root, or {ROOT_ENV}")
    if started_server() is None:  # PREFECT_API_URL, when set, is the user's server, not a temporary one of ours
        check_prefect_api()


def _check_tracking(cfg: Any) -> Any:
    from flows.tracking import setup_tracking

    p = cfg.pipeline
    return setup_tracking(p.experiment, p.work_dir, p.offline_tracking)


def _prefect_home_ready() -> bool:
    """True when Prefect's home does not depend on the config (else it goes under the config's work dir)."""
    home = Path.home()
    return "PREFECT_HOME" in os.environ or os.access(home if home.exists() else home.parent, os.W_OK)


def _join(server: TemporaryPrefect | None) -> None:
    if server is not None:
        server.wait()


def cmd_run(args: argparse.Namespace) -> int:
    from flows.preflight import check_inputs

    cfg = _load(args)
    _check_environment(cfg)
    check_inputs(cfg)  # every source and dataset, before any server, run or folder is made
    starting = prestart_prefect()
    tracking = _check_tracking(cfg)  # a dead tracking server fails here, before any compute
    # Importing builds the flows (stage modules, Prefect) while the temporary server starts.
    from flows.pipeline import pipeline_flow

    _join(starting)
    res = pipeline_flow(config=cfg, force=args.force)
    print()
    print(f"pipeline run {res['run_id']} finished in {res['wall_s']:.1f}s ({tracking.ui_hint()})")
    for s in res["stages"]:
        state = "reused (unchanged)" if s["reused"] else "ran"
        print(f"  {s['stage']:<10} {state:<19} run {s['run_id']}")
    if res.get("model_version"):
        new = "new version" if res["model_version_created"] else "already registered"
        print(f"  model      models:/{res['registered_model']}/{res['model_version']} ({new})")
        print(f"  alias      {res['promotion']}")
    if res.get("report"):
        print("\n" + res["report"].split("\n![")[0].rstrip())
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from flows.preflight import check_inputs

    cfg = _load(args)
    _check_environment(cfg)
    check_inputs(cfg, [args.name])
    starting = prestart_prefect()
    tracking = _check_tracking(cfg)
    # Importing builds the flows (stage modules, Prefect) while the temporary server starts.
    from flows.stage_flow import STAGE_FLOWS

    _join(starting)
    out = STAGE_FLOWS[args.name](
        config=stage_config(cfg, args.name), pipeline=cfg.pipeline, from_run=args.from_run or None, force=args.force
    )
    state = "reused unchanged run" if out["reused"] else "ran as run"
    print(f"\nstage {args.name}: {state} {out['run_id']} ({out.get('link') or tracking.ui_hint()})")
    for k, v in sorted(out["metrics"].items()):
        print(f"  {k} = {v:.6g}")
    return 0


_MODEL_URI = re.compile(r"^models:/([A-Za-z0-9][A-Za-z0-9_.-]*)(?:/(\d+|latest)|@([A-Za-z0-9_-]+))?$")
WORK_DIR_ENV = "LLM_PIPELINE_WORK_DIR"


def resolve_ref(ref: str) -> Path:
    """A local folder, an MLflow run id, `runs:/ID/path` or `models:/name/version|@alias` -> a local model folder.

    Only what the user typed may be a local path. Everything fetched from MLflow goes under the work dir
    (LLM_PIPELINE_WORK_DIR, default .llm-pipeline) and is verified by sha256 before use: a run's outputs against
    their recorded hash, a registered version's files against its sha256 manifest (flows.registry).
    """
    p = Path(ref)
    if p.exists():
        return p
    from flows.environment import check_work_dir
    from flows.lineage import fetch_artifact
    from flows.paths import check_run_id, safe_artifact_path
    from flows.registry import resolve_model
    from flows.specs import PipelineSection
    from flows.tracking import setup_tracking

    if not (m := _MODEL_URI.match(ref)) and not ref.startswith("runs:/"):
        try:
            check_run_id(ref)
        except StageError:
            raise StageError(f"{ref!r} names no model: there is no folder {p.resolve()}; it is not a "
                             "models:/NAME[/VERSION|@ALIAS] or runs:/ID/PATH address; and it is not an MLflow run id "
                             "(letters, digits, '-', '_')") from None
    section = PipelineSection(work_dir=os.environ.get(WORK_DIR_ENV, PipelineSection().work_dir))
    _LOG_WORK_DIR[:] = [Path(section.work_dir)]
    _prepare_env(section.work_dir)
    work = check_work_dir(section.work_dir, f"{WORK_DIR_ENV}=DIR")
    tracking = setup_tracking(section.experiment, section.work_dir, section.offline_tracking)
    client = tracking.client

    if m:
        return resolve_model(tracking, ref, m.group(1), m.group(2), m.group(3), work)

    if ref.startswith("runs:/"):
        run_id, _, art = ref.removeprefix("runs:/").partition("/")
        check_run_id(run_id)
        try:
            run = client.get_run(run_id)
        except Exception as e:
            raise StageError(f"{ref}: no MLflow run {run_id} at {tracking.uri}; check the run id") from e
        art = safe_artifact_path(art or "hf")
        for k, v in run.data.tags.items():
            if k.startswith("llm.output.") and k.endswith(".artifact") and v == art:
                sha = run.data.tags[k.removesuffix(".artifact") + ".sha256"]
                return fetch_artifact(tracking, run_id, art, sha, work)
        raise StageError(f"{ref}: run {run_id} recorded no output at '{art}' (see its llm.output.* tags)")

    tried = f"{ref!r} names no model: there is no folder {p.resolve()}; it is not a models:/ or runs:/ address"
    try:
        run = client.get_run(ref)
    except Exception as e:
        raise StageError(f"{tried}; and there is no MLflow run {ref} at {tracking.uri}") from e
    tags = run.data.tags
    outputs = [o for o in tags.get("llm.outputs", "").split(",") if o]
    for name in ("hf", "checkpoint", *outputs):
        if name in outputs:
            art = safe_artifact_path(tags[f"llm.output.{name}.artifact"], f"output '{name}' of run {ref}")
            return fetch_artifact(tracking, ref, art, tags[f"llm.output.{name}.sha256"], work)
    raise StageError(f"run {ref} has no model output (outputs: {outputs or 'none'})")


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def add_server_commands(subparsers: Any) -> None:
    """Add `up`, `down` and `serve` (flows.supervisor, flows.deploy) to the `llm-pipeline` command line."""
    _add_up(subparsers)
    _add_down(subparsers)
    _add_serve(subparsers)
    _add_deploy(subparsers)


def _add_up(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "up",
        help="start a Prefect server and an MLflow server with local storage",
        description="Start a Prefect server and an MLflow server (SQLite + artifact folder under the work dir, or "
        "the database --backend-store-uri names) on 127.0.0.1, wait until both answer, print the UI addresses and "
        "the variables to export. Ctrl-C or SIGTERM stops both.",
    )
    p.add_argument("--backend-store-uri", default=None, metavar="URI",
                   help="MLflow's database, e.g. postgresql://USER@HOST:5432/DB (keep the password in ~/.pgpass; "
                   "one given in the URI is passed to the server through an owner-only file); created and migrated "
                   "once before the server starts (default: sqlite:///<work dir>/mlflow.db)")
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
                   help="host name(s) clients and browsers use to reach the servers, comma-separated; the first "
                   "is printed, and an exposed MLflow answers only these and loopback (default: --host, or this "
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
        func=(lambda a: up(
                a.work_dir, a.host, a.prefect_port, a.mlflow_port, detach=a.detach,
                auth=True if a.auth else False if a.no_auth else None, advertise=a.advertise, mlflow_workers=a.mlflow_workers,
                timeout_s=a.timeout, backend_store_uri=a.backend_store_uri,
            )
        )
    )  # fmt: skip


def _add_down(subparsers: Any) -> None:
    p = subparsers.add_parser("down", help="stop servers started with `llm-pipeline up --detach`")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="the work dir given to `up` (default %(default)s)",
    )
    p.set_defaults(func=(lambda a: down(a.work_dir)))


def _add_serve(subparsers: Any) -> None:
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
    _add_set(p, "override one config value in those defaults; repeatable")
    p.add_argument(
        "--name",
        default=None,
        help="deployment name shown in the UI as FLOW/NAME (default: the config file's name, or 'default')",
    )
    p.add_argument("--limit", type=int, default=1,
                   help="flow runs executed at once by this process (default %(default)s: training runs should not "
                   "share a machine)")  # fmt: skip
    p.set_defaults(
        func=(lambda a: serve(
                a.work_dir, a.name or deployment_name(a.config), a.limit,
                config=a.config, overrides=a.overrides,
            )
        )
    )  # fmt: skip


def _add_deploy(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "deploy",
        help="deploy the pipeline and every stage to Prefect work pools (a CPU pool and a GPU pool) for workers",
        description="Create the work pools (process type) and register the pipeline and every stage as "
        "deployments in them: ingest, tokenizer and the pipeline flow on the CPU pool, the other stages on the GPU "
        "pool, whose concurrency limit is one run per GPU machine. `prefect worker start --pool NAME` on each "
        "machine runs them; the pipeline deployment hands each stage to its pool and waits.",
    )
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="where `llm-pipeline up` recorded its servers, used when the env vars are unset (default %(default)s)")  # fmt: skip
    p.add_argument("--config", type=Path, default=None, help="pipeline config the deployments start from")
    _add_set(p, "override one config value in those defaults; repeatable")
    p.add_argument("--name", default=None, help="deployment name (default: the config file's name)")
    p.add_argument("--cpu-pool", default="cpu", help="work pool of ingest, tokenizer and the pipeline flow")
    p.add_argument("--gpu-pool", default="gpu", help="work pool of pretrain, sft, reward, ppo and evaluate")
    p.add_argument("--gpu-slots", type=int, default=1,
                   help="flow runs the GPU pool runs at once: one per GPU machine (default %(default)s)")
    p.set_defaults(func=lambda a: deploy(a.work_dir, a.name or deployment_name(a.config), a.config, a.overrides,
                                         a.cpu_pool, a.gpu_pool, a.gpu_slots))


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: it imports torch, which main() overlaps with the temporary Prefect server.
    from llm.cli import register as register_model_commands

    parser = argparse.ArgumentParser(
        prog="llm-pipeline",
        description="Train a language model from raw text to an aligned assistant, tracked in MLflow, run by Prefect.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, also of errors in "
                        "config, data or run references (accepted anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run the whole pipeline (unchanged stages are reused)")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("stage", help="run one stage from upstream MLflow runs")
    p.add_argument("name", choices=STAGE_NAMES, help="the stage to run")
    p.add_argument(
        "--from-run",
        action="append",
        default=[],
        metavar="RUN_ID",
        help="upstream MLflow run: a pipeline run, a stage run (its ancestors come along) or stage=RUN_ID; "
        "repeatable; default: the latest finished run of each upstream stage",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_stage)
    register_model_commands(sub, resolve_ref=resolve_ref)
    add_server_commands(sub)
    add_gc_command(sub, _add_set, _load)
    return parser


def _log_work_dir(args: argparse.Namespace | None) -> Path:
    """Where this command's error log goes first (flows.errors falls back elsewhere when it cannot be written)."""
    if _LOG_WORK_DIR:
        return _LOG_WORK_DIR[0]
    if args is not None and getattr(args, "work_dir", None) is not None:
        return Path(args.work_dir)
    return Path(os.environ.get(WORK_DIR_ENV) or DEFAULT_WORK_DIR)


def _work_dir_hint(args: argparse.Namespace | None) -> str:
    command = getattr(args, "command", None)
    if command in ("run", "stage"):
        return WORK_DIR_HINT
    if command in ("generate", "export"):
        return f"{WORK_DIR_ENV}=DIR"
    if command == "serve":
        return f"--work-dir DIR, and {WORK_DIR_HINT} for the runs"
    return "--work-dir DIR"


def main(argv: Sequence[str] | None = None) -> int:
    """The `llm-pipeline` command: whatever escapes a command is one line naming the fix (exit 2), or an internal
    error (exit 1), plus the path of a log file with the traceback (flows.errors); `--debug` prints it too."""
    from flows import errors

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "alembic", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ[DEBUG_ENV] = "1"  # read by the Prefect log filter (flows.prefect_ui), here and in flow runs
    args: argparse.Namespace | None = None
    try:
        _prepare_env()
        if argv[:1] in (["run"], ["stage"]) and not {"-h", "--help"} & set(argv) and _prefect_home_ready():
            prestart_prefect()  # before the parser imports torch (llm.cli): the server boots meanwhile
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("llm-pipeline: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return errors.report(e, _log_work_dir(args), debug=debug, work_dir_hint=_work_dir_hint(args))


if __name__ == "__main__":
    sys.exit(main())
