"""Flow layer on fake stages: MLflow lineage, caching, resolution, buffering tracker, Prefect flows, CLI. Run: .venv/bin/pytest tests/test_flows.py"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import flows_fakes as ff
import pytest

from flows.cache_key import cache_key
from flows.config import build_config_model
from flows.lineage import resolve_upstream
from flows.stage_runner import run_stage
from flows.tracking import MlflowTracker, TrackingUnavailableError, is_transient, setup_tracking
from stages.common import StageError, TransientError

SPECS = ff.fake_specs()
BY_NAME = {s.name: s for s in SPECS}


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ff.reset()


def _chain(sec: Any, cfg: ff.FakeConfig | None = None, stop: str = "ppo", **kw: Any) -> dict[str, Any]:
    outs: dict[str, Any] = {}
    for spec in SPECS:
        outs[spec.name] = run_stage(spec, cfg or ff.FakeConfig(), sec,
                                    upstream={u: outs[u].run_id for u in spec.upstream_stages}, **kw)
        if spec.name == stop:
            break
    return outs


def test_stage_runs_record_params_metrics_lineage_and_artifacts(tmp_path: Path) -> None:
    sec = ff.section(ff.work_dir(tmp_path))
    outs = _chain(sec, stop="sft")
    tr = setup_tracking(sec.experiment, sec.work_dir)
    c = tr.client
    assert tr.uri == f"sqlite:///{(tmp_path / 'wd' / 'mlflow.db').resolve()}"
    assert c.get_experiment(tr.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    sft = c.get_run(outs["sft"].run_id)
    t = sft.data.tags
    assert sft.info.status == "FINISHED" and t["llm.stage"] == "sft"
    assert t["llm.upstream.pretrain"] == outs["pretrain"].run_id and t["llm.upstream.ingest"] == outs["ingest"].run_id
    assert t["llm.input.model.artifact"] == "hf" and t["llm.input.tasks.sha256"] == outs["ingest"].output_hashes["tasks"]
    assert t["llm.output.hf.sha256"] == outs["sft"].output_hashes["hf"]
    assert sft.data.params["lr"] == "0.01" and sft.data.params["value"] == "1"
    assert [m.step for m in c.get_metric_history(sft.info.run_id, "train/loss")] == [0, 1, 2]
    assert sft.data.metrics["eval/score"] == 1.0
    assert {d.dataset.name for d in sft.inputs.dataset_inputs} == {"pretrain.model", "ingest.tasks"}
    arts = {a.path for a in c.list_artifacts(sft.info.run_id)}
    assert {"outputs.json", "config.json", "samples.json"} <= arts
    # the outputs are stored once, at the run's own location under the artifact root (the default: in the work
    # dir), recorded by reference; the scratch folder the stage ran in is gone
    location = Path(t["llm.artifact_location"])
    assert location == (tmp_path / "wd" / "artifacts" / "sft" / sft.info.run_id).resolve()
    assert (location / "hf" / "data.txt").read_text().startswith("hf:")
    assert not list((tmp_path / "wd" / "stages" / "sft").iterdir())


def test_unchanged_stage_is_reused_changed_or_forced_reruns(tmp_path: Path) -> None:
    sec = ff.section(ff.work_dir(tmp_path))
    first = _chain(sec, stop="pretrain")
    assert ff.CALLS == ["ingest", "tokenizer", "pretrain"]
    again = _chain(sec, stop="pretrain")
    assert ff.CALLS == ["ingest", "tokenizer", "pretrain"], "no stage may execute when nothing changed"
    assert all(again[s].reused and again[s].run_id == first[s].run_id for s in again)
    changed = run_stage(BY_NAME["ingest"], ff.FakeConfig(value=2), sec)
    assert not changed.reused and changed.run_id != first["ingest"].run_id
    # downstream of a changed input gets a new cache key
    tok = run_stage(BY_NAME["tokenizer"], ff.FakeConfig(), sec, upstream={"ingest": changed.run_id})
    assert not tok.reused and tok.cache_key != first["tokenizer"].cache_key
    forced = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec, force=True)
    assert not forced.reused and forced.output_hashes == first["ingest"].output_hashes
    assert ff.CALLS.count("ingest") == 3


def test_cache_key_covers_config_inputs_and_code() -> None:
    base = cache_key("sft", ff.FakeConfig(), {"model": "a"}, "code1")
    assert base == cache_key("sft", ff.FakeConfig(), {"model": "a"}, "code1")
    assert base != cache_key("sft", ff.FakeConfig(value=2), {"model": "a"}, "code1")
    assert base != cache_key("sft", ff.FakeConfig(), {"model": "b"}, "code1")
    assert base != cache_key("sft", ff.FakeConfig(), {"model": "a"}, "code2")


def test_upstream_resolution_latest_stage_run_and_explicit(tmp_path: Path) -> None:
    sec = ff.section(ff.work_dir(tmp_path))
    old = _chain(sec, stop="sft")
    new_pre = run_stage(BY_NAME["pretrain"], ff.FakeConfig(value=5), sec,
                        upstream={"tokenizer": old["tokenizer"].run_id, "ingest": old["ingest"].run_id})
    tr = setup_tracking(sec.experiment, sec.work_dir)
    spec = BY_NAME["sft"]
    latest = resolve_upstream(tr, spec)
    assert latest["pretrain"].info.run_id == new_pre.run_id
    # a stage run id brings itself and its recorded ancestors
    via_old = resolve_upstream(tr, spec, from_run=[old["pretrain"].run_id])
    assert via_old["pretrain"].info.run_id == old["pretrain"].run_id
    assert via_old["ingest"].info.run_id == old["ingest"].run_id
    explicit = resolve_upstream(tr, spec, from_run=[f"pretrain={old['pretrain'].run_id}"])
    assert explicit["pretrain"].info.run_id == old["pretrain"].run_id
    with pytest.raises(StageError, match="not a 'tokenizer' stage run"):
        resolve_upstream(tr, spec, from_run=[f"tokenizer={old['pretrain'].run_id}"])
    with pytest.raises(StageError, match="not found"):
        resolve_upstream(tr, spec, from_run=["0123456789abcdef0123456789abcdef"])


def test_stage_without_upstream_runs_fails_clearly(tmp_path: Path) -> None:
    sec = ff.section(ff.work_dir(tmp_path))
    with pytest.raises(StageError, match=r"needs a finished 'ingest' run.*llm-pipeline stage ingest"):
        run_stage(BY_NAME["sft"], ff.FakeConfig(), sec)
    assert ff.CALLS == []


def test_failed_stage_marks_run_failed_and_is_not_cached(tmp_path: Path) -> None:
    sec = ff.section(ff.work_dir(tmp_path))
    with pytest.raises(StageError, match="bad data"):
        run_stage(BY_NAME["ingest"], ff.FakeConfig(fail=True), sec)
    tr = setup_tracking(sec.experiment, sec.work_dir)
    runs = tr.client.search_runs([tr.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"] and "bad data" in runs[0].data.tags["llm.error"]


class FlakyClient:
    """Stands in for MlflowClient: the first `fail` log_batch calls raise ConnectionError."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.got: list[tuple[str, float, int]] = []

    def log_batch(self, run_id: str, metrics: list[Any], synchronous: bool = True) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("connection refused")
        self.got.extend((m.key, m.value, m.step) for m in metrics)


