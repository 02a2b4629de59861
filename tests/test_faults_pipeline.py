"""Pipeline-level faults (issue 7 items 7, 8, 9, path traversal, damaged or partial uploads) on fake stages, and
the real ingest stage killed mid-upload. Run: .venv/bin/pytest tests/test_faults_pipeline.py"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import flows_fakes as ff
import pytest

from flows.lineage import fetch_artifact
from flows.outputs import stored_problem
from flows.paths import check_run_id, safe_artifact_path
from flows.stage_flow import make_stage_flow
from flows.stage_runner import run_stage
from flows.tracking import TrackingUnavailableError, replay_orphaned_spills, setup_tracking
from stages.common import StageError

SPECS = ff.fake_specs()
BY_NAME = {s.name: s for s in SPECS}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ff.reset()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on loopback that the test can stop and start again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> None:
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1",
        ]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created: the server and its workers
            self.proc.wait(timeout=30)
        self.proc = None


# ---------------------------------------------------------------------------------------- item 7: tracking


@pytest.mark.slow
def test_server_stopped_mid_stage_loses_no_metrics_and_run_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = MlflowServer(tmp_path)
    srv.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
        restarted = threading.Event()

        def hook(step: int) -> None:
            if step == 3:
                srv.stop()  # the tracking server dies while the stage trains

                def restart() -> None:
                    time.sleep(3)
                    srv.start()
                    restarted.set()

                threading.Thread(target=restart, daemon=True).start()

        ff.HOOKS["ingest"] = hook
        sec = ff.section(tmp_path / "wd", tracking_wait_s=300)
        out = run_stage(BY_NAME["ingest"], ff.FakeConfig(steps=30, step_sleep_s=0.1), sec)
        assert restarted.is_set()
        tr = setup_tracking(sec.experiment, sec.work_dir)
        run = tr.client.get_run(out.run_id)
        assert run.info.status == "FINISHED"
        history = tr.client.get_metric_history(out.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(30)), "every step's metric arrives after the outage"
        assert "outputs.json" in {a.path for a in tr.client.list_artifacts(out.run_id)}  # the outputs' record
        assert run.data.tags["llm.outputs"] == "corpus,tasks" and stored_problem(tr, run) is None
        assert not list((tmp_path / "wd" / "tracking").glob("*.jsonl")), "spill file removed once delivered"
    finally:
        srv.stop()


def test_server_down_at_start_fails_before_any_compute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    sec = ff.section(tmp_path / "wd")
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=r"not reachable.*offline_tracking"):
        run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    assert time.monotonic() - t0 < 30
    assert ff.CALLS == [] and not (tmp_path / "wd" / "stages").exists()


def test_server_down_at_start_with_offline_logging_uses_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    wd = ff.work_dir(tmp_path)
    out = run_stage(BY_NAME["ingest"], ff.FakeConfig(), ff.section(wd, offline_tracking=True))
    assert ff.CALLS == ["ingest"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tr = setup_tracking("llm-pipeline", wd)
    assert tr.client.get_run(out.run_id).info.status == "FINISHED"


def test_cli_server_down_at_start_exits_nonzero_with_message(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},  # a temporary Prefect, as a user has
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--set", f"pipeline.work_dir={tmp_path / 'wd'}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180,
    )
    assert r.returncode == 2 and "not reachable" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "wd" / "stages").exists()


# ---------------------------------------------------------------------------------------- item 8: retries


def test_transient_failure_retried_then_completes_deterministic_not_retried(tmp_path: Path) -> None:
    ff.prefect_harness()
    sec = ff.section(ff.work_dir(tmp_path), retries=2)
    flow = make_stage_flow(BY_NAME["ingest"])
    out = flow(config=ff.FakeConfig(transient_failures=2), pipeline=sec)
    assert ff.ATTEMPTS["ingest"] == 3 and not out["reused"]
    tr = setup_tracking(sec.experiment, sec.work_dir)
    statuses = sorted(r.info.status for r in tr.client.search_runs([tr.experiment_id]))
    assert statuses == ["FAILED", "FAILED", "FINISHED"]

    ff.reset()
    with pytest.raises(StageError, match="bad data"):
        flow(config=ff.FakeConfig(fail=True, value=9), pipeline=sec)
    assert ff.ATTEMPTS["ingest"] == 1, "a deterministic failure (bad data/config) is never retried"

    ff.reset()
    with pytest.raises(Exception, match="lr"):
        flow(config={"lr": -1.0}, pipeline=sec)  # rejected by validation before the stage is called
    assert ff.ATTEMPTS == {}


# ---------------------------------------------------------------------------------------- item 9: determinism


@pytest.mark.slow  # ~25 s: two full (fake) pipeline flows with model registration
def test_same_pipeline_twice_identical_hashes_no_duplicate_versions(tmp_path: Path) -> None:
    from flows.pipeline import make_pipeline_flow

    ff.prefect_harness()
    flow = make_pipeline_flow(SPECS)
    cfg = flow.config_model.model_validate(
        {"pipeline": {"work_dir": str(ff.work_dir(tmp_path)), "system_metrics": False, "registered_model": "m9"}}
    )
    first = flow(config=cfg)
    forced = flow(config=cfg, force=True)  # executes every stage again
    assert not any(s["reused"] for s in forced["stages"])
    assert [s["output_hashes"] for s in forced["stages"]] == [s["output_hashes"] for s in first["stages"]]
    assert [s["run_id"] for s in forced["stages"]] != [s["run_id"] for s in first["stages"]]
    tr = setup_tracking(cfg.pipeline.experiment, cfg.pipeline.work_dir)
    assert len(tr.client.search_model_versions("name='m9'")) == 1 and not forced["model_version_created"]


# ---------------------------------------------------------------------------------------- path traversal


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "~/x", "a\\..\\x", "", "a//b"])
def test_artifact_paths_cannot_escape(bad: str) -> None:
    with pytest.raises(StageError):
        safe_artifact_path(bad)


def test_run_ids_and_refs_are_checked() -> None:
    for bad in ["../../etc", "a/b", "x" * 100, ""]:
        with pytest.raises(StageError):
            check_run_id(bad)
    assert safe_artifact_path("hf/model.safetensors") == "hf/model.safetensors"


def test_tampered_lineage_tag_and_escaping_outputs_are_refused(tmp_path: Path) -> None:
    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd)
    ing = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    tr = setup_tracking(sec.experiment, sec.work_dir)
    # an artifact path recorded in MLflow that points outside the work dir is never followed
    tr.client.set_tag(ing.run_id, "llm.output.corpus.artifact", "../../../../tmp/evil")
    with pytest.raises(StageError, match="escape"):
        run_stage(BY_NAME["tokenizer"], ff.FakeConfig(), sec, upstream={"ingest": ing.run_id})
    with pytest.raises(StageError, match="escape"):
        fetch_artifact(tr, ing.run_id, "../../x", "0" * 64, wd)
    # a stage that reports an output outside its out_dir fails and its run is marked failed
    with pytest.raises(StageError, match="outside"):
        run_stage(BY_NAME["ingest"], ff.FakeConfig(escape=True), sec)


def test_symlink_inside_an_output_cannot_smuggle_outside_files(tmp_path: Path) -> None:
    from flows.stage_runner import check_outputs as _check_outputs
    from stages.common import StageResult

    out_dir = tmp_path / "out"
    (out_dir / "corpus").mkdir(parents=True)
    (out_dir / "corpus" / "ok.txt").write_text("ok")
    assert _check_outputs(StageResult(outputs={"corpus": out_dir / "corpus"}), out_dir, "ingest")
    (tmp_path / "secret.txt").write_text("secret")
    (out_dir / "corpus" / "leak.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(StageError, match="outside"):
        _check_outputs(StageResult(outputs={"corpus": out_dir / "corpus"}), out_dir, "ingest")
    with pytest.raises(StageError, match="plain name"):
        _check_outputs(StageResult(outputs={"../x": out_dir / "corpus"}), out_dir, "ingest")


def _stored(wd: Path, rel: str) -> Path:
    return next((wd / "artifacts").rglob(rel))  # the one stored copy: under the artifact root (default: in wd)


def _flip(path: Path) -> None:  # same size, other bytes
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupted_artifact_is_detected_by_hash(tmp_path: Path) -> None:
    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd)
    ing = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    tr = setup_tracking(sec.experiment, sec.work_dir)
    assert fetch_artifact(tr, ing.run_id, "corpus", ing.output_hashes["corpus"], wd) == _stored(wd, "corpus")
    _flip(_stored(wd, "corpus/data.txt"))  # read in place: the file changed since it was hashed, so it is again
    for reader in (wd, tmp_path / "elsewhere"):
        with pytest.raises(StageError, match=r"data\.txt \(sha256 \w+, recorded \w+\) does not match the sha256 "
                                             "manifest"):
            fetch_artifact(tr, ing.run_id, "corpus", ing.output_hashes["corpus"], reader)


@pytest.mark.parametrize("damage", ["deleted", "truncated", "rewritten"])
def test_finished_run_whose_stored_outputs_were_damaged_is_not_reused(tmp_path: Path, damage: str) -> None:
    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd)
    first = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    stored = _stored(wd, "corpus/data.txt")
    {"deleted": stored.unlink, "truncated": lambda: stored.write_text(stored.read_text()[:5]),
     "rewritten": lambda: _flip(stored)}[damage]()
    second = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    assert ff.CALLS == ["ingest", "ingest"] and not second.reused and second.run_id != first.run_id
    assert second.output_hashes == first.output_hashes
    tr = setup_tracking(sec.experiment, wd)
    assert "output 'corpus'" in tr.client.get_run(first.run_id).data.tags["llm.artifacts_damaged"]
    for name, art in second.outputs.items():
        fetch_artifact(tr, second.run_id, art, second.output_hashes[name], tmp_path / "check")
    assert run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec).run_id == second.run_id, "the intact run is reused"
    assert run_stage(BY_NAME["tokenizer"], ff.FakeConfig(), sec).upstream == {"ingest": second.run_id}



_KILLED_STAGE = """
import pathlib, sys, time
import flows_fakes as ff
from flows.stage_runner import run_stage

work, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])

def hook(step):
    if step == 5:
        print("logging", flush=True)  # the parent stops the server now, then creates `go`
        while not go.exists():
            time.sleep(0.1)
    if step == 20:
        print("kill me", flush=True)
        time.sleep(600)

ff.HOOKS["ingest"] = hook
spec = {s.name: s for s in ff.fake_specs()}["ingest"]
run_stage(spec, ff.FakeConfig(steps=30, step_sleep_s=0.05), ff.section(work, tracking_wait_s=300))
"""


@pytest.mark.slow
def test_metrics_of_a_stage_killed_while_the_server_is_down_reach_their_run_exactly_once(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    srv = MlflowServer(tmp_path)
    srv.start()
    work, go = tmp_path / "wd", tmp_path / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": srv.uri, "PYTHONPATH": str(ROOT / "tests")}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_STAGE, str(work), str(go)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "logging"
        srv.stop()
        go.touch()
        assert child.stdout.readline().strip() == "kill me"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        (spill,) = (work / "tracking").glob("*.jsonl")
        killed_run = spill.stem
        saved = spill.read_bytes()
        srv.start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
        out = run_stage(BY_NAME["ingest"], ff.FakeConfig(steps=3), ff.section(work))  # the rerun replays first
        client = setup_tracking(ff.section(work).experiment, work).client
        history = client.get_metric_history(killed_run, "train/loss")
        assert sorted(m.step for m in history) == list(range(20)), "each metric logged before the kill, once"
        assert client.get_run(killed_run).info.status == "FAILED"
        assert client.get_run(out.run_id).info.status == "FINISHED" and out.run_id != killed_run
        assert not list((work / "tracking").glob("*.jsonl")), "the spill file is gone once delivered"
        # a replay of metrics that already arrived (a process that died after delivering) adds nothing
        spill.write_bytes(saved)
        assert replay_orphaned_spills(client, work / "tracking") == {killed_run: 40}
        assert len(client.get_metric_history(killed_run, "train/loss")) == 20
    finally:
        child.kill()
        srv.stop()


_OPEN_STORE = """
import sys, time
from flows.tracking import setup_tracking
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # both processes open the fresh store at the same instant
tr = setup_tracking("llm-pipeline", sys.argv[1])
tr.client.create_run(tr.experiment_id)
print("ok", tr.experiment_id)
"""


@pytest.mark.slow
def test_two_processes_opening_a_fresh_embedded_store_at_once_both_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = str(time.time() + 8)  # after both interpreters have imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_STORE, str(tmp_path / "wd"), start], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.startswith("ok"), err[-3000:]
    assert len({out.split()[1] for out, _ in outs}) == 1, "one experiment, not two"
    tr = setup_tracking("llm-pipeline", tmp_path / "wd")  # the store is usable afterwards
    assert len(tr.client.search_runs([tr.experiment_id])) == 2


@pytest.mark.slow
@pytest.mark.parametrize("pretrain_values", [(1, 1), (1, 2)], ids=["same-config", "different-pretraining"])
def test_two_pipelines_at_once_compute_each_shared_stage_once(tmp_path: Path, pretrain_values) -> None:
    """Two runs against one work dir and store, started together: every stage they share runs once (the other run
    waits on the stage's lock, then reuses it), one registered version per distinct model, both succeed."""
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: F401 - imported once here: lazy imports race in threads

    from flows.config import build_config_model
    from flows.pipeline import run_pipeline

    def plain_flow(spec):  # the stage flows without Prefect: each thread is one `llm-pipeline run`
        def call(config, pipeline, force, upstream, parent_run_id):
            return run_stage(spec, config, pipeline, upstream=upstream, parent_run_id=parent_run_id,
                             force=force).to_dict()
        return call

    work = str(ff.work_dir(tmp_path))
    cfgs = [build_config_model(SPECS).model_validate(
        {"pipeline": {"work_dir": work, "system_metrics": False, "registered_model": "m10"},
         **{s.name: {"steps": 5, "step_sleep_s": 0.05} for s in SPECS},
         "pretrain": {"steps": 5, "step_sleep_s": 0.05, "value": v}}) for v in pretrain_values]
    flows_ = {s.name: plain_flow(s) for s in SPECS}
    results: list[dict] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def one_run(cfg) -> None:
        start.wait()
        try:
            results.append(run_pipeline(cfg, flows_, SPECS))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=one_run, args=(c,)) for c in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(results) == 2
    distinct = len(set(pretrain_values))
    shared = {"ingest", "tokenizer"} if distinct == 2 else {s.name for s in SPECS}
    expected = sorted([s.name for s in SPECS] + [s.name for s in SPECS if s.name not in shared])
    assert sorted(ff.CALLS) == expected, "each shared stage computed once, each other stage once per run"
    a, b = ({s["stage"]: s["run_id"] for s in r["stages"]} for r in results)
    assert {k for k in a if a[k] == b[k]} == shared, "the runs share exactly the shared stages' runs"
    tr = setup_tracking(cfgs[0].pipeline.experiment, work)
    assert len(tr.client.search_model_versions("name='m10'")) == distinct


