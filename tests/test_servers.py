"""`llm-pipeline up` / `serve` against a real Prefect server and a real MLflow server on loopback: health, UI API
address, deployments with described parameters, a pipeline run started through the Prefect API the way the UI
starts it (one parameter changed), its runs and artifacts in MLflow, a clean Ctrl-C. Plus the error paths.
Run: .venv/bin/pytest tests/test_servers.py"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from browser_utils import REGISTERED_MODEL, UI_OVERRIDES, Stack, base_env, cli, free_port, wait_for

from flows import credentials, deploy, supervisor

CHANGED = ("pretrain", "max_steps", 6)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    work = root / "pipeline-work"
    s = Stack(root, overrides=[*UI_OVERRIDES, f"pipeline.work_dir={work}", "pipeline.experiment=servers-test"])
    try:
        s.start_up()
        s.start_serve()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def prefect_client_env(stack):
    # The Prefect client reads its settings from the environment of this (test) process.
    old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["PREFECT_API_URL"] = stack.client_env["PREFECT_API_URL"]
    os.environ["PREFECT_HOME"] = str(stack.root / "home" / ".prefect")
    os.environ["MLFLOW_TRACKING_URI"] = stack.client_env["MLFLOW_TRACKING_URI"]
    from prefect.settings import temporary_settings

    with temporary_settings(updates={"api.url": stack.client_env["PREFECT_API_URL"]}):
        yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def test_up_prints_addresses_and_answers(stack):
    text = stack.up_log.read_text()
    assert f"Prefect UI:  http://127.0.0.1:{stack.prefect_port}" in text
    # the printed address opens the experiments in MLflow's model-training view, not its GenAI one
    assert f"MLflow UI:   http://127.0.0.1:{stack.mlflow_port}/#/experiments?workflowType=machine_learning" in text
    assert stack.client_env == {
        "PREFECT_API_URL": f"http://127.0.0.1:{stack.prefect_port}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{stack.mlflow_port}",
    }
    assert json.loads(get(f"http://127.0.0.1:{stack.prefect_port}/api/health")) is True
    assert get(f"http://127.0.0.1:{stack.mlflow_port}/health").strip() == b"OK"
    # A UI on a non-default port must call its own API, not :4200.
    ui = json.loads(get(f"http://127.0.0.1:{stack.prefect_port}/ui-settings"))
    assert ui["api_url"] == f"http://127.0.0.1:{stack.prefect_port}/api"
    # Persistent local storage under the work dir.
    assert (stack.work / "mlflow.db").exists() and (stack.work / "prefect" / "prefect.db").exists()


def test_servers_listen_on_loopback_only(stack):
    import psutil

    listening = {
        c.laddr.port: c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in (stack.prefect_port, stack.mlflow_port)
    }
    assert listening == {stack.prefect_port: "127.0.0.1", stack.mlflow_port: "127.0.0.1"}


@pytest.fixture(scope="module")
def deployments(stack, prefect_client_env) -> dict:
    """Flow name -> deployment, once `serve` has registered all of them."""
    from prefect.client.orchestration import get_client

    expected = {"pipeline", "ingest", "tokenizer", "pretrain", "sft", "reward", "ppo"}

    def read():
        with get_client(sync_client=True) as c:
            deps = c.read_deployments()
            flows = {f.id: f.name for f in c.read_flows()}
        found = {flows[d.flow_id]: d for d in deps if d.name == stack.name}
        return found if expected <= set(found) else None

    return wait_for(read, 240, "deployments", stack.serve_proc, stack.serve_log)


def test_deployments_served_with_described_parameters(deployments):
    found = deployments
    pipe = found["pipeline"]
    schema = pipe.parameter_openapi_schema
    assert schema["properties"]["config"].get("description")
    defs = schema.get("definitions") or schema.get("$defs") or {}
    # Every field of every section carries a description: the UI form shows it under the field.
    undocumented = [
        f"{name}.{field}"
        for name, d in defs.items()
        for field, prop in d.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert defs and not undocumented, f"parameters without a description in the UI form: {undocumented}"
    # The deployment's defaults are the served config (with --set overrides).
    assert pipe.parameters["config"]["pretrain"]["max_steps"] == 4
    sft = found["sft"]
    assert set(sft.parameter_openapi_schema["properties"]) >= {"config", "from_run", "force"}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pipeline_run_from_the_api_lands_in_mlflow(stack, deployments):
    """Start the pipeline deployment with one changed parameter (what the UI's custom-run form sends)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    dep = deployments["pipeline"]
    params = copy.deepcopy(dep.parameters)
    section, key, value = CHANGED
    assert params["config"][section][key] != value
    params["config"][section][key] = value
    t0 = time.monotonic()
    fr = run_deployment(f"pipeline/{stack.name}", parameters=params, timeout=0)
    deadline = time.monotonic() + 720
    while True:
        with get_client(sync_client=True) as c:
            fr = c.read_flow_run(fr.id)
        if fr.state and fr.state.is_final():
            break
        assert time.monotonic() < deadline, (
            f"pipeline run still {fr.state} after 720 s\n{stack.serve_log.read_text()[-4000:]}"
        )
        time.sleep(2)
    assert fr.state.is_completed(), f"{fr.state}\n{stack.serve_log.read_text()[-6000:]}"
    print(f"pipeline through the served deployment: {time.monotonic() - t0:.1f} s")

    from mlflow import MlflowClient

    ml = MlflowClient(stack.client_env["MLFLOW_TRACKING_URI"])
    exp = ml.get_experiment_by_name("servers-test")
    assert exp is not None
    parents = ml.search_runs(
        [exp.experiment_id], "tags.`llm.pipeline` = 'true' and attributes.status = 'FINISHED'"
    )
    assert len(parents) == 1
    parent = parents[0]
    children = ml.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stages = {r.data.tags["llm.stage"]: r for r in children}
    assert set(stages) == {"ingest", "contamination", "tokenizer", "pretrain", "sft", "reward", "ppo", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children)
    # The changed parameter reached the stage and its run.
    assert stages["pretrain"].data.params[key] == str(value)
    # Artifacts are in the server's store (downloadable through it), not only on this disk.
    top = {a.path for a in ml.list_artifacts(stages["tokenizer"].info.run_id)}
    assert "tokenizer" in top
    assert "hf" in {a.path for a in ml.list_artifacts(stages["pretrain"].info.run_id)}
    assert any(r.data.metrics for r in children)
    versions = ml.search_model_versions(f"name='{REGISTERED_MODEL}'")
    assert versions and any(v.run_id == parent.info.run_id or v.tags.get("llm.pipeline_run") == parent.info.run_id
                            for v in versions)  # fmt: skip


def test_ctrl_c_stops_both_servers(tmp_path):
    s = Stack(tmp_path)
    try:
        s.start_up()
        pids = json.loads((s.work / "servers" / "servers.json").read_text())["pids"]
        assert s.up_proc is not None
        t0 = time.monotonic()
        s.up_proc.send_signal(signal.SIGINT)
        assert s.up_proc.wait(timeout=90) == 0  # each server gets up to 20 s to stop before SIGKILL
        print(f"Ctrl-C to both servers stopped: {time.monotonic() - t0:.1f} s")
        for pid in pids.values():
            assert not supervisor.pid_alive(pid) or _zombie(pid), f"server pid {pid} still running after Ctrl-C"
        assert supervisor.port_free("127.0.0.1", s.prefect_port) and supervisor.port_free("127.0.0.1", s.mlflow_port)
        assert not (s.work / "servers" / "servers.json").exists()
        assert "Servers stopped." in s.up_log.read_text()
    finally:
        s.stop()


def _zombie(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_auth_refuses_anonymous_clients(tmp_path):
    """`up --auth` (what a non-loopback --host turns on): both APIs refuse requests without the credentials."""
    import base64
    import urllib.error

    s = Stack(tmp_path)
    s.extra_up_args = ["--auth"]
    try:
        s.start_up()
        creds = dict(
            line.split("=", 1) for line in (s.work / "servers" / "credentials.env").read_text().split()
        )
        assert (s.work / "servers" / "credentials.env").stat().st_mode & 0o077 == 0
        assert creds["MLFLOW_AUTH_ADMIN_PASSWORD"] not in s.up_log.read_text(), "a password was printed"

        def status(url: str, user_pw: str | None) -> int:
            req = urllib.request.Request(url)
            if user_pw:
                req.add_header("Authorization", "Basic " + base64.b64encode(user_pw.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        prefect = f"http://127.0.0.1:{s.prefect_port}/api/admin/version"
        assert status(prefect, None) == 401
        assert status(prefect, "admin:wrong") == 401
        assert status(prefect, creds["PREFECT_SERVER_API_AUTH_STRING"]) == 200
        mlflow = f"http://127.0.0.1:{s.mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status(mlflow, None) == 401
        assert status(mlflow, f"admin:{creds['MLFLOW_AUTH_ADMIN_PASSWORD']}") == 200
    finally:
        s.stop()


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [*cli(), "up", "--work-dir", str(tmp_path), "--prefect-port", str(port), "--mlflow-port", str(free_port())],
            capture_output=True, text=True, timeout=60, env=base_env(tmp_path),
        )  # fmt: skip
    assert r.returncode == 2
    assert f"port {port}" in r.stderr and "--prefect-port" in r.stderr
    assert "Traceback" not in r.stderr


def test_serve_without_a_server_says_how_to_start_one(tmp_path):
    r = subprocess.run([*cli(), "serve", "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env=base_env(tmp_path))  # fmt: skip
    assert r.returncode == 2
    assert "llm-pipeline up" in r.stderr and "PREFECT_API_URL" in r.stderr
    env = {**base_env(tmp_path), "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    r = subprocess.run([*cli(), "serve", "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env=env)  # fmt: skip
    assert r.returncode == 2 and "does not answer" in r.stderr


def test_exposed_servers_get_authentication(tmp_path, monkeypatch):
    for k in ("PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME"):
        monkeypatch.delenv(k, raising=False)
    assert supervisor.is_loopback("127.0.0.1") and supervisor.is_loopback("localhost") and supervisor.is_loopback("::1")
    assert not supervisor.is_loopback("0.0.0.0") and not supervisor.is_loopback("10.0.0.5")
    creds = credentials.ensure_credentials(tmp_path)
    path = tmp_path / "credentials.env"
    assert path.stat().st_mode & 0o077 == 0, "credentials must be readable by their owner only"
    user, _, pw = creds["PREFECT_SERVER_API_AUTH_STRING"].partition(":")
    assert user and len(pw) >= 16 and len(creds["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 16
    # Stable across restarts: MLflow creates its admin user once.
    assert credentials.ensure_credentials(tmp_path) == creds
    client = credentials.client_credentials(creds)
    assert client["PREFECT_API_AUTH_STRING"] == creds["PREFECT_SERVER_API_AUTH_STRING"]
    assert client["MLFLOW_TRACKING_PASSWORD"] == creds["MLFLOW_AUTH_ADMIN_PASSWORD"]
    argv = supervisor.mlflow_command("0.0.0.0", 5000, "sqlite:///x.db", "/a", auth=True, allowed_hosts=["h:*"])
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    assert "--app-name" not in supervisor.mlflow_command("127.0.0.1", 5000, "sqlite:///x.db", "/a")


def test_exposed_mlflow_answers_only_the_advertised_names():
    names = supervisor.advertised_names("gpu-box, gpu-box.lan,172.20.0.5", "0.0.0.0")
    assert names == ["gpu-box", "gpu-box.lan", "172.20.0.5"]
    hosts = supervisor.allowed_hosts(names)
    assert {"gpu-box", "gpu-box.lan:*", "172.20.0.5:*", "localhost:*", "127.0.0.1"} <= set(hosts)
    assert not [h for h in hosts if "*" in h.split(":")[0]], "no address range the user did not name"
    assert supervisor.advertised_names(None, "10.0.0.7") == ["10.0.0.7"]
    assert "[::1]:*" in supervisor.allowed_hosts(["::1"])


def test_serve_reads_the_servers_up_recorded(tmp_path, monkeypatch):
    for k in deploy.CLIENT_VARS:
        monkeypatch.delenv(k, raising=False)
    state_dir = tmp_path / "servers"
    state_dir.mkdir()
    env = {"PREFECT_API_URL": "http://127.0.0.1:1/api", "MLFLOW_TRACKING_URI": "http://127.0.0.1:2"}
    (state_dir / supervisor.STATE_FILE).write_text(json.dumps({"pids": {"x": os.getpid()}, "env": env}))
    assert deploy.resolve_server_env(tmp_path) == env
    # The environment wins over the record.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert deploy.resolve_server_env(tmp_path)["MLFLOW_TRACKING_URI"] == "http://elsewhere:5000"
    # A record whose servers are gone is ignored.
    (state_dir / supervisor.STATE_FILE).write_text(json.dumps({"pids": {"x": 2**22 + 12345}, "env": env}))
    assert "PREFECT_API_URL" not in deploy.resolve_server_env(tmp_path)
