"""Two real `llm-pipeline run` processes of one config started at the same instant on one work dir, logging to a
fresh `sqlite:///` store outside it, as MLflow's documentation sets one up (slow); and store openers racing on fresh
stores. Run: .venv/bin/pytest tests/test_faults_concurrency.py"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
STAGES = ("ingest", "contamination", "tokenizer", "pretrain", "sft", "reward", "ppo", "evaluate")
MODEL = "smoke-assistant"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_cli_runs_at_once_on_a_fresh_sqlite_store_compute_each_stage_once(tmp_path: Path) -> None:
    """Both open the fresh store at once (MLflow creates its tables then: the store's lock, flows.store), and share
    the work dir, so each stage computes once (the stage locks are per work dir)."""
    import mlflow

    wd = tmp_path / "wd"
    store = f"sqlite:///{tmp_path / 'elsewhere' / 'mlruns.db'}"  # not in the work dir, its folder not there yet
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(SMOKE), "--set", f"pipeline.work_dir={wd}",
           "--set", "pipeline.system_metrics=false"]
    # one Prefect home for both, as two runs of one user share it, fresh so that nothing from earlier runs counts
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")},
           "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": store}
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=1500) for p in procs]
    wall = time.monotonic() - t0
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:] + err[-6000:]
        assert "pipeline run" in out and "finished" in out, out[-3000:]
        assert "Traceback" not in out + err, err[-6000:]
    assert not (wd / "mlflow.db").exists(), "the runs went to the configured store, not the embedded one"

    c = mlflow.MlflowClient(store)
    exp = c.get_experiment_by_name("llm-pipeline-smoke").experiment_id
    pipelines = c.search_runs([exp], "tags.`llm.pipeline` = 'true'")
    assert len(pipelines) == 2 and {r.info.status for r in pipelines} == {"FINISHED"}
    assert max(r.info.start_time for r in pipelines) < min(r.info.end_time for r in pipelines), "they overlapped"
    for stage in STAGES:
        runs = c.search_runs([exp], f"tags.`llm.stage` = '{stage}'")
        # a run that reuses a stage makes no stage run of its own: one run per stage means it computed once
        assert [r.info.status for r in runs] == ["FINISHED"], f"{stage}: {[r.info.status for r in runs]}"
        assert {p.data.tags[f"llm.stage_run.{stage}"] for p in pipelines} == {runs[0].info.run_id}, stage
        computed = [p.data.tags[f"llm.reused.{stage}"] for p in pipelines]
        assert sorted(computed) == ["false", "true"], f"{stage}: exactly one of the two runs computed it"
    versions = c.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1, f"{len(versions)} registered versions"
    assert versions[0].tags["llm.stage_run"] == c.search_runs([exp], "tags.`llm.stage` = 'ppo'")[0].info.run_id
    print(f"two concurrent smoke pipelines took {wall:.0f} s")


@pytest.mark.timeout(600)
def test_temporary_servers_started_at_once_on_one_fresh_prefect_home_both_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both servers would migrate the fresh database at once ("duplicate column"): the second spawns only after
    the first answers."""
    from flows.temp_prefect import TemporaryPrefect

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    first, second = TemporaryPrefect(), TemporaryPrefect()
    try:
        first.start()
        second.start()
        assert first.proc is not None and second.proc is None  # the second waits for the first's start
        first.wait()
        second.wait()
        assert second.proc is not None and second.proc.poll() is None and first.proc.poll() is None
        assert first.api != second.api
    finally:
        first.stop()
        second.stop()


_OPEN_STORE = """
import sys, time
from flows.tracking import setup_tracking
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # every process opens the fresh store at the same instant
tr = setup_tracking("llm-pipeline", sys.argv[1])
tr.client.create_run(tr.experiment_id)
print("ok", tr.experiment_id)
"""


@pytest.mark.timeout(600)
def test_processes_opening_a_fresh_sqlite_store_outside_the_work_dir_at_once_all_work(tmp_path: Path) -> None:
    """The issue's crash ("table latest_metrics already exists") without the pipelines around it: three processes
    (three work dirs) open one fresh `sqlite:///` file at once; one creates the tables, the others wait."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'elsewhere' / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    start = str(time.time() + 8)  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_STORE, str(tmp_path / f"wd{i}"), start], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.startswith("ok"), err[-3000:]
    assert len({out.split()[1] for out, _ in outs}) == 1, "one experiment, not three"
    assert (tmp_path / "elsewhere" / "mlruns.db.lock").exists(), "the lock lives beside the database"
    c = mlflow.MlflowClient(store)
    assert len(c.search_runs([c.get_experiment_by_name("llm-pipeline").experiment_id])) == 3
