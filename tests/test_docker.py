"""The docker files agree with the CLI: compose commands, ports and auth match `llm-pipeline up`/`serve` and their
defaults, the servers run from the official images at the installed versions, and nothing long-running is root
(docker itself cannot run here). Run: .venv/bin/pytest tests/test_docker.py"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import version
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


def _volume_mounts(service: dict) -> dict[str, str]:
    """Named-volume mounts of a service, by container path (bind mounts of `./file` or `/path` left out)."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = str(v).split(":")[:2]
        if not src.startswith((".", "/")):
            out[dst] = src
    return out


def _python_minor() -> str:
    """The Python the worker image runs (`python3.11 -m venv` in the Dockerfile): the servers use the same."""
    return re.search(r"\bpython(3\.\d+) -m venv\b", (DOCKER / "Dockerfile").read_text())[1]


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==", 1) for d in deps if "==" in d)


def test_services_present(compose):
    assert {"postgres", "prefect-server", "mlflow", "worker"} <= set(compose["services"])


def test_servers_use_official_images_at_installed_versions(compose):
    services = compose["services"]
    prefect_version, mlflow_version = version("prefect"), version("mlflow")
    # A bump of either package (pyproject.toml and the environment) must bump the server image as well.
    assert (_pins()["prefect"], _pins()["mlflow"]) == (prefect_version, mlflow_version)
    prefect_tag = f"{prefect_version}-python{_python_minor()}"
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{prefect_tag}"
    # `-full`: the plain tag has neither psycopg2 (the Postgres backend) nor Flask-WTF (the basic-auth app).
    assert services["mlflow"]["image"] == f"ghcr.io/mlflow/mlflow:v{mlflow_version}-full"
    for name in ("prefect-server", "mlflow"):
        assert "build" not in services[name], f"{name} must run the official image, not a local build"
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile" and worker["build"]["context"] == ".."


def test_prefect_server_command_matches_up(compose):
    svc = compose["services"]["prefect-server"]
    ours = _cli_part(supervisor.prefect_command("0.0.0.0", supervisor.DEFAULT_PREFECT_PORT))
    assert svc["command"] == ours
    env = svc["environment"]
    assert env["PREFECT_UI_API_URL"] == f"http://localhost:{supervisor.DEFAULT_PREFECT_PORT}/api"
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and url.endswith("@postgres:5432/prefect")
    # the password is Prefect's placeholder ($$: compose leaves `${...}` to Prefect), filled from the secrets profile
    assert url == "postgresql+asyncpg://llm:$${PREFECT_SERVER_DATABASE_PASSWORD}@postgres:5432/prefect"
    assert "PREFECT_SERVER_API_AUTH_STRING" not in env  # from the secrets file (secrets-exec.sh prefect-server)
    assert svc["entrypoint"] == ["sh", SECRETS_EXEC, "prefect-server"]
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


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
    # the image's driver (psycopg2) named explicitly; no password: libpq reads the file secrets-exec.sh writes
    assert got["--backend-store-uri"] == "postgresql+psycopg2://llm@postgres:5432/mlflow"
    allowed = got["--allowed-hosts"].split(",")
    # The worker reaches the server by its service name; the Host header check must let it in.
    assert "mlflow:5000" in allowed and "localhost:*" in allowed
    artifacts_volume = [v for v in svc["volumes"] if str(v).endswith(":" + got["--artifacts-destination"])]
    assert artifacts_volume, "the artifact store must live on a volume"
    env = svc["environment"]
    assert env["MLFLOW_AUTH_TEMPLATE"].startswith("/etc/mlflow/")
    assert f"./mlflow-auth.ini:{env['MLFLOW_AUTH_TEMPLATE']}:ro" in svc["volumes"]
    assert svc["entrypoint"] == ["sh", SECRETS_EXEC, "mlflow"]
    for k in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_CONFIG_PATH"):
        assert k not in env, f"{k} is set by secrets-exec.sh from the secrets file"
    # As `up` runs it (flows.supervisor._server_envs): no job runner, no telemetry.
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_ENABLE_TELEMETRY"] == "false"


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
    assert svc["entrypoint"] == ["sh", SECRETS_EXEC, "client"]  # the credentials: from the secrets file
    gpus = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["driver"] == "nvidia" and "gpu" in gpus[0]["capabilities"]


