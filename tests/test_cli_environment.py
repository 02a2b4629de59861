"""Every `llm-pipeline` command in a broken environment, through the real command line: a server that does not answer,
a lock on the MLflow store held by another program, a read-only work dir (a read-only mount) and a full disk (a
full tmpfs) each end the command within seconds, before any pipeline work, with exit code 2, one line naming the
fix, the path of a log file holding the traceback, and no traceback on the terminal; an internal error exits 1
the same way, and `--debug` prints the traceback.

Not every fault applies to every command: `down` reaches no server and opens no store, `deploy` writes nothing on
this machine and opens no store (its workers do), so those cells are left out. The mounts need root (CI runs as
root); without it those cases are skipped.
Run: .venv/bin/pytest tests/test_cli_environment.py"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mount(args: list[str]) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here ({r.stderr.strip()}); run as root")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Paths and processes shared by the cases: a read-only mount, a full tmpfs, a held store lock, a store locked
    by a SQLite writer, a dead port and a fake Prefect server that only answers its health check."""
    root = tmp_path_factory.mktemp("cli-env")
    home = root / "home"
    home.mkdir()
    ro, full = root / "ro", root / "full"
    ro.mkdir()
    full.mkdir()
    (ro / "wd" / "servers").mkdir(parents=True)
    # a record of servers that are gone: `down` has to remove it
    (ro / "wd" / "servers" / "servers.json").write_text(json.dumps({"pids": {"MLflow": 2**22 + 7}, "env": {}}))
    mounted = []
    try:
        _mount(["--bind", str(ro), str(ro)])
        mounted.append(ro)
        _mount(["-o", "remount,ro,bind", str(ro)])
        _mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full)])
        mounted.append(full)
        with open(full / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        # another program (no llm-pipeline record) holds the store's lock file
        foreign = root / "foreign"
        foreign.mkdir()
        lock = open(foreign / "mlruns.db.lock", "a")  # noqa: SIM115 - closed below
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        # an existing store whose database a SQLite writer keeps locked (a sqlite3 shell in a transaction)
        busy = root / "busy"
        busy.mkdir()
        from flows.store import prepare_store

        prepare_store(f"sqlite:///{busy / 'mlruns.db'}")
        writer = sqlite3.connect(busy / "mlruns.db", timeout=1)
        writer.execute("BEGIN EXCLUSIVE")
        health = _fake_prefect()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LLM_PIPELINE_"))}
        base.update(HOME=str(home), PREFECT_HOME=str(home / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    MLFLOW_ENABLE_TELEMETRY="false", DO_NOT_TRACK="1", LLM_PIPELINE_LOCK_TIMEOUT_S="2")
        yield {"root": root, "ro": ro / "wd", "full": full / "wd", "foreign": foreign / "mlruns.db",
               "busy": busy / "mlruns.db", "dead": f"127.0.0.1:{_free_port()}", "prefect": health, "base": base}
        writer.rollback()
        writer.close()
        lock.close()
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", str(m)], check=False)


def _fake_prefect() -> str:
    """An address whose /api/health answers like a Prefect server's (serve and deploy then go on to their checks)."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.path.endswith("/health") else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/api"


def _cases(e: dict) -> list[tuple[str, list[str], dict[str, str], tuple[str, ...]]]:
    """(case id, argv, extra env, texts the error line must hold)."""
    ro, full, dead = str(e["ro"]), str(e["full"]), e["dead"]
    foreign = {"MLFLOW_TRACKING_URI": f"sqlite:///{e['foreign']}"}
    busy = {"MLFLOW_TRACKING_URI": f"sqlite:///{e['busy']}"}
    unreachable = {"MLFLOW_TRACKING_URI": f"http://{dead}"}
    prefect = {"PREFECT_API_URL": e["prefect"]}
    lock_fix = ("mlruns.db.lock", "LLM_PIPELINE_LOCK_TIMEOUT_S")
    wd = lambda d: ["--set", f"pipeline.work_dir={d}"]  # noqa: E731
    run = ["run", "--config", SMOKE]
    stage = ["stage", "ingest", "--config", SMOKE]
    gen = ["generate", "--model", "models:/tiny/1", "--prompt", "x"]
    exp = ["export", "--model", "models:/tiny/1", "--out", str(e["root"] / "exported")]
    serve = ["serve", "--config", SMOKE, "--work-dir"]
    return [
        # run and stage
        ("run-unreachable-mlflow", run + wd(e["root"] / "w1"), unreachable, ("not reachable", "llm-pipeline up")),
        ("run-unreachable-prefect", run + wd(e["root"] / "w1"), {"PREFECT_API_URL": f"http://{dead}/api"},
         ("PREFECT_API_URL", "does not answer")),
        ("run-foreign-lock", run + wd(e["root"] / "w1"), foreign, lock_fix),
        ("run-read-only", run + wd(ro), {}, ("read-only", "--set pipeline.work_dir=DIR")),
        ("run-full-disk", run + wd(full), {}, ("no space left", "--set pipeline.work_dir=DIR")),
        ("run-read-only-artifact-root", run + wd(e["root"] / "w1") + ["--set", f"pipeline.artifact_root={ro}"], {},
         ("the artifact root", "read-only", "pipeline.artifact_root")),
        ("run-unreachable-artifact-root", run + wd(e["root"] / "w1") + ["--set", "pipeline.artifact_root=s3://b/p"],
         {"AWS_ENDPOINT_URL_S3": f"http://{dead}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
         ("the artifact root s3://b/p", "cannot be written", "AWS_ENDPOINT_URL_S3")),
        ("stage-unreachable-mlflow", stage + wd(e["root"] / "w1"), unreachable, ("not reachable",)),
        ("stage-foreign-lock", stage + wd(e["root"] / "w1"), foreign, lock_fix),
        ("stage-store-locked-by-sqlite", stage + wd(e["root"] / "w1"), busy, ("database is locked", "Close")),
        ("stage-read-only", stage + wd(ro), {}, ("read-only", "--set pipeline.work_dir=DIR")),
        ("stage-full-disk", stage + wd(full), {}, ("no space left",)),
        # generate and export of a registered model (a local folder needs no environment)
        ("generate-unreachable-mlflow", gen, unreachable, ("not reachable",)),
        ("generate-foreign-lock", gen, foreign, lock_fix),
        ("generate-read-only", gen, {"LLM_PIPELINE_WORK_DIR": ro}, ("read-only", "LLM_PIPELINE_WORK_DIR=DIR")),
        ("generate-full-disk", gen, {"LLM_PIPELINE_WORK_DIR": full}, ("no space left", "LLM_PIPELINE_WORK_DIR")),
        ("export-unreachable-mlflow", exp, unreachable, ("not reachable",)),
        ("export-foreign-lock", exp, foreign, lock_fix),
        ("export-read-only", exp, {"LLM_PIPELINE_WORK_DIR": ro}, ("read-only", "LLM_PIPELINE_WORK_DIR=DIR")),
        ("export-full-disk", exp, {"LLM_PIPELINE_WORK_DIR": full}, ("no space left",)),
        # up: its database server, its store, its work dir
        ("up-unreachable-database", ["up", "--work-dir", str(e["root"] / "w2"), "--backend-store-uri",
                                     f"postgresql://llm@{dead}/mlflow", "--prefect-port", str(_free_port()),
                                     "--mlflow-port", str(_free_port())], {},
         ("cannot connect to the MLflow database", "postgresql://llm@")),
        ("up-foreign-lock", ["up", "--work-dir", str(e["root"] / "w2"), "--backend-store-uri",
                             f"sqlite:///{e['foreign']}", "--prefect-port", str(_free_port()),
                             "--mlflow-port", str(_free_port())], {}, lock_fix),
        ("up-read-only", ["up", "--work-dir", ro], {}, ("read-only", "--work-dir DIR")),
        ("up-full-disk", ["up", "--work-dir", full], {}, ("no space left", "--work-dir DIR")),
        # down: the record of stopped servers cannot be removed from a read-only work dir
        ("down-read-only", ["down", "--work-dir", ro], {}, ("could not be removed", "servers.json")),
        # serve: the Prefect server, then what its runs need (work dir, MLflow store)
        ("serve-unreachable-prefect", [*serve, str(e["root"] / "w3")], {"PREFECT_API_URL": f"http://{dead}/api"},
         ("does not answer", "llm-pipeline up")),
        ("serve-unreachable-mlflow", [*serve, str(e["root"] / "w3"), *wd(e["root"] / "w3")],
         {**prefect, **unreachable}, ("not reachable",)),
        ("serve-foreign-lock", [*serve, str(e["root"] / "w3"), *wd(e["root"] / "w3")], {**prefect, **foreign},
         lock_fix),
        ("serve-read-only", [*serve, ro, *wd(ro)], prefect, ("read-only", "--set pipeline.work_dir=DIR")),
        ("serve-full-disk", [*serve, full, *wd(full)], prefect, ("no space left",)),
        # deploy: the Prefect server
        ("deploy-unreachable-prefect", ["deploy", "--config", SMOKE, "--work-dir", str(e["root"] / "w4")],
         {"PREFECT_API_URL": f"http://{dead}/api"}, ("does not answer",)),
    ]


def _cli(e: dict, argv: list[str], extra: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=cwd or e["root"], capture_output=True,
                          text=True, timeout=180, env={**e["base"], **extra})


def _one_line_and_a_log(r: subprocess.CompletedProcess, code: int, *texts: str) -> Path:
    """The error line holds `texts`, the next line names a log file that holds the traceback; none on the screen."""
    out = r.stdout + r.stderr
    assert r.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-5000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("llm-pipeline: ")]
    errors = [ln for ln in lines if ln.startswith("llm-pipeline: error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for t in texts:
        assert t in errors[0], f"{t!r} not in {errors[0]!r}"
    m = re.search(r"the traceback is in (\S+)", r.stderr)
    assert m, r.stderr[-2000:]
    log = Path(m.group(1))
    assert log.is_file() and "Traceback" in log.read_text()
    return log


@pytest.mark.timeout(900)
def test_every_command_in_a_broken_environment_exits_2_with_one_line_and_a_log(env):
    cases = _cases(env)
    # two at a time: each case is mostly a Python start-up
    def timed(case):
        t0 = time.monotonic()
        return _cli(env, case[1], case[2]), time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=2) as pool:
        results, took = zip(*pool.map(timed, cases), strict=True)
    slowest = sorted(zip(took, (c[0] for c in cases), strict=True), reverse=True)[:8]
    print("slowest cases: " + ", ".join(f"{name} {t:.1f}s" for t, name in slowest))
    failures = []
    logs = {}
    for (name, _, _, texts), r in zip(cases, results, strict=True):
        try:
            logs[name] = _one_line_and_a_log(r, 2, *texts)
        except AssertionError as err:
            failures.append(f"{name}: {err}")
    assert not failures, "\n\n".join(failures)
    commands = {name.split("-")[0] for name, *_ in cases}
    assert commands == {"run", "stage", "generate", "export", "up", "down", "serve", "deploy"}
    # the work dir cannot take the log: it goes to the fallback under $HOME instead
    home = Path(env["base"]["HOME"])
    for name in ("run-read-only", "up-full-disk", "generate-full-disk"):
        assert logs[name].is_relative_to(home / ".local" / "state" / "llm-pipeline" / "logs"), logs[name]
    assert logs["run-unreachable-mlflow"].is_relative_to(env["root"] / "w1" / "logs")


def test_debug_prints_the_traceback_and_an_internal_error_exits_1(env):
    r = _cli(env, ["--debug", "up", "--work-dir", str(env["ro"])], {})
    assert r.returncode == 2 and "Traceback" in r.stderr and "read-only" in r.stderr
    # a bug (here: a command that raises KeyError) is an internal error: exit 1, one line, the log to report
    code = ("import sys, flows.cli as c\n"
            "def broken(args):\n    return {}['missing']\n"
            "c.cmd_stage = broken\nsys.exit(c.main(['stage', 'ingest']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=env["root"], capture_output=True, text=True, timeout=120,
                       env=env["base"])
    log = _one_line_and_a_log(r, 1, "internal error (KeyError", "report it")
    assert "broken" in log.read_text()


def test_a_foreign_lock_is_waited_for_then_named_and_our_own_is_waited_for_with_a_line(tmp_path, monkeypatch, caplog):
    """In-process: a lock file held by something that left no record times out naming the file and the holder's
    pid; one held by an llm-pipeline process (a record naming it) is waited for as long as it is held."""
    from flows.locks import LockTimeoutError, file_lock

    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError) as err, file_lock(path, "the test", timeout_s=1):
            pass
        assert time.monotonic() - t0 < 10
        assert str(path) in str(err.value) and f"process {holder.pid}" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    ours = subprocess.Popen([sys.executable, "-c", "import sys, time; from flows.locks import file_lock\n"
                             "with file_lock(__import__('pathlib').Path(sys.argv[1]), 'a long stage'):\n"
                             "    print('held', flush=True); time.sleep(3)", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert ours.stdout.readline().strip() == "held"
        caplog.set_level("INFO", logger="flows.locks")
        caplog.clear()
        t0 = time.monotonic()
        with file_lock(path, "the test", timeout_s=0.5):  # waits beyond the timeout: the holder is ours
            waited = time.monotonic() - t0
        assert waited > 1.0
        said = [r.getMessage() for r in caplog.records if "waiting for the test" in r.getMessage()]
        assert said and f"llm-pipeline process {ours.pid}" in said[0], said
    finally:
        ours.wait(timeout=30)