# ---------------------------------------------------------------------------------------- kill during artifact upload

_UPLOAD_KILLED = """
import pathlib, sys, time
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
import test_faults_pipeline as t

outputs = pathlib.Path(sys.argv[1]) / "stages"

def pausing(log_artifact):
    def log_one(self, local_file, artifact_path=None):
        log_artifact(self, local_file, artifact_path)
        if pathlib.Path(local_file).is_relative_to(outputs):  # one file of the stage's outputs is in the store
            print("kill me", flush=True)
            time.sleep(600)
    return log_one

for repo in (LocalArtifactRepository, HttpArtifactRepository):
    repo.log_artifact = pausing(repo.log_artifact)
# the local store copies a whole folder in one call; file by file (as MLflow's HTTP client does), a kill can fall
# between two files of one output
LocalArtifactRepository.log_artifacts = HttpArtifactRepository.log_artifacts
t.run_smoke_ingest(pathlib.Path(sys.argv[1]))
"""


def run_smoke_ingest(work: Path):
    """The real `ingest` stage with configs/smoke.yaml's settings, in `work`."""
    import yaml

    from flows.specs import STAGES, PipelineSection
    from stages.ingest import Config

    smoke = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    sec = PipelineSection(**{**smoke["pipeline"], "work_dir": str(work), "system_metrics": False})
    return run_stage(STAGES[0], Config.model_validate(smoke["ingest"]), sec)


