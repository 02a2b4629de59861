"""MLflow on a real PostgreSQL: a throw-away cluster (Debian's postgresql, installed when missing and run as the
`postgres` user on a free port), processes racing to create the MLflow schema in a fresh database, `llm-pipeline
up --backend-store-uri postgresql://...` with the password kept off the server's command line and environment,
two smoke pipelines at once through it (each stage computed once, one model version, no traceback), and the
registered version's files verified by `generate` and `export` (an altered file refused by name).

One cluster, one `up` and one pair of pipelines serve every check of the module (slow).
Run: .venv/bin/pytest tests/test_store_postgres.py"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from browser_utils import Stack, free_port

from flows.specs import STAGES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
MODEL = "smoke-assistant"
PASSWORD = "pg-Secret-4711"  # looked for in the servers' command lines and environments


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _install_postgres() -> Path:
    """Debian's PostgreSQL server binaries (installed as root when missing, as the browser test gets Chromium)."""
    if (found := _pg_bin()) is not None:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("PostgreSQL is not installed and cannot be installed here: apt-get install postgresql")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                "postgresql"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr[-2000:]}"
    found = _pg_bin()
    assert found is not None, "postgresql installed, but no /usr/lib/postgresql/*/bin/initdb"
    return found


def _as_postgres(argv: list[str], **kw) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + argv, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def postgres():
    """A cluster in a fresh folder on a free port: role `llm` (password PASSWORD) owning databases `mlflow`
    (behind `up`) and `direct` (opened by clients themselves); yields (host:port, psql argv prefix)."""
    bin_dir = _install_postgres()
    base = Path(tempfile.mkdtemp(prefix="llm-pipeline-pg-", dir="/tmp"))  # the postgres user must reach it
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    base.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    try:
        r = _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                          "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
        assert r.returncode == 0, r.stderr[-2000:]
        r = _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60",
                          "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])
        assert r.returncode == 0, r.stderr[-2000:] + (base / "server.log").read_text()[-2000:]
        psql = [str(bin_dir / "psql"), "-h", str(sock), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        for sql in (f"CREATE ROLE llm LOGIN PASSWORD '{PASSWORD}'", "CREATE DATABASE mlflow OWNER llm",
                    "CREATE DATABASE direct OWNER llm"):
            r = _as_postgres([*psql, "-c", sql])
            assert r.returncode == 0, r.stderr
        yield f"127.0.0.1:{port}", psql
    finally:
        _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def _query(psql: list[str], db: str, sql: str) -> str:
    r = _as_postgres([*psql, "-d", db, "-At", "-c", sql])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


_OPEN_STORE = """
import sys, time
from flows.tracking import setup_tracking
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
tr = setup_tracking("llm-pipeline", sys.argv[1])
tr.client.create_run(tr.experiment_id)
print("ok", tr.experiment_id)
"""


def test_processes_creating_the_mlflow_schema_in_a_fresh_database_at_once_all_work(postgres, tmp_path):
    """Clients opening `postgresql://` themselves: the database's advisory lock lets one create the schema."""
    host, psql = postgres
    uri = f"postgresql://llm:{PASSWORD}@{host}/direct"
    start = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_STORE, str(tmp_path / f"wd{i}"), start], cwd=ROOT,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.startswith("ok"), err[-3000:]
        assert "Traceback" not in err and PASSWORD not in err, err[-3000:]
    assert len({out.split()[1] for out, _ in outs}) == 1, "one experiment"
    assert _query(psql, "direct", "SELECT count(*) FROM runs") == "3"


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    """`up` with MLflow on the `mlflow` database (the password given in the URI, as a user might)."""
    host, _ = postgres
    root = tmp_path_factory.mktemp("pg-stack")
    s = Stack(root)
    s.extra_up_args = ["--backend-store-uri", f"postgresql://llm:{PASSWORD}@{host}/mlflow"]
    try:
        s.start_up()
        yield s
    finally:
        s.stop()


