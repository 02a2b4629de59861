"""The docker files agree with the CLI: compose commands, ports and auth match `llm-pipeline up`/`serve` and their
defaults (docker itself cannot run here). Run: .venv/bin/pytest tests/test_docker.py"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from flows import supervisor

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _flags(argv: list[str]) -> dict[str, str | None]:
    """`--flag value` / `--switch` pairs of a command line, by flag."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        if argv[i].startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                out[argv[i]] = nxt
                i += 2
                continue
            out[argv[i]] = None
        i += 1
    return out


def _cli_part(argv: list[str]) -> list[str]:
    """`python -m prefect server ...` -> `prefect server ...`, the form the image's entry points take."""
    assert argv[1] == "-m"
    return argv[2:]


def _published(service: dict) -> list[tuple[str, int, int]]:
    out = []
    for p in service.get("ports", []):
        m = re.fullmatch(r"(?:(?P<ip>[\d.]+):)?(?P<host>\d+):(?P<ctr>\d+)", str(p))
        assert m, f"unrecognised port mapping {p!r}"
        out.append((m["ip"] or "0.0.0.0", int(m["host"]), int(m["ctr"])))
    return out


def test_services_present(compose):
    assert {"postgres", "prefect-server", "mlflow", "worker"} <= set(compose["services"])


def test_prefect_server_command_matches_up(compose):
    svc = compose["services"]["prefect-server"]
    ours = _cli_part(supervisor.prefect_command("0.0.0.0", supervisor.DEFAULT_PREFECT_PORT))
    assert svc["command"] == ours
    env = svc["environment"]
    assert env["PREFECT_UI_API_URL"] == f"http://localhost:{supervisor.DEFAULT_PREFECT_PORT}/api"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "PREFECT_SERVER_API_AUTH_STRING" in env


def test_mlflow_command_matches_up(compose):
    svc = compose["services"]["mlflow"]
    cmd = [str(c) for c in svc["command"]]
    assert cmd[:2] == ["mlflow", "server"]
    got = _flags(cmd)
    ours = _flags(
        _cli_part(
            supervisor.mlflow_command(
                "0.0.0.0", supervisor.DEFAULT_MLFLOW_PORT, "postgresql://x", "/mlartifacts",
                workers=2, auth=True, allowed_hosts=["h"],
            )
        )
    )  # fmt: skip
    # Same switches as `up` with auth on; values differ only where the team setup must (store URIs, hosts).
    assert set(got) == set(ours)
    assert got["--port"] == str(supervisor.DEFAULT_MLFLOW_PORT)
    assert got["--host"] == "0.0.0.0"
    assert got["--app-name"] == "basic-auth"
    assert got["--backend-store-uri"].startswith("postgresql://")
    assert got["--backend-store-uri"].endswith("/mlflow")
    allowed = got["--allowed-hosts"].split(",")
    # The worker reaches the server by its service name; the Host header check must let it in.
    assert "mlflow:5000" in allowed and "localhost:*" in allowed
    artifacts_volume = [v for v in svc["volumes"] if str(v).endswith(":" + got["--artifacts-destination"])]
    assert artifacts_volume, "the artifact store must live on a volume"
    assert svc["environment"]["MLFLOW_AUTH_CONFIG_PATH"].startswith("/etc/mlflow/")
    assert "${MLFLOW_ADMIN_PASSWORD" in svc["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert "${MLFLOW_SECRET_KEY" in svc["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"]


def test_published_ports_are_loopback_and_default(compose):
    services = compose["services"]
    assert _published(services["prefect-server"]) == [
        ("127.0.0.1", supervisor.DEFAULT_PREFECT_PORT, supervisor.DEFAULT_PREFECT_PORT)
    ]
    assert _published(services["mlflow"]) == [
        ("127.0.0.1", supervisor.DEFAULT_MLFLOW_PORT, supervisor.DEFAULT_MLFLOW_PORT)
    ]
    assert _published(services["postgres"]) == []
    assert _published(services["worker"]) == []


def test_worker_runs_serve_against_the_servers(compose):
    svc = compose["services"]["worker"]
    assert svc["command"] == ["llm-pipeline", "serve"]
    # The same subcommand exists in the CLI.
    from flows.cli import build_parser

    args = build_parser().parse_args(svc["command"][1:])
    assert args.command == "serve"
    env = svc["environment"]
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{supervisor.DEFAULT_PREFECT_PORT}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{supervisor.DEFAULT_MLFLOW_PORT}"
    assert env["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING")
    assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD")
    gpus = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["driver"] == "nvidia" and "gpu" in gpus[0]["capabilities"]


def test_secrets_are_required_not_defaulted(compose):
    text = (DOCKER / "compose.yaml").read_text()
    for var in ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY"):
        assert re.search(r"\$\{" + var + r":\?", text), f"{var} must be required (${{{var}:?...}})"
    example = (DOCKER / ".env.example").read_text()
    for var in ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY"):
        assert re.search(rf"^{var}=", example, re.M)
    ini = (DOCKER / "mlflow-auth.ini").read_text().splitlines()
    assert not [line for line in ini if line.strip().startswith("admin_password")], (
        "no password in a committed file"
    )


def test_postgres_has_a_database_per_server(compose):
    svc = compose["services"]["postgres"]
    assert svc["environment"]["POSTGRES_DB"] == "prefect"
    init = [v for v in svc["volumes"] if "docker-entrypoint-initdb.d" in v][0].split(":")[0]
    assert "CREATE DATABASE mlflow" in (DOCKER / init).read_text()


def test_dockerfile_installs_the_pinned_project():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)[1]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    assert "python3.11" in text
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    assert f"pip install {torch_pin}" in text, "the image must install the same torch pin as pyproject.toml"
    assert "pyproject.toml" in text and "pip install --no-deps ." in text
    for pkg in ("llm", "stages", "flows", "configs"):
        assert re.search(rf"^COPY {pkg} ", text, re.M), f"{pkg}/ is not copied into the image"
    assert re.search(r"^USER (?!root)", text, re.M), "the worker must not run as root"
    cmd = re.search(r"^CMD (.+)$", text, re.M)[1]
    assert yaml.safe_load(cmd) == ["llm-pipeline", "serve"]