SECRETS_EXEC = "/opt/llm-pipeline/secrets-exec.sh"
SECRET_KEYS = ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY",
               "MINIO_ROOT_PASSWORD")


def _depends_on(services: dict, name: str) -> set[str]:
    """Every service `name` waits for, directly or through others."""
    todo, seen = [name], set()
    while todo:
        for dep in services[todo.pop()].get("depends_on") or {}:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_secrets_come_from_the_secrets_file_not_the_environment_or_command_lines(compose):
    """`docker inspect` shows a container's environment and command, `ps` its command line: no secret in any."""
    text = (DOCKER / "compose.yaml").read_text()
    for var in SECRET_KEYS:
        assert not re.search(r"(?<!\$)\$\{" + var, text), f"{var} is interpolated into compose.yaml"
    assert compose["secrets"] == {"llm-pipeline": {"file": "./.env"}}
    services = compose["services"]
    users = [n for n, svc in services.items() if svc.get("secrets")]
    assert set(users) == set(services) - {"volume-init"}
    for name in users:
        svc = services[name]
        argv = [str(a) for a in (svc.get("entrypoint") or []) + (svc.get("command") or [])]
        env = svc.get("environment") or {}
        for var in SECRET_KEYS + ("PASSWORD", "AUTH_STRING", "SECRET_KEY"):
            assert not [k for k in env if var in k and not k.endswith("_TEMPLATE")], f"{name}: {var} in env"
        assert not [a for a in argv if re.search(r"://[^/@]+:[^/@]+@", a)], f"{name}: a password in {argv}"
        if name == "secrets-check":
            continue
        assert svc["entrypoint"][:2] == ["sh", SECRETS_EXEC], f"{name} starts without its secrets"
        assert f"./secrets-exec.sh:{SECRETS_EXEC}:ro" in svc["volumes"]
        # nothing starts before the check of the secrets file succeeded
        assert "secrets-check" in _depends_on(services, name), f"{name} does not wait for secrets-check"
    check = services["secrets-check"]
    assert check["entrypoint"] == ["sh", "/opt/llm-pipeline/check-secrets.sh", "/run/secrets/llm-pipeline"]
    assert "./check-secrets.sh:/opt/llm-pipeline/check-secrets.sh:ro" in check["volumes"]
    assert check["network_mode"] == "none" and check["cap_drop"] == ["ALL"] and check["restart"] == "no"
    example = (DOCKER / ".env.example").read_text()
    for var in SECRET_KEYS:
        assert re.search(rf"^{var}=", example, re.M)
    ini = (DOCKER / "mlflow-auth.ini").read_text().splitlines()
    assert not [line for line in ini if line.strip().startswith("admin_password")], (
        "no password in a committed file"
    )


def test_mlflow_users_get_no_permission_by_default_in_docker_and_in_up():
    from flows import credentials

    ini = (DOCKER / "mlflow-auth.ini").read_text()
    assert re.search(r"^default_permission = NO_PERMISSIONS$", ini, re.M)
    written = credentials.mlflow_auth_ini({"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "x"},
                                          "sqlite:///a.db")
    assert "default_permission = NO_PERMISSIONS" in written


def _secrets_file(path: Path, **values: str) -> Path:
    import secrets

    defaults = {k: secrets.token_urlsafe(24) for k in SECRET_KEYS}
    defaults["PREFECT_AUTH_STRING"] = "admin:" + defaults["PREFECT_AUTH_STRING"]
    path.write_text("".join(f"{k}={v}\n" for k, v in {**defaults, **values}.items()))
    path.chmod(0o600)
    return path


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(DOCKER / "check-secrets.sh"), str(path)], capture_output=True, text=True,
                          timeout=30)