def test_up_runs_mlflow_on_postgres_without_the_password_on_its_command_line(stack, postgres):
    import psutil

    _, psql = postgres
    assert f"postgresql://llm:***@{postgres[0]}/mlflow" in stack.up_log.read_text()
    assert PASSWORD not in stack.up_log.read_text()
    pids = json.loads((stack.work / "servers" / "servers.json").read_text())["pids"]
    server = psutil.Process(pids["MLflow"])
    for p in [server, *server.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            assert PASSWORD not in " ".join(p.cmdline()), p.cmdline()
            assert not any(PASSWORD in v for v in p.environ().values()), "password in the server's environment"
    pgpass = stack.work / "servers" / "mlflow-store.pgpass"
    assert pgpass.stat().st_mode & 0o077 == 0
    # the schema is MLflow's, in PostgreSQL (not a SQLite file beside it)
    assert int(_query(psql, "mlflow", "SELECT count(*) FROM experiments")) >= 1
    assert not (stack.work / "mlflow.db").exists()


@pytest.fixture(scope="module")
def pipelines(stack, postgres, tmp_path_factory):
    """Two smoke pipelines started at the same instant, through `up`'s MLflow (on PostgreSQL) and Prefect."""
    root = tmp_path_factory.mktemp("pg-runs")
    wd = root / "wd"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(SMOKE), "--set", f"pipeline.work_dir={wd}",
           "--set", "pipeline.system_metrics=false", "--set", "pretrain.eval_interval=0"]
    env = {**stack.env, **stack.client_env}
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=1500) for p in procs]
    print(f"two smoke pipelines at once through up on PostgreSQL: {time.monotonic() - t0:.0f} s")
    return {"procs": procs, "outs": outs, "root": root, "env": env}


def test_two_pipelines_at_once_through_up_on_postgres_compute_each_stage_once(pipelines, stack, postgres):
    from mlflow import MlflowClient

    for p, (out, err) in zip(pipelines["procs"], pipelines["outs"], strict=True):
        assert p.returncode == 0, out[-3000:] + err[-6000:]
        assert "Traceback" not in out + err, err[-6000:]
    c = MlflowClient(stack.client_env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("llm-pipeline-smoke").experiment_id
    runs = c.search_runs([exp], "tags.`llm.pipeline` = 'true'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for spec in STAGES:
        stage_runs = c.search_runs([exp], f"tags.`llm.stage` = '{spec.name}'")
        assert [r.info.status for r in stage_runs] == ["FINISHED"], f"{spec.name}: computed once"
    versions = c.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1, f"{len(versions)} registered versions"
    # what the server recorded is in PostgreSQL
    _, psql = postgres
    n = _query(psql, "mlflow", "SELECT count(*) FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                               "WHERE e.name = 'llm-pipeline-smoke'")
    assert int(n) == 2 + len(STAGES)


def test_generate_and_export_verify_the_registered_version_and_refuse_an_altered_file(pipelines, stack):
    from mlflow import MlflowClient

    env, root = pipelines["env"], pipelines["root"]

    def cli(*args: str, work: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, capture_output=True, text=True,
                              timeout=300, env={**env, "LLM_PIPELINE_WORK_DIR": str(root / work)})

    c = MlflowClient(stack.client_env["MLFLOW_TRACKING_URI"])
    mv = c.search_model_versions(f"name='{MODEL}'")[0]
    aliases = c.get_registered_model(MODEL).aliases  # champion or candidate, set by the promotion gate
    assert aliases, "the pipeline gives its version an alias"
    ref_alias = f"models:/{MODEL}@{next(iter(aliases))}"
    r = cli("generate", "--model", f"models:/{MODEL}/{mv.version}", "--prompt", "Once upon", "--max-new-tokens",
            "4", work="gen-ok")
    assert r.returncode == 0, r.stderr[-3000:]
    # alter one stored file of the version's run where it is stored: its location under the artifact root
    run = c.get_run(mv.tags["llm.stage_run"])
    stored = Path(run.data.tags["llm.artifact_location"]) / "hf" / "config.json"
    assert stored.is_file(), run.data.tags["llm.artifact_location"]
    stored.write_text(stored.read_text() + "\n")
    for argv, work in ((("generate", "--model", f"models:/{MODEL}/{mv.version}", "--prompt", "x"), "gen-bad"),
                       (("export", "--model", ref_alias, "--out", str(root / "exported")), "exp-bad")):
        r = cli(*argv, work=work)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
        assert "Traceback" not in r.stdout + r.stderr
        line = next(ln for ln in r.stderr.splitlines() if ln.startswith("llm-pipeline: error:"))
        assert re.search(r"config\.json .*does not match the sha256 manifest", line), line
    assert not (root / "exported").exists()
