"""Prefect work pools with real workers: `llm-pipeline deploy` on a real Prefect server, one `prefect worker` per
pool (`cpu`, `gpu`), two smoke pipelines started at once from the pipeline deployment. Ingest and tokenizer run on
the CPU worker, the other stages on the GPU worker, and with the GPU pool's limit of 1 no two training stages ever
run at the same time. Run: .venv/bin/pytest tests/test_work_pools.py   (slow: a dozen flow-run processes)
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
GPU_STAGES = {"pretrain", "sft", "reward", "ppo", "evaluate"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_stack(tmp_path):
    """A Prefect server, and the environment for the CLI and the workers."""
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")},
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # Workers look for new runs every 10 s by default; the test hands a dozen stage runs from pool to pool.
           "PREFECT_WORKER_QUERY_SECONDS": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port), "--no-ui"], env=env, cwd=tmp_path,
                              stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)]  # noqa: SIM115
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2):
                break
        except OSError:
            assert time.monotonic() < deadline and procs[0].poll() is None, (logs / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield env, tmp_path, logs, procs
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def _flow_runs(api: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    with temporary_settings(updates={"api.url": api}), get_client(sync_client=True) as client:
        return client.read_flow_runs(limit=200)


def test_stages_run_on_their_pools_and_training_never_overlaps(prefect_stack):
    env, tmp, logs, procs = prefect_stack
    wd = tmp / "wd"
    p = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--config", str(SMOKE), "--set",
                        f"pipeline.work_dir={wd}", "--set", "pipeline.system_metrics=false", "--gpu-slots", "1"],
                       env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "pretrain/smoke" in p.stdout and "work pool gpu" in p.stdout and "prefect worker start" in p.stdout
    for pool, extra in (("cpu", []), ("gpu", ["--limit", "1"])):
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, *extra],
                                      env=env, cwd=tmp, stdout=open(logs / f"worker-{pool}.log", "w"),  # noqa: SIM115
                                      stderr=subprocess.STDOUT))

    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    api = env["PREFECT_API_URL"]
    with temporary_settings(updates={"api.url": api}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("pipeline/smoke")
        assert dep.work_pool_name == "cpu" and dep.parameters["config"]["pipeline"]["dispatch"] == "deployments"
        other = copy.deepcopy(dep.parameters["config"])
        other["pretrain"]["seed"] = other["pretrain"].get("seed", 0) + 1  # so that both pipelines train
        runs = [client.create_flow_run_from_deployment(dep.id, parameters=params)
                for params in (dep.parameters, {"config": other})]
        deadline = time.monotonic() + 1800
        while True:
            states = [client.read_flow_run(r.id).state for r in runs]
            if all(s is not None and s.is_final() for s in states):
                break
            assert time.monotonic() < deadline, [s.name for s in states if s]
            assert all(q.poll() is None for q in procs), "a server or worker died: see " + str(logs)
            time.sleep(3)
    logs_text = {pool: (logs / f"worker-{pool}.log").read_text() for pool in ("cpu", "gpu")}
    assert all(s.is_completed() for s in states), ([s.message for s in states], logs_text["cpu"][-3000:])

    by_flow: dict[str, list] = {}
    for fr in _flow_runs(api):
        if fr.deployment_id is not None:
            by_flow.setdefault(_flow_name(api, fr.flow_id), []).append(fr)
    assert len(by_flow["pipeline"]) == 2 and len(by_flow["pretrain"]) == 2, {k: len(v) for k, v in by_flow.items()}
    for flow, frs in by_flow.items():
        pool = "gpu" if flow in GPU_STAGES else "cpu"
        for fr in frs:
            assert fr.work_pool_name == pool, (flow, fr.work_pool_name)
            assert str(fr.id) in logs_text[pool], f"{flow} run {fr.id} was not picked up by the {pool} worker"
    training = sorted((fr.start_time, fr.end_time, fr.name) for f in GPU_STAGES for fr in by_flow.get(f, []))
    assert len(training) >= 2 * len(GPU_STAGES) - 2
    for (s1, e1, n1), (s2, e2, n2) in zip(training, training[1:], strict=False):
        assert e1 <= s2, f"{n1} ({s1}-{e1}) and {n2} ({s2}-{e2}) trained at the same time"


_FLOW_NAMES: dict = {}


def _flow_name(api: str, flow_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    if flow_id not in _FLOW_NAMES:
        with temporary_settings(updates={"api.url": api}), get_client(sync_client=True) as client:
            _FLOW_NAMES[flow_id] = client.read_flow(flow_id).name
    return _FLOW_NAMES[flow_id]