def test_tracker_buffers_through_outage_and_loses_nothing(tmp_path: Path) -> None:
    client = FlakyClient(fail=4)
    spill = tmp_path / "spill.jsonl"
    t = MlflowTracker(client, "run1", spill_path=spill, flush_interval=0.05)
    for step in range(2500):  # more than two log_batch limits
        t.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
    assert spill.exists() and len(spill.read_text().splitlines()) == 5000
    t.close(timeout=30)
    assert [v for k, v, s in client.got if k == "loss"] == [float(s) for s in range(2500)]
    assert len(client.got) == 5000 and t.pending == 0 and t.failures >= 4
    assert not spill.exists(), "the spill file goes once everything is delivered"


def test_tracker_gives_up_with_transient_error_and_keeps_spill(tmp_path: Path) -> None:
    client = FlakyClient(fail=10**6)
    spill = tmp_path / "spill.jsonl"
    t = MlflowTracker(client, "run1", spill_path=spill, flush_interval=0.05)
    t.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(TransientError, match="spill.jsonl"):
        t.close(timeout=1)
    assert json.loads(spill.read_text().splitlines()[0])["key"] == "loss"


def test_transient_classification() -> None:
    from pydantic import ValidationError

    from flows.config import PipelineSection

    assert is_transient(TransientError("x")) and is_transient(ConnectionError()) and is_transient(TimeoutError())
    try:
        raise RuntimeError("wrapped") from ConnectionResetError()
    except RuntimeError as e:
        assert is_transient(e)
    assert not is_transient(StageError("bad data")) and not is_transient(ValueError("bug"))
    assert not is_transient(TrackingUnavailableError("down"))
    with pytest.raises(ValidationError) as e:
        PipelineSection(retries=-1)
    assert not is_transient(e.value)


