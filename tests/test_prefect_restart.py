"""The Prefect server killed (`kill -9`) while `llm-pipeline serve` runs a pipeline from its deployment, and brought
back on the same port and database by `llm-pipeline up`: the stage that was training goes on and the run completes,
`serve` keeps serving, and the deployment started again completes by reusing every finished stage. Plus the limits:
`up` gives up on a server that keeps dying, `serve` that loses its server for good says so in one message.
Run: .venv/bin/pytest -s tests/test_prefect_restart.py (-s shows the measured timings)."""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from browser_utils import UI_OVERRIDES, Stack, free_port, wait_for

from flows import deploy, supervisor
from flows.supervisor import http_ok

EXPERIMENT = "prefect-restart-test"
STAGES = ("ingest", "tokenizer", "pretrain", "sft", "reward", "ppo")
# About 10 steps a second here: pretraining outlasts the outage plus the server's restart (asserted below).
PRETRAIN_STEPS = 1500
# How long the server stays dead before `up` may start it again; Prefect's client retries a request for about a
# minute (5 retries, 2..32 s apart), the runner's poll loop gives up after three such failures in a row.
OUTAGE_S = 15
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def prefect(stack: Stack) -> Any:
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(stack.client_env["PREFECT_API_URL"])


def log_tail(stack: Stack, n: int = 6000) -> str:
    parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in (stack.up_log, stack.serve_log) if p.exists()]
    return "\n".join(parts)


def start_pipeline(stack: Stack, deployment: Any, pretrain_steps: int) -> Any:
    """A run of the `pipeline` deployment with pretraining lengthened, as the UI's custom-run form sends it."""
    params = copy.deepcopy(deployment.parameters)
    params["config"]["pretrain"]["max_steps"] = pretrain_steps
    with prefect(stack) as c:
        return c.create_flow_run_from_deployment(deployment.id, parameters=params)


def flow_run_state(stack: Stack, flow_run_id: Any) -> tuple[str, str]:
    with prefect(stack) as c:
        fr = c.read_flow_run(flow_run_id)
    return (fr.state.type.name, fr.state.message or "") if fr.state else ("NONE", "")


def wait_final(stack: Stack, flow_run_id: Any, timeout: float, what: str) -> tuple[str, str]:
    def final() -> tuple[str, str] | None:
        state = flow_run_state(stack, flow_run_id)
        return state if state[0] in FINAL else None

    return wait_for(final, timeout, what, stack.serve_proc, stack.serve_log)


def stage_runs(ml: Any, exp_id: str, stage: str, status: str) -> list[Any]:
    return ml.search_runs([exp_id], f"tags.`llm.stage` = '{stage}' and attributes.status = '{status}'")


def last_step(ml: Any, run_id: str) -> int:
    return max((m.step for m in ml.get_metric_history(run_id, "train/loss")), default=-1)


def pipeline_stage_runs(ml: Any, exp_id: str) -> list[dict[str, str]]:
    """Tags of each pipeline parent run, oldest first."""
    runs = ml.search_runs([exp_id], "tags.`llm.pipeline` = 'true'", order_by=["attributes.start_time ASC"])
    return [r.data.tags for r in runs]


def kill_prefect_server(stack: Stack, outage_s: float) -> dict[str, float]:
    """`kill -9` of the Prefect server's process group while `up` is held still for `outage_s`, so the outage lasts
    at least that long; then `up` notices and starts it again. Returns the measured seconds."""
    pid = json.loads((stack.work / "servers" / "servers.json").read_text())["pids"]["Prefect"]
    health = f"{stack.client_env['PREFECT_API_URL']}/health"
    assert stack.up_proc is not None
    stack.up_proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not http_ok(health, timeout=1), 30, "the killed Prefect server stops answering")
        time.sleep(outage_s)
    finally:
        stack.up_proc.send_signal(signal.SIGCONT)
    wait_for(lambda: http_ok(health, timeout=2), 240, "`up` brings the Prefect server back", stack.up_proc,
             stack.up_log)  # fmt: skip
    new_pid = json.loads((stack.work / "servers" / "servers.json").read_text())["pids"]["Prefect"]
    assert new_pid != pid, "servers.json still names the dead server: `down` could not stop the new one"
    return {"down_s": time.monotonic() - t0}


