"""Two real `llm-pipeline run` processes of one config started at the same instant on one work dir and embedded
store (slow). Run: .venv/bin/pytest tests/test_faults_concurrency.py"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
STAGES = ("ingest", "tokenizer", "pretrain", "sft", "reward", "ppo", "evaluate")
MODEL = "smoke-assistant"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_cli_runs_of_one_config_at_once_compute_each_stage_once(tmp_path: Path) -> None:
    import mlflow

    wd = tmp_path / "wd"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(SMOKE), "--set", f"pipeline.work_dir={wd}",
           "--set", "pipeline.system_metrics=false"]
    # one Prefect home for both, as two runs of one user share it, fresh so that nothing from earlier runs counts
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")},
           "PREFECT_HOME": str(tmp_path / "prefect")}
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=1500) for p in procs]
    wall = time.monotonic() - t0
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:] + err[-6000:]
        assert "pipeline run" in out and "finished" in out, out[-3000:]

    c = mlflow.MlflowClient(f"sqlite:///{wd.resolve() / 'mlflow.db'}")
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