def _stored_files(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _stored_files(client, run_id, f.path) if f.is_dir else [f.path]
    return out


@pytest.mark.parametrize("store", ["embedded", pytest.param("server", marks=pytest.mark.slow)])
def test_stage_killed_mid_upload_is_stored_again_without_computing_again(tmp_path: Path, monkeypatch,
                                                                         store: str) -> None:
    work = ff.work_dir(tmp_path)
    srv = MlflowServer(tmp_path) if store == "server" else None
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    if srv:
        srv.start()
        env["MLFLOW_TRACKING_URI"] = srv.uri
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    child = subprocess.Popen([sys.executable, "-c", _UPLOAD_KILLED, str(work)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "kill me"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        tr = setup_tracking("llm-pipeline-smoke", work)
        (killed,) = tr.client.search_runs([tr.experiment_id])
        partial = _stored_files(tr.client, killed.info.run_id)
        local = [p for p in (work / "stages" / "ingest").rglob("*") if p.is_file()]
        assert 1 <= len([p for p in partial if p != "config.json"]) < len(local), "killed between two output files"
        spill = work / "tracking" / f"{killed.info.run_id}.jsonl"
        assert killed.info.status == "RUNNING" and spill.exists(), "the dead process left its run and spill file"

        # the killed run is never reused, but what it computed is: the new run stores it without computing it
        monkeypatch.setattr("stages.ingest.run", lambda *a, **k: pytest.fail("computed again despite its record"))
        out = run_smoke_ingest(work)
        assert not out.reused and out.run_id != killed.info.run_id and out.metrics["rows"] > 0
        for name, art in out.outputs.items():  # downloaded in full and checked against the recorded sha256
            fetch_artifact(tr, out.run_id, art, out.output_hashes[name], tmp_path / "check")
        assert tr.client.get_run(killed.info.run_id).info.status == "FAILED", "the killed run ends FAILED"
        assert not spill.exists()
        again = run_smoke_ingest(work)
        assert again.reused and again.run_id == out.run_id
    finally:
        child.kill()
        if srv:
            srv.stop()