# One pipeline of the smoke config with a longer pretraining, once more from cache: minutes on 2 busy cores.
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_prefect_server_killed_and_restarted_while_serve_runs_the_pipeline(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    t_start = time.monotonic()
    work = tmp_path / "pipeline-work"
    stack = Stack(tmp_path, name="restart",
                  overrides=[*UI_OVERRIDES, f"pipeline.work_dir={work}", f"pipeline.experiment={EXPERIMENT}"])  # fmt: skip
    timings: dict[str, float] = {}
    try:
        stack.start_up()
        stack.start_serve()

        def registered() -> Any:
            with prefect(stack) as c:
                try:
                    return c.read_deployment_by_name(f"pipeline/{stack.name}")
                except Exception:  # not registered yet
                    return None

        deployment = wait_for(registered, 240, "the pipeline deployment registered by `serve`", stack.serve_proc,
                              stack.serve_log)  # fmt: skip
        ml = MlflowClient(stack.client_env["MLFLOW_TRACKING_URI"])
        first = start_pipeline(stack, deployment, PRETRAIN_STEPS)

        def pretraining() -> Any:
            exp = ml.get_experiment_by_name(EXPERIMENT)
            runs = stage_runs(ml, exp.experiment_id, "pretrain", "RUNNING") if exp else []
            return (exp.experiment_id, runs[0].info.run_id) if runs and last_step(ml, runs[0].info.run_id) >= 0 else None

        exp_id, pretrain_id = wait_for(pretraining, 600, "pretraining running", stack.serve_proc, stack.serve_log)
        done_before = {s: [r.info.run_id for r in stage_runs(ml, exp_id, s, "FINISHED")] for s in STAGES}
        assert all(len(done_before[s]) == 1 for s in ("ingest", "tokenizer")), done_before
        step_at_kill = last_step(ml, pretrain_id)
        t_kill = time.monotonic()
        timings.update(kill_prefect_server(stack, OUTAGE_S))

        # The outage hit a stage that was training, and training went on through it.
        assert ml.get_run(pretrain_id).info.status == "RUNNING", (
            f"pretraining ended before the server was back: raise PRETRAIN_STEPS\n{log_tail(stack)}"
        )
        assert last_step(ml, pretrain_id) > step_at_kill
        assert "The Prefect server stopped unexpectedly (exit code -9); starting it again" in stack.up_log.read_text()

        state, message = wait_final(stack, first.id, 900, "the pipeline run started before the outage")
        timings["kill_to_first_run_final_s"] = time.monotonic() - t_kill
        assert state == "COMPLETED", f"first run {state}: {message}\n{log_tail(stack)}"
        assert ml.get_run(pretrain_id).info.status == "FINISHED"
        assert stack.serve_proc is not None and stack.serve_proc.poll() is None, "`serve` exited"
        assert stack.up_proc.poll() is None, "`up` exited"

        # The same deployment again: a new flow run, served by the same process, every stage reused.
        t_second = time.monotonic()
        second = start_pipeline(stack, deployment, PRETRAIN_STEPS)
        state, message = wait_final(stack, second.id, 600, "the pipeline run started after the outage")
        timings["second_run_s"] = time.monotonic() - t_second
        assert state == "COMPLETED", f"second run {state}: {message}\n{log_tail(stack)}"
        tags_first, tags_second = pipeline_stage_runs(ml, exp_id)
        assert tags_first["llm.stage_run.ingest"] == done_before["ingest"][0]
        assert tags_first["llm.stage_run.tokenizer"] == done_before["tokenizer"][0]
        assert tags_first["llm.stage_run.pretrain"] == pretrain_id
        for s in STAGES:
            assert tags_second[f"llm.stage_run.{s}"] == tags_first[f"llm.stage_run.{s}"], s
            assert tags_second[f"llm.reused.{s}"] == "true", s
        assert stack.serve_proc.poll() is None, "`serve` exited"
        # Ctrl-C to `up` stops the server it started again, not only the one it started first.
        timings.update({f"stop_{k}_s": v for k, v in stack.stop().items()})
        assert not http_ok(f"{stack.client_env['PREFECT_API_URL']}/health", timeout=2), "Prefect server left running"
    finally:
        if stack.up_proc is not None and stack.up_proc.poll() is None:
            stack.up_proc.send_signal(signal.SIGCONT)
        timings.update({f"stop_{k}_s": v for k, v in stack.stop().items()})
        timings["total_s"] = time.monotonic() - t_start
        print("\ntimings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))


def test_up_restarts_a_server_that_dies_and_gives_up_on_one_that_keeps_dying(tmp_path: Path) -> None:
    """A stand-in server that answers its health check, then dies a second later, every time it is started."""
    port = free_port()
    code = (
        "import http.server, os, threading\n"
        f"s = http.server.HTTPServer(('127.0.0.1', {port}), http.server.SimpleHTTPRequestHandler)\n"
        "threading.Timer(1.0, os._exit, (3,)).start()\n"
        "s.serve_forever()\n"
    )
    srv = supervisor.Server("Toy", [sys.executable, "-c", code], dict(os.environ), f"http://127.0.0.1:{port}/",
                            tmp_path / "servers" / "toy.log")  # fmt: skip
    ep = supervisor.Endpoints.make("127.0.0.1", port, port)
    srv.start(cwd=tmp_path)
    try:
        supervisor.wait_healthy([srv], 30)
        first_pid = srv.proc.pid if srv.proc else 0
        out = io.StringIO()
        with pytest.raises(supervisor.ServerError, match=r"stopped unexpectedly \(exit code 3\) 4 times within 10 min"):
            supervisor._watch([srv], tmp_path, ep, {}, 30, out)
        text = out.getvalue()
        assert text.count("The Toy server stopped unexpectedly (exit code 3); starting it again") == 3, text
        assert text.count("The Toy server is back.") == 3, text
        recorded = json.loads((tmp_path / "servers" / supervisor.STATE_FILE).read_text())["pids"]["Toy"]
        assert srv.proc is not None and recorded == srv.proc.pid != first_pid
    finally:
        if srv.proc is not None:
            supervisor.stop_group(srv.proc.pid, grace_s=5)


def test_serve_that_loses_its_prefect_server_for_good_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Prefect's runner raises when its poll loop gives up on an unreachable server becomes one message."""
    api = f"http://127.0.0.1:{free_port()}/api"
    for k in deploy.CLIENT_VARS:
        monkeypatch.delenv(k, raising=False)
    # `serve` exports the client settings into os.environ: only this one, which monkeypatch restores (no `up`
    # state in tmp_path to add others).
    monkeypatch.setenv("PREFECT_API_URL", api)
    monkeypatch.setattr(deploy, "http_ok", lambda url, timeout=2.0: True)  # up when `serve` starts
    gave_up = ExceptionGroup("unhandled errors in a TaskGroup", [
        ExceptionGroup("unhandled errors in a TaskGroup", [RuntimeError("Service exceeded error threshold.")]),
    ])  # fmt: skip

    def runner(*args: Any, **kwargs: Any) -> None:
        from prefect.settings import get_current_settings

        # More retries than Prefect's 5, passed on to the flow runs through the settings.
        assert get_current_settings().client.max_retries == deploy.CLIENT_MAX_RETRIES
        raise gave_up

    monkeypatch.setattr(deploy, "_run_until_stopped", runner)  # Prefect's runner, stopped on the first signal
    with pytest.raises(supervisor.ServerError) as e:
        deploy.serve(tmp_path, flows={}, parameters={}, out=io.StringIO())
    assert f"lost the Prefect server at {api}" in str(e.value)
    assert "RuntimeError: Service exceeded error threshold." in str(e.value)
    assert "start `llm-pipeline serve` again" in str(e.value)

    def other(*args: Any, **kwargs: Any) -> None:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [ValueError("a bug, not the server")])

    monkeypatch.setattr(deploy, "_run_until_stopped", other)
    with pytest.raises(ExceptionGroup):  # anything else is not dressed up as a lost server
        deploy.serve(tmp_path, flows={}, parameters={}, out=io.StringIO())