# ------------------------------------------------------------------------------------------- Prefect flows


@pytest.fixture(scope="module")
def pipeline_flow() -> Any:
    from flows.pipeline import make_pipeline_flow

    ff.prefect_harness()
    return make_pipeline_flow(SPECS, config_model=build_config_model(SPECS))


def _read_artifact(key: str) -> str:
    """The latest Prefect artifact with `key` (its markdown or table data)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                               sort=ArtifactSort.CREATED_DESC, limit=1)

    arts = asyncio.run(read())
    assert arts, f"no Prefect artifact {key!r}"
    return str(arts[0].data)


def test_pipeline_flow_parent_child_runs_registry_and_cached_rerun(tmp_path: Path, pipeline_flow: Any) -> None:
    cfg = pipeline_flow.config_model.model_validate({"pipeline": {"work_dir": str(ff.work_dir(tmp_path)), "system_metrics": False,
                                             "registered_model": "fake-assistant"}})
    res = pipeline_flow(config=cfg)
    tr = setup_tracking(cfg.pipeline.experiment, cfg.pipeline.work_dir)
    c = tr.client
    parent = c.get_run(res["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["llm.pipeline"] == "true"
    children = c.search_runs([tr.experiment_id], f"tags.`mlflow.parentRunId` = '{res['run_id']}'")
    assert sorted(r.data.tags["llm.stage"] for r in children) == sorted(s.name for s in SPECS)
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.data.metrics["ppo/eval/score"] == 1.0
    versions = c.search_model_versions("name='fake-assistant'")
    ppo_run = parent.data.tags["llm.stage_run.ppo"]
    assert len(versions) == 1 and versions[0].run_id == ppo_run, "the PPO run that trained it is the model's source"
    assert versions[0].tags["llm.stage_run"] == ppo_run and c.get_run(ppo_run).info.status == "FINISHED"
    import mlflow

    info = mlflow.models.get_model_info("models:/fake-assistant/1")  # a chat model to the registry and serving
    assert info.metadata["task"] == "llm/v1/chat" and "messages" in info.signature.inputs.input_names()
    assert info.saved_input_example_info is not None
    assert res["model_version"] == "1" and res["model_version_created"]
    # the fake ppo stage measures no held-out exact match or KL: the gate cannot vouch for it
    assert res["model_alias"] == "candidate" and "nothing measured on held-out prompts" in res["promotion"]
    assert str(c.get_model_version_by_alias("fake-assistant", "candidate").version) == "1"
    assert parent.data.tags["llm.promotion"].startswith("candidate: nothing measured on held-out prompts")
    summary = _read_artifact("pipeline-summary")
    assert f"`{res['run_id']}`" in summary and "eval/score=1" in summary, "parent run and headline metrics listed"

    ff.CALLS.clear()
    again = pipeline_flow(config=cfg)
    assert ff.CALLS == [] and all(s["reused"] for s in again["stages"])
    assert [s["run_id"] for s in again["stages"]] == [s["run_id"] for s in res["stages"]]
    assert len(c.search_model_versions("name='fake-assistant'")) == 1 and not again["model_version_created"]

    # a stage flow started alone from the pipeline run resolves the same upstream runs (and is a cache hit)
    from flows.stage_flow import make_stage_flow

    sft_flow = make_stage_flow(BY_NAME["sft"])
    state = sft_flow(config=ff.FakeConfig(), pipeline=cfg.pipeline, from_run=[res["run_id"]], return_state=True)
    assert state.name == "Cached" and parent.data.tags["llm.stage_run.sft"] in state.message
    out = state.result()
    assert out["reused"] and out["run_id"] == parent.data.tags["llm.stage_run.sft"]


def _stage_flow_runs(pipeline_run_id: Any) -> dict[str, Any]:
    """Stage name -> the Prefect subflow run of that stage under the pipeline flow run `pipeline_run_id`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as c:
        flows = {f.id: f.name for f in c.read_flows()}
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(operator="and_", any_=[pipeline_run_id])))
    return {flows[r.flow_id]: r for r in runs}


