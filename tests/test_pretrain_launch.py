"""Multi-process pretraining launched by the stage itself (stages/runtime/launch.py), through the real CLI on the smoke
config: 2 gloo workers on CPU, one MLflow run, per-step losses from rank 0 only that equal a one-process run with
the same global batch; a worker killed with SIGKILL fails the stage naming its rank, and a rerun resumes. The
launcher also runs FSDP, and two machines (two launchers on 127.0.0.1, one worker each, static rendezvous).

Run: .venv/bin/pytest tests/test_pretrain_launch.py   (slow: full smoke pipelines and worker processes)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _env(tmp: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")},
            "PREFECT_HOME": str(tmp / "prefect")}


def _cli(tmp: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args, "--config", str(SMOKE), "--set",
            f"pipeline.work_dir={tmp / 'wd'}", "--set", "pipeline.system_metrics=false"]


def _client(tmp: Path):
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{tmp / 'wd' / 'mlflow.db'}")
    return c, c.get_experiment_by_name("llm-pipeline-smoke").experiment_id


def _losses(c, run_id: str) -> list[tuple[int, float]]:
    """The per-step train/loss history (the stage's final summary value is logged at step 0)."""
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train/loss") if m.step > 0)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The smoke pipeline with pretraining on 2 workers (micro batch 2 each: a global batch of 4 sequences)."""
    tmp = tmp_path_factory.mktemp("launch")
    p = subprocess.run([*_cli(tmp, "run"), "--set", "pretrain.nproc_per_node=2", "--set", "pretrain.micro_batch_size=2"],
                       cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return tmp


def test_two_workers_make_one_tracked_run_matching_one_process(launched):
    tmp = launched
    c, exp = _client(tmp)
    (pipeline,) = c.search_runs([exp], "tags.`llm.pipeline` = 'true'")
    (two,) = c.search_runs([exp], "tags.`llm.stage` = 'pretrain'")
    assert two.info.status == "FINISHED" and two.data.params["nproc_per_node"] == "2"
    assert pipeline.data.tags["llm.stage_run.pretrain"] == two.info.run_id  # lineage as usual
    assert {"checkpoint", "hf"} <= {a.path for a in c.list_artifacts(two.info.run_id)}
    losses = _losses(c, two.info.run_id)
    assert [s for s, _ in losses] == [1, 2, 3, 4], losses  # one value per step: rank 0 only
    # the same stage on one process, micro batch 4 (the same global batch), from the same tokenizer run
    p = subprocess.run([*_cli(tmp, "stage", "pretrain"), "--from-run", pipeline.info.run_id,
                        "--set", "pretrain.nproc_per_node=1", "--set", "pretrain.micro_batch_size=4"],
                       cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    one = next(r for r in c.search_runs([exp], "tags.`llm.stage` = 'pretrain'") if r.info.run_id != two.info.run_id)
    assert one.data.tags["llm.upstream.tokenizer"] == two.data.tags["llm.upstream.tokenizer"]
    np.testing.assert_allclose([x for _, x in losses], [x for _, x in _losses(c, one.info.run_id)], rtol=2e-5)
    np.testing.assert_allclose(two.data.metrics["val/loss"], one.data.metrics["val/loss"], rtol=2e-5)


def _worker_pids(stage_dir: Path) -> dict[int, int]:
    """RANK -> pid of the workers, from the pid files they write."""
    return {int(f.stem.removeprefix("rank")): int(f.read_text()) for f in stage_dir.glob(".launch/rank*.pid")}


def test_a_killed_worker_fails_the_stage_naming_its_rank_and_a_rerun_resumes(launched):
    tmp = launched
    c, exp = _client(tmp)
    (pipeline,) = c.search_runs([exp], "tags.`llm.pipeline` = 'true'")
    cmd = [*_cli(tmp, "stage", "pretrain"), "--from-run", pipeline.info.run_id, "--set", "pretrain.nproc_per_node=2",
           "--set", "pretrain.micro_batch_size=2", "--set", "pretrain.max_steps=400",
           "--set", "pretrain.checkpoint_interval=20", "--set", "pretrain.eval_interval=400"]
    proc = subprocess.Popen(cmd, cwd=tmp, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while not (ckpts := list((tmp / "wd" / "stages" / "pretrain").glob("*/train_checkpoints/step_00000020"))):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.5)
    workers = _worker_pids(ckpts[0].parent.parent)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-4000:]
    assert "llm-pipeline: error: pretrain worker rank 1 (exit code -9)" in err and "resume" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    failed = [r for r in c.search_runs([exp], "tags.`llm.stage` = 'pretrain'") if r.info.status == "FAILED"]
    assert len(failed) == 1

    p = subprocess.run(cmd, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    done = [r for r in c.search_runs([exp], "tags.`llm.stage` = 'pretrain'")
            if r.info.status == "FINISHED" and r.data.params.get("max_steps") == "400"]
    assert len(done) == 1 and done[0].data.metrics["train/resumed_from"] >= 20, done[0].data.metrics
    assert [s for s, _ in _losses(c, done[0].info.run_id)][-1] == 400



def _two_worker_run(c, exp):
    """The pipeline's pretrain run on 2 workers of one machine (4 steps, micro batch 2)."""
    return next(r for r in c.search_runs([exp], "tags.`llm.stage` = 'pretrain'")
                if r.data.params.get("nproc_per_node") == "2" and r.data.params.get("max_steps") == "4")


def _direct(tmp: Path, out: Path, *sets: str) -> list[str]:
    """`python -m stages.pretrain` (no Prefect, no MLflow) on the launched pipeline's tokenizer output."""
    (tok_dir,) = (tmp / "wd" / "artifacts" / "tokenizer").glob("*/tokenizer")  # where the pipeline stored it
    cmd = [sys.executable, "-m", "stages.pretrain", "--tokenizer", str(tok_dir), "--tokens",
           str(tok_dir.parent / "tokens"), "--out", str(out), "--config", str(SMOKE), "--set", "micro_batch_size=2"]
    return cmd + [a for kv in sets for a in ("--set", kv)]


def test_fsdp_through_the_launcher_matches_ddp(launched):
    c, exp = _client(launched)
    p = subprocess.run(_direct(launched, launched / "fsdp", "nproc_per_node=2", "parallel=fsdp"), cwd=ROOT,
                       env=_env(launched), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    metrics = json.loads(p.stdout.strip().splitlines()[-1])["metrics"]
    np.testing.assert_allclose(metrics["val/loss"], _two_worker_run(c, exp).data.metrics["val/loss"], rtol=2e-5)


def test_two_machines_meet_at_node_0s_endpoint_and_train_as_one(launched):
    """nnodes=2 as two machines run it (here both on 127.0.0.1): one worker per node, static rendezvous at node 0's
    address, the output folder on storage both see; the result equals the two-worker run of one machine."""
    tmp = launched
    c, exp = _client(tmp)
    two = _two_worker_run(c, exp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in (0, 1):
        cmd = _direct(tmp, tmp / "shared", "nnodes=2", f"node_rank={node}", f"rdzv_endpoint=127.0.0.1:{port}")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    result = json.loads(outs[0][0].strip().splitlines()[-1])
    assert json.loads(outs[1][0].strip().splitlines()[-1])["metrics"] == {}  # node 1 reports nothing
    assert (tmp / "shared" / "hf" / "model.safetensors").exists()
    assert sorted(f.name for f in (tmp / "shared" / ".launch").iterdir()) == ["rank0.pid", "rank1.pid"]
    np.testing.assert_allclose(result["metrics"]["val/loss"], two.data.metrics["val/loss"], rtol=2e-5)


def test_two_machines_without_shared_storage_are_told_so(launched):
    """Each node with its own output folder: node 1's rank cannot write into the checkpoint folder rank 0 made."""
    tmp = launched
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_direct(tmp, tmp / f"own{node}", "nnodes=2", f"node_rank={node}",
                                      f"rdzv_endpoint=127.0.0.1:{port}"),
                              cwd=ROOT, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]  # fmt: skip
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert procs[1].returncode != 0, errs[1][-3000:]
    assert "rank 1 does not see the folder rank 0 created" in errs[1] and "shared" in errs[1], errs[1][-3000:]
    assert "Traceback" not in errs[1], errs[1][-3000:]