def test_the_check_script_refuses_the_placeholders_and_accepts_real_values(tmp_path):
    r = _check(DOCKER / ".env.example")
    assert r.returncode != 0
    for var in SECRET_KEYS:
        assert f"{var} still holds the placeholder" in r.stderr
    assert "no service was started" in r.stderr
    r = _check(_secrets_file(tmp_path / "good.env"))
    assert r.returncode == 0 and "is ready" in r.stdout, r.stderr
    bad = {
        "short": {"POSTGRES_PASSWORD": "abc123"},
        "characters": {"MLFLOW_ADMIN_PASSWORD": "pass@word/with:stuff-long-enough"},
        "no user": {"PREFECT_AUTH_STRING": "only-a-password-long-enough"},
        "empty": {"MLFLOW_SECRET_KEY": ""},
        "placeholder in a longer value": {"POSTGRES_PASSWORD": "change-me-please-soon"},
    }
    for why, values in bad.items():
        r = _check(_secrets_file(tmp_path / "bad.env", **values))
        assert r.returncode != 0, f"{why}: {r.stdout}"
        assert next(iter(values)) in r.stderr, f"{why}: {r.stderr}"
    assert _check(tmp_path / "missing.env").returncode != 0


def test_secrets_exec_hands_each_service_its_secrets_in_private_files(tmp_path):
    """secrets-exec.sh as the services run it, on this machine: what the started command finds (Prefect's settings,
    MLflow's auth config and credentials, libpq's password file), and that none of it is in its environment."""
    path = _secrets_file(tmp_path / "secrets.env")
    values = dict(line.split("=", 1) for line in path.read_text().splitlines())
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(tmp_path), "LLM_PIPELINE_SECRETS_FILE": str(path),
           "MLFLOW_AUTH_TEMPLATE": str(DOCKER / "mlflow-auth.ini"), "PREFECT_HOME": str(tmp_path / "prefect")}
    # as compose.yaml sets it for the Prefect server, once compose has turned `$${` into `${`
    db_url = {"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://llm:${PREFECT_SERVER_DATABASE_PASSWORD}"
                                                     "@postgres:5432/prefect"}

    def run(role: str, code: str) -> dict:
        r = subprocess.run(["sh", str(DOCKER / "secrets-exec.sh"), role, sys.executable, "-c", code],
                           env={**env, **(db_url if role == "prefect-server" else {})}, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    show_env = "import json, os; print(json.dumps(dict(os.environ)))"
    for role in ("postgres", "prefect-server", "mlflow", "minio", "client"):
        seen = run(role, show_env)
        for k in ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD", "MINIO_ROOT_PASSWORD"):
            assert not [n for n, v in seen.items() if values[k] in v], f"{role}: {k} in the environment"
    pg = run("postgres", "import json, os; p = os.environ['POSTGRES_PASSWORD_FILE']; "
                         "print(json.dumps([open(p).read(), oct(os.stat(p).st_mode & 0o777)]))")
    assert pg == [values["POSTGRES_PASSWORD"], "0o600"]
    prefect = run("prefect-server", "import json; from prefect.settings import get_current_settings as s; "
                  "d = s().server; print(json.dumps([d.api.auth_string.get_secret_value(), "
                  "d.database.connection_url.get_secret_value()]))")
    assert prefect[0] == values["PREFECT_AUTH_STRING"]
    assert prefect[1] == f"postgresql+asyncpg://llm:{values['POSTGRES_PASSWORD']}@postgres:5432/prefect"
    ml = run("mlflow", "import json, os; from mlflow.server.auth.config import read_auth_config as r; c = r(); "
                       "print(json.dumps([c.default_permission, c.admin_username, c.admin_password, "
                       "open(os.environ['PGPASSFILE']).read(), os.environ['MLFLOW_FLASK_SERVER_SECRET_KEY']]))")
    assert ml[:3] == ["NO_PERMISSIONS", "admin", values["MLFLOW_ADMIN_PASSWORD"]]
    assert ml[3] == f"postgres:5432:mlflow:llm:{values['POSTGRES_PASSWORD']}\n" and ml[4] == values["MLFLOW_SECRET_KEY"]
    client = run("client", "import json; from prefect.settings import get_current_settings as s; "
                           "from mlflow.utils.credentials import read_mlflow_creds as c; "
                           "print(json.dumps([s().api.auth_string.get_secret_value(), *c()]))")
    assert client == [values["PREFECT_AUTH_STRING"], "admin", values["MLFLOW_ADMIN_PASSWORD"]]
    assert (home / ".mlflow" / "credentials").stat().st_mode & 0o077 == 0
    # MinIO reads its root credentials from the files MINIO_ROOT_*_FILE name; the clients' S3 library (botocore,
    # under s3fs) reads the same credentials from ~/.aws/credentials
    minio = run("minio", "import json, os; print(json.dumps([open(os.environ[k]).read() for k in "
                         "('MINIO_ROOT_USER_FILE', 'MINIO_ROOT_PASSWORD_FILE')] + [oct(os.stat(os.environ["
                         "'MINIO_ROOT_PASSWORD_FILE']).st_mode & 0o777)]))")
    assert minio == ["llm-pipeline", values["MINIO_ROOT_PASSWORD"], "0o600"]
    s3 = run("client", "import json, botocore.session as b; c = b.Session().get_credentials(); "
                       "print(json.dumps([c.access_key, c.secret_key]))")
    assert s3 == ["llm-pipeline", values["MINIO_ROOT_PASSWORD"]]
    assert (home / ".aws" / "credentials").stat().st_mode & 0o077 == 0


def test_postgres_has_a_database_per_server(compose):
    svc = compose["services"]["postgres"]
    assert svc["environment"]["POSTGRES_DB"] == "prefect"
    init = [v for v in svc["volumes"] if "docker-entrypoint-initdb.d" in v][0].split(":")[0]
    assert "CREATE DATABASE mlflow" in (DOCKER / init).read_text()


def _is_root(user: object) -> bool:
    return str(user).split(":")[0] in ("root", "0")


def test_no_long_running_service_runs_as_root(compose):
    services = compose["services"]
    dockerfile_user = re.findall(r"^USER (\S+)", (DOCKER / "Dockerfile").read_text(), re.M)[-1]
    # A one-shot container that the others wait for to exit; the only one is checked in the next test.
    one_shot = {
        dep
        for svc in services.values()
        for dep, cond in (svc.get("depends_on") or {}).items()
        if cond.get("condition") == "service_completed_successfully"
    }
    # `deploy` and `artifact-bucket` run as the worker image's user
    assert one_shot == {"volume-init", "deploy", "secrets-check", "artifact-bucket"}
    built = services["worker"]["image"]
    for name, svc in services.items():
        if name == "volume-init":
            continue
        if "user" in svc:
            assert not _is_root(svc["user"]), f"{name} runs as root"
        else:
            # Only the image built here may rely on its own USER (the official images define none).
            assert svc.get("build", {}).get("dockerfile") == "docker/Dockerfile" or svc.get("image") == built, (
                f"{name} has no user:")
            assert not _is_root(dockerfile_user), f"{name}'s image runs as root"
    assert services["prefect-server"]["user"] == services["mlflow"]["user"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", services["mlflow"]["user"]), "a numeric uid:gid, not root"


def test_server_volumes_are_handed_to_the_server_user_before_start(compose):
    services = compose["services"]
    init = services["volume-init"]
    # The one container that runs as root: it only chowns, without network or any other capability, and exits.
    assert init.get("restart") == "no" and init.get("network_mode") == "none"
    assert init.get("cap_drop") == ["ALL"] and init.get("cap_add") == ["CHOWN"]
    assert init["image"] == services["mlflow"]["image"], "no extra image to pull"
    assert init["command"][:2] == ["sh", "-c"]
    script = init["command"][2]
    user = services["mlflow"]["user"]
    assert f"= {user} ]" in script and f"chown -R {user} " in script
    chowned = set(shlex.split(script.split(";")[0])[3:])  # `for d in A B C`
    assert chowned == set(_volume_mounts(init)), "the script and the mounts name the same paths"
    init_volumes = set(_volume_mounts(init).values())
    for name in ("prefect-server", "mlflow", "postgres"):
        svc = services[name]
        assert svc["depends_on"]["volume-init"]["condition"] == "service_completed_successfully"
        for path, vol in _volume_mounts(svc).items():
            assert vol in init_volumes and _volume_mounts(init)[path] == vol, f"{name}: {vol} is not chowned"
        if name != "postgres":  # its image runs any uid (nss_wrapper) and keeps its own HOME
            assert svc["environment"]["HOME"] == "/tmp", "uid without a passwd entry: HOME would be /"
    assert services["postgres"]["user"] == user, "one uid reads the secrets file"
    # Prefect writes its home and the UI it serves (by default into its own, root-owned package directory).
    prefect = services["prefect-server"]
    home = prefect["environment"]["PREFECT_HOME"]
    assert home in _volume_mounts(prefect)
    assert prefect["environment"]["PREFECT_SERVER_UI_STATIC_DIRECTORY"].startswith(home + "/")
    # MLflow writes the artifact store and the auth app's user database.
    mlflow = services["mlflow"]
    artifacts = _flags([str(c) for c in mlflow["command"]])["--artifacts-destination"]
    ini = (DOCKER / "mlflow-auth.ini").read_text()
    auth_db = re.search(r"^database_uri = sqlite:///(/\S+)$", ini, re.M)[1]
    assert artifacts in _volume_mounts(mlflow)
    assert str(Path(auth_db).parent) in _volume_mounts(mlflow)


def test_minio_is_the_artifact_root_of_every_client(compose):
    """Stage outputs go to MinIO's bucket once (issue 31): every client names it as its artifact root and waits for
    the bucket; MinIO runs pinned, as the server user, on a chowned volume, its S3 API unpublished."""
    from flows.artifacts import ROOT_ENV

    services = compose["services"]
    minio = services["minio"]
    assert re.fullmatch(r"quay\.io/minio/minio:RELEASE\.[0-9T-]+Z", minio["image"]), "a pinned release"
    assert minio["user"] == services["mlflow"]["user"] and minio["environment"]["HOME"] == "/tmp"
    data = minio["command"][2]
    assert minio["command"][:2] == ["minio", "server"] and _volume_mounts(minio)[data] == "minio-data"
    assert _volume_mounts(services["volume-init"])[data] == "minio-data", "the volume is handed to the server user"
    assert _published(minio) == [("127.0.0.1", 9001, 9001)], "the console on loopback; the S3 API stays inside"
    address = _flags(minio["command"])["--address"]
    bucket = services["artifact-bucket"]
    name = re.search(r"makedirs\('([a-z0-9.-]+)'", bucket["command"][-1])[1]
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    for client in ("artifact-bucket", "worker", "deploy", "cpu-worker", "gpu-worker"):
        env = services[client]["environment"]
        assert env[ROOT_ENV] == f"s3://{name}", client
        assert env["AWS_ENDPOINT_URL_S3"] == f"http://minio{address}", client
        assert services[client]["entrypoint"] == ["sh", SECRETS_EXEC, "client"], "~/.aws/credentials is written"
        if client != "artifact-bucket":
            assert "artifact-bucket" in _depends_on(services, client), f"{client} starts before the bucket exists"


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


def test_work_pool_services_deploy_then_run_one_worker_per_pool(compose):
    """`--profile pools`: the deploy one-shot, a CPU worker and a GPU worker on the image's pools (the same pools and
    flags tests/test_work_pools.py runs for real)."""
    from flows.cli import build_parser

    services = compose["services"]
    deploy = services["deploy"]
    args = build_parser().parse_args(deploy["command"][1:])
    assert args.command == "deploy" and (args.cpu_pool, args.gpu_pool) == ("cpu", "gpu")
    assert (ROOT / deploy["command"][3]).is_file()  # the config exists in the image's /app
    for name, pool in (("cpu-worker", "cpu"), ("gpu-worker", "gpu")):
        svc = services[name]
        assert svc["profiles"] == ["pools"] and svc["image"] == services["worker"]["image"]
        assert svc["command"][:5] == ["prefect", "worker", "start", "--pool", pool]
        assert svc["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
        assert svc["environment"]["PREFECT_API_URL"] == services["worker"]["environment"]["PREFECT_API_URL"]
        assert _published(svc) == []
    assert "--limit" in services["gpu-worker"]["command"]
    assert "devices" in services["gpu-worker"]["deploy"]["resources"]["reservations"]
    assert "deploy" not in services["cpu-worker"]