def test_reused_stages_show_cached_and_running_stages_show_progress(tmp_path: Path, pipeline_flow: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    import flows.progress

    monkeypatch.setattr(flows.progress, "DEFAULT_INTERVAL_S", 0.2)

    def artifact(key: str) -> Any:
        with get_client(sync_client=True) as c:
            arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return max(arts, key=lambda a: a.updated) if arts else None

    seen: list[tuple[float, str]] = []

    def watch(step: int) -> None:  # mid-stage: the artifact must already show the steps done so far
        if step == 2:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (seen and "2/4 step" in seen[-1][1]):
                time.sleep(0.1)
                a = artifact("pretrain-progress")
                if a is not None:
                    seen.append((float(a.data), a.description or ""))

    ff.HOOKS["pretrain"] = watch
    cfg = pipeline_flow.config_model.model_validate({
        "pipeline": {"work_dir": str(ff.work_dir(tmp_path)), "system_metrics": False},
        "pretrain": {"steps": 4, "step_sleep_s": 0.1}})  # fmt: skip
    first = pipeline_flow(config=cfg, return_state=True)
    assert seen and seen[-1][0] == 50.0 and "loss=" in seen[-1][1], seen
    final = artifact("pretrain-progress")
    assert float(final.data) == 100.0 and "pretrain: finished" in final.description

    runs = _stage_flow_runs(first.state_details.flow_run_id)
    assert {r.state.name for r in runs.values()} == {"Completed"}, {k: r.state.name for k, r in runs.items()}
    ids = {s["stage"]: s["run_id"] for s in first.result()["stages"]}
    again = pipeline_flow(config=cfg, return_state=True)
    cached = _stage_flow_runs(again.state_details.flow_run_id)
    assert set(cached) == set(ids), "every reused stage has a run under the pipeline run"
    for stage, run in cached.items():
        assert run.state.name == "Cached" and run.state.is_completed(), (stage, run.state)
        assert ids[stage] in run.state.message, "the state names the MLflow run it reused"


def test_prefect_artifacts_and_typed_parameters(tmp_path: Path, pipeline_flow: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.utilities.callables import parameter_schema

    from flows.stage_flow import make_stage_flow

    flow = make_stage_flow(BY_NAME["ingest"])
    state = flow(config=ff.FakeConfig(), pipeline=ff.section(ff.work_dir(tmp_path)), return_state=True)
    run_id = state.state_details.flow_run_id  # this run's artifacts, not those of other tests on the server

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-summary", "ingest-samples"]),
                                               flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )

    import asyncio

    arts = asyncio.run(read())
    kinds = {a.key: a for a in arts}
    assert {"ingest-summary", "ingest-samples"} <= set(kinds)
    assert "eval/score" in kinds["ingest-summary"].data
    schema = parameter_schema(flow.fn).model_dump()
    props = schema["properties"]
    assert {"config", "pipeline", "from_run", "force"} <= set(props)
    assert all(props[p].get("description") for p in ("config", "pipeline", "from_run", "force"))
    pipe_props = parameter_schema(pipeline_flow.fn).model_dump()["properties"]
    assert pipe_props["config"].get("description") and "force" in pipe_props


def test_pipeline_stage_flow_names_are_module_level() -> None:
    """Deployments load flows by entrypoint `flows/stage_flow.py:<name>_flow`; the names must resolve."""
    import flows.stage_flow as fs

    flow = fs.make_stage_flow(BY_NAME["sft"])
    assert flow.fn.__name__ == "sft_flow" and flow.name == "sft"
    from flows.pipeline import make_pipeline_flow

    pipe = make_pipeline_flow(SPECS, config_model=build_config_model(SPECS))
    assert pipe.fn.__qualname__ == "pipeline_flow" and pipe._entrypoint == "flows.pipeline:pipeline_flow"



def test_every_stage_flow_is_a_module_attribute() -> None:
    """Module-path deployments (`flows.stage_flow.sft_flow`) load each stage's flow by its attribute name."""
    import flows.stage_flow as fs
    from flows.specs import STAGES

    assert set(fs.STAGE_FLOWS) == {s.name for s in STAGES}
    assert all(getattr(fs, f"{s.name}_flow") is fs.STAGE_FLOWS[s.name] for s in STAGES)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_parser_commands() -> None:
    from flows.cli import build_parser

    p = build_parser()
    a = p.parse_args(["stage", "sft", "--from-run", "abc", "--from-run", "ingest=def", "--set", "sft.max_steps=2"])
    assert a.name == "sft" and a.from_run == ["abc", "ingest=def"] and a.overrides == ["sft.max_steps=2"]
    a = p.parse_args(["run", "--config", "configs/tiny.yaml", "--force"])
    assert a.force and a.config == "configs/tiny.yaml"
    with pytest.raises(SystemExit):
        p.parse_args(["stage", "nosuchstage"])


def test_resolve_ref_run_id_and_registry_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import resolve_ref

    sec = ff.section(ff.work_dir(tmp_path))
    outs = _chain(sec, stop="pretrain")
    monkeypatch.setenv("LLM_PIPELINE_WORK_DIR", str(tmp_path / "wd"))
    tr = setup_tracking(sec.experiment, sec.work_dir)
    assert tr.experiment_name == "llm-pipeline"
    local = resolve_ref(outs["pretrain"].run_id)
    assert local.is_dir() and (local / "data.txt").read_text().startswith("hf:")
    assert local.resolve().is_relative_to((tmp_path / "wd").resolve())
    assert resolve_ref(str(local)) == local
    with pytest.raises(StageError):
        resolve_ref("models:/no-such-model/1")
    with pytest.raises(StageError, match="no MLflow run 0123456789abcdef"):
        resolve_ref("runs:/0123456789abcdef/hf")
    # a bad reference says what it was tried as, and why each failed
    with pytest.raises(StageError, match=r"no folder .*no/such/folder.*models:/NAME.*not an MLflow run id"):
        resolve_ref("no/such/folder")
    with pytest.raises(StageError, match=r"no folder .*0123456789abcdef.*no MLflow run 0123456789abcdef"):
        resolve_ref("0123456789abcdef")


# ------------------------------------------------------------------------------------ Prefect artifacts, links


def test_pipeline_summary_links_parent_experiment_and_headline_metrics() -> None:
    from flows.prefect_ui import key_metrics
    from flows.prefect_ui import pipeline_summary_markdown as _summary_markdown
    from flows.stage_runner import StageOutcome
    from flows.tracking import Tracking, run_link

    tr = Tracking(uri="http://127.0.0.1:5000", experiment_id="7", experiment_name="exp", embedded=False, client=None)
    link = run_link(tr, "r1")
    assert link == "http://127.0.0.1:5000/#/experiments/7/runs/r1?workflowType=machine_learning"
    pre = {"eval/exact_match/add": 0.1, "eval/exact_match": 0.2, "params": 9.0, "train/loss": 3.0, "val/bpb": 1.5,
           "val/loss": 2.0, "val/ppl": 7.0}
    assert key_metrics("pretrain", pre)[:3] == ["val/loss", "val/bpb", "eval/exact_match"]
    assert "eval/exact_match/add" not in key_metrics("pretrain", pre), "breakdowns come after overall metrics"
    assert key_metrics("reward", {"eval/reward_margin": 1.0, "a": 2.0}) == ["eval/reward_margin", "a"]
    outs = [StageOutcome(stage="pretrain", run_id="r1", reused=False, cache_key="k", metrics=pre, link=link)]
    md = _summary_markdown(outs, "m", "1", True, parent_run_id="p9", parent_link=run_link(tr, "p9"),
                           experiment_link="http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning",
                           experiment="exp")
    assert "[p9](http://127.0.0.1:5000/#/experiments/7/runs/p9?workflowType=machine_learning)" in md
    assert "[exp](http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning)" in md
    row = next(line for line in md.splitlines() if line.startswith("| pretrain"))
    assert "val/loss=2, val/bpb=1.5, eval/exact_match=0.2" in row and "[r1](" in row
    # the embedded store has no UI address: ids and the command that browses them instead of dead links
    md = _summary_markdown(outs[:0], "m", None, False, parent_run_id="p9", experiment="exp", ui_hint="mlflow ui ...")
    assert "`p9`" in md and "`exp`; browse with `mlflow ui ...`" in md


def test_stage_form_explains_internal_parameters_and_summary_links_upstream() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.prefect_ui import stage_summary_markdown
    from flows.stage_flow import make_stage_flow
    from flows.stage_runner import StageOutcome

    props = parameter_schema(make_stage_flow(BY_NAME["sft"]).fn).model_dump()["properties"]
    for name in ("upstream", "parent_run_id"):
        assert props[name]["title"] != name and name in props[name]["title"]
        assert "leave empty" in props[name]["description"].lower()
    assert props["force"]["title"] == "force"  # the other labels stay the parameter names
    out = StageOutcome(stage="sft", run_id="s1", reused=False, cache_key="k", upstream={"pretrain": "p1", "ingest": "i1"},
                       upstream_links={"pretrain": "http://h/#/experiments/1/runs/p1?workflowType=machine_learning"})
    md = stage_summary_markdown(out)
    assert "pretrain [p1](http://h/#/experiments/1/runs/p1?workflowType=machine_learning)" in md
    assert "ingest `i1`" in md  # no address known: the id alone


def test_file_path_entrypoints_load() -> None:
    """`prefect deploy flows/pipeline.py:pipeline_flow` loads the file as a script with flows/ on sys.path."""
    import subprocess
    import sys

    code = ("from prefect.flows import load_flow_from_entrypoint as load\n"
            "print(load('flows/pipeline.py:pipeline_flow').name, load('flows/stage_flow.py:sft_flow').name)")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["pipeline", "sft"]


def test_stage_run_log_has_our_records_not_library_bytecode(tmp_path: Path, pipeline_flow: Any) -> None:
    """datasets fingerprints functions with dill, which prints `dis` listings into a private buffer; Prefect's
    print capture used to pull them into the run log. Our own log records must reach the run log."""
    import asyncio

    import pyarrow as pa
    from datasets.fingerprint import Hasher
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.stage_flow import make_stage_flow

    hashes: list[str] = []
    ff.HOOKS["ingest"] = lambda step: hashes.append(Hasher.hash(pa.table({"a": [step]})))
    state = make_stage_flow(BY_NAME["ingest"])(config=ff.FakeConfig(), pipeline=ff.section(ff.work_dir(tmp_path)),
                                               return_state=True)
    assert state.is_completed() and len(set(hashes)) == 3
    APILogHandler().flush()

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )

    text = "\n".join(r.message for r in asyncio.run(read()))
    assert "LOAD_GLOBAL" not in text and "from_arrays" not in text
    assert "stage ingest: running in MLflow run" in text

