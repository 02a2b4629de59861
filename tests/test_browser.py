"""The users' path through both UIs in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): start the
pipeline from the Prefect UI's custom-run form with one parameter changed, rerun one stage from its deployment,
then find the runs, a metrics chart, the artifacts and the registered model in the MLflow UI.
Screenshots of every step go to screenshots/ (or $LLM_PIPELINE_SCREENSHOTS); a failing step leaves a FAILED one.
Run: .venv/bin/pytest -m browser tests/test_browser.py"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from browser_utils import (
    CHROMIUM,
    REGISTERED_MODEL,
    UI_OVERRIDES,
    Stack,
    Steps,
    chromium,
    screenshot_dir,
    wait_for,
)

# The whole path runs the tiny pipeline once and one stage again: minutes on 2 busy cores.
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1500)]

EXPERIMENT = "browser-test"
PIPELINE_TIMEOUT_S = 720
STAGE_TIMEOUT_S = 300
# Long enough (~20 s on 2 cores) to look at the pretrain flow run's progress artifact while it trains.
PRETRAIN_STEPS = 400


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`, see `make browser-deps`)"
        )
    root = tmp_path_factory.mktemp("browser")
    s = Stack(root, name="browser",
              overrides=[*UI_OVERRIDES, f"pipeline.work_dir={root / 'pipeline-work'}", f"pipeline.experiment={EXPERIMENT}"])  # fmt: skip
    try:
        s.start_up()
        s.start_serve()
        yield s
    finally:
        s.stop()
        # The server logs go next to the screenshots: CI keeps that folder, pytest's tmp dirs get recycled.
        logs = screenshot_dir() / "browser"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (
            s.up_log,
            s.serve_log,
            s.work / "servers" / "prefect.log",
            s.work / "servers" / "mlflow.log",
        ):
            if log.exists():
                shutil.copy(log, logs / f"{log.stem}.log")


@pytest.fixture(scope="module")
def shots() -> Path:
    d = screenshot_dir() / "browser"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def prefect_api(stack: Stack):
    """A Prefect client for checks the UI cannot make (counting runs); the UI does the driving."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(stack.client_env["PREFECT_API_URL"])


def wait_registered(stack: Stack) -> None:
    expected = {"pipeline", "ingest", "tokenizer", "pretrain", "sft", "reward", "ppo"}

    def ready() -> bool:
        with prefect_api(stack) as c:
            flows = {f.id: f.name for f in c.read_flows()}
            return expected <= {flows.get(d.flow_id) for d in c.read_deployments() if d.name == stack.name}

    wait_for(ready, 240, "deployments registered by `llm-pipeline serve`", stack.serve_proc, stack.serve_log)


def open_deployment(page, base: str, flow: str) -> None:
    page.goto(f"{base}/deployments")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=flow, exact=True))
    row.get_by_role("link", name="browser", exact=True).click()
    page.get_by_role("button", name="Run", exact=True).wait_for()


def open_custom_run_form(page) -> str:
    """Run -> Custom run; returns the run name the form proposes (used to find the run afterwards)."""
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.get_by_text("Run Name", exact=True).wait_for()
    name = page.get_by_role("textbox").first.input_value()
    assert name
    return name


def form_property(page, label: str, within=None):
    """The form block of one parameter, found by its visible label."""
    scope = within or page
    return scope.locator(".schema-form-property").filter(has=page.get_by_text(label, exact=True)).last


def find_run(page, stack: Stack, run_name: str, timeout_s: float = 120):
    """The flow run the form's Submit created, once the API has it; if none comes, the failure quotes what the
    page shows (an error toast, a form message)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    def created():
        with prefect_api(stack) as c:
            runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
        return runs[0] if runs else None

    try:
        return wait_for(created, timeout_s, f"a flow run named {run_name} after Submit", stack.serve_proc,
                        stack.serve_log)  # fmt: skip
    except AssertionError as e:
        shown = [t for role in ("alert", "status") for t in page.get_by_role(role).all_inner_texts() if t.strip()]
        raise AssertionError(f"{e}\nthe page ({page.url}) shows: {shown}") from None


def submit(page, stack: Stack, run_name: str) -> None:
    """Click the form's Submit. On a loaded 2-core machine the click can land while the form is still settling and
    create nothing (the page stays on the form, with no message); then it is clicked once more, which cannot
    duplicate the run because none with this name exists yet."""
    button = page.get_by_role("button", name="Submit", exact=True)
    button.click()
    try:
        find_run(page, stack, run_name, timeout_s=45)
    except AssertionError:
        if not button.is_visible():
            raise
        button.click()


def run_state(stack: Stack, run_id):
    with prefect_api(stack) as c:
        return c.read_flow_run(run_id).state


def idle(page) -> None:
    """A blank page while training runs: a live run page keeps redrawing its timeline, and software rendering in
    headless Chromium then takes a core from the training on a 2-core machine (pretraining ran 10x slower)."""
    page.goto("about:blank")


def wait_run_state(page, stack: Stack, run_name: str, timeout_s: float) -> str:
    """On a deployment page after Submit: wait (API, on an idle page) for the run's final state, then open the run
    from the deployment's Runs tab and read that state in its header."""
    deployment_url = page.url
    run = find_run(page, stack, run_name)
    idle(page)

    def final():
        state = run_state(stack, run.id)
        return state if state is not None and state.is_final() else None

    wait_for(final, timeout_s, f"flow run {run_name} in a final state", stack.serve_proc, stack.serve_log)
    page.goto(deployment_url)
    link = page.get_by_role("link", name=run_name, exact=True).first
    try:
        link.wait_for(timeout=30_000)
        link.click()
    except Exception:  # Submit left the browser on another page than the deployment's: open the run directly
        page.goto(f"{stack.client_env['PREFECT_API_URL'].removesuffix('/api')}/runs/flow-run/{run.id}")
    page.wait_for_url(re.compile(r"/runs/flow-run/"))
    header = page.get_by_role("banner")
    deadline = time.monotonic() + 30
    final_names = ("Completed", "Cached", "Failed", "Crashed", "Cancelled")
    while True:
        for state in final_names:
            if header.get_by_text(state, exact=True).count():
                return state
        assert time.monotonic() < deadline, f"flow run {run_name}: no final state shown in its header"
        page.wait_for_timeout(1000)


def test_users_path_through_prefect_and_mlflow(stack, shots):

    wait_registered(stack)
    base = stack.client_env["PREFECT_API_URL"].removesuffix("/api")
    mlflow_url = stack.client_env["MLFLOW_TRACKING_URI"]
    with chromium() as ctx:
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        steps = Steps(page, shots, "prefect")

        # -- 2. The pipeline from the Prefect UI, one parameter changed in the custom-run form.
        pipeline_run_url = run_pipeline_with_changed_max_steps(page, steps, stack, base)

        from mlflow import MlflowClient

        ml = MlflowClient(mlflow_url)
        exp = ml.get_experiment_by_name(EXPERIMENT)
        parent = ml.search_runs([exp.experiment_id], "tags.`llm.pipeline` = 'true'")[0]
        stage_runs = {k.removeprefix("llm.stage_run."): v for k, v in parent.data.tags.items()
                      if k.startswith("llm.stage_run.")}  # fmt: skip
        assert ml.get_run(stage_runs["pretrain"]).data.params["max_steps"] == str(PRETRAIN_STEPS), (
            "the form's change did not arrive"
        )

        # -- 3. Rerun only the sft stage from its deployment, against the pipeline's upstream runs; then the
        # tokenizer stage unchanged, which reuses the pipeline's run and shows as Cached.
        rerun_sft_from_its_deployment(page, steps, stack, base, mlflow_url, stage_runs)
        unchanged_stage_shows_cached(page, steps, base, stack, stage_runs["tokenizer"])

        # -- 4. MLflow, reached from the Prefect run's summary the way a person clicks through.
        check_mlflow(page, Steps(page, shots, "mlflow"), pipeline_run_url, mlflow_url, exp.experiment_id,
                     parent.info.run_id, stage_runs)  # fmt: skip
    assert len(list(shots.glob("*.png"))) >= 10
    assert not list(shots.glob("*FAILED*"))


def run_pipeline_with_changed_max_steps(page, steps: Steps, stack, base: str) -> str:
    """Deployments -> pipeline -> custom run with pretrain's Max Steps 4 -> PRETRAIN_STEPS, submitted; the pretrain
    flow run's progress artifact looked at while it trains; the pipeline run waited for. Returns its page address."""
    from playwright.sync_api import expect

    with steps.step("deployments"):
        page.goto(f"{base}/deployments")
        expect(page.get_by_role("link", name="pipeline", exact=True)).to_be_visible()
    with steps.step("pipeline deployment"):
        open_deployment(page, base, "pipeline")
    with steps.step("custom run form pretrain max steps changed"):
        run_name = open_custom_run_form(page)
        # The Pretrain section is the one holding "Micro Batch Size"; its own "Max Steps" is the field to edit.
        pretrain = (
            page.get_by_role("group")
            .filter(has=page.get_by_text("Micro Batch Size (Optional)", exact=True))
            .filter(has=page.get_by_text("Max Steps (Optional)", exact=True))
            .last
        )
        prop = form_property(page, "Max Steps (Optional)", pretrain)
        steps_field = prop.get_by_role("spinbutton")
        assert steps_field.input_value() == "4"
        steps_field.fill(str(PRETRAIN_STEPS))
        # Leaving the field commits the edit to the form's state before Submit reads it.
        steps_field.press("Tab")
        expect(steps_field).to_have_value(str(PRETRAIN_STEPS))
        from stages.pretrain import Config as PretrainConfig

        # The field's description is shown with it (the pydantic Field description).
        description = PretrainConfig.model_fields["max_steps"].description
        expect(prop).to_contain_text(description.split("(")[0].strip())
        steps_field.scroll_into_view_if_needed()
    submit(page, stack, run_name)
    with steps.step("pretrain progress artifact while it trains"):
        progress_of_running_pretrain(page, stack, base, run_name)
    open_deployment(page, base, "pipeline")
    with steps.step("pipeline run completed"):
        state = wait_run_state(page, stack, run_name, PIPELINE_TIMEOUT_S)
        assert state == "Completed", f"pipeline run ended {state}; see {stack.serve_log}"
        pipeline_run_url = page.url
    return pipeline_run_url


def submitted_pipeline_run(page, stack: Stack, run_name: str):
    """The flow run the form's Submit created, picked up by `serve`; its parameters carry the changed field."""
    run = find_run(page, stack, run_name)
    max_steps = run.parameters.get("config", {}).get("pretrain", {}).get("max_steps")
    assert max_steps == PRETRAIN_STEPS, f"the form sent pretrain max_steps={max_steps!r}: {run.parameters}"

    def picked_up() -> bool:
        state = run_state(stack, run.id)
        return state is not None and not (state.is_scheduled() or state.is_pending())

    wait_for(picked_up, 180, f"flow run {run_name} ({run.id}) picked up by `llm-pipeline serve`", stack.serve_proc,
             stack.serve_log)  # fmt: skip
    return run


def progress_of_running_pretrain(page, stack: Stack, base: str, run_name: str) -> None:
    """Wait (API) until the pretrain flow run is Running with a progress artifact part way; then its page's
    Artifacts tab shows that artifact: steps done, rate, ETA and loss. The pipeline run ending first fails at once,
    with its state."""
    from playwright.sync_api import expect
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    pipeline_run = submitted_pipeline_run(page, stack, run_name)
    idle(page)
    found: dict[str, object] = {}

    def part_way() -> bool:
        with prefect_api(stack) as c:
            state = c.read_flow_run(pipeline_run.id).state
            assert not state.is_final(), f"pipeline run {run_name} ended {state.name} before pretrain was seen " \
                                         f"part way: {state.message}; see {stack.serve_log}"
            arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pretrain-progress"])))
            for a in arts:
                run = c.read_flow_run(a.flow_run_id) if a.flow_run_id else None
                if run is not None and run.state.is_running() and 0 < float(a.data) < 100:
                    found.update(run=run.id, description=a.description)
                    return True
        return False

    wait_for(part_way, PIPELINE_TIMEOUT_S, "a running pretrain with a progress artifact", stack.serve_proc,
             stack.serve_log)  # fmt: skip
    assert re.search(r"pretrain: \d+/400 step", str(found["description"])), found
    page.goto(f"{base}/runs/flow-run/{found['run']}")
    page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
    expect(page.get_by_text(re.compile(r"pretrain: \d+/400 step")).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"loss=")).first).to_be_visible()


def unchanged_stage_shows_cached(page, steps: Steps, base: str, stack: Stack, tokenizer_run: str) -> None:
    """The tokenizer deployment run with nothing changed ends Cached, its state naming the reused MLflow run."""
    with steps.step("tokenizer run unchanged"):
        open_deployment(page, base, "tokenizer")
        run_name = open_custom_run_form(page)
    submit(page, stack, run_name)
    with steps.step("tokenizer run cached"):
        state = wait_run_state(page, stack, run_name, STAGE_TIMEOUT_S)
        assert state == "Cached", f"an unchanged tokenizer run ended {state}; see {stack.serve_log}"
    state = run_state(stack, find_run(page, stack, run_name).id)
    assert tokenizer_run in state.message, state


def rerun_sft_from_its_deployment(page, steps: Steps, stack, base: str, mlflow_url: str,
                                  stage_runs: dict[str, str]) -> None:
    """The sft deployment run with force on; it must start from the pipeline's upstream runs and start no other
    stage."""
    from playwright.sync_api import expect

    with steps.step("sft custom run with force"):
        open_deployment(page, base, "sft")
        sft_run_name = open_custom_run_form(page)
        # Top-level `force` (the nested pipeline section has its own "Force").
        force = form_property(page, "force (Optional)").get_by_role("switch")
        force.click()
        expect(force).to_be_checked()
        force.scroll_into_view_if_needed()
    submit(page, stack, sft_run_name)
    with steps.step("sft run completed"):
        state = wait_run_state(page, stack, sft_run_name, STAGE_TIMEOUT_S)
        assert state == "Completed", f"sft run ended {state}; see {stack.serve_log}"
    with steps.step("sft run artifacts show its upstream runs"):
        page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
        page.get_by_role("link", name=re.compile("sft-summary")).click()
        summary = page.get_by_role("article").filter(has_text="Upstream runs")
        expect(summary).to_contain_text(stage_runs["pretrain"])
        expect(page.get_by_text(re.compile(r"sft: new run"))).to_be_visible()
        mlflow_link = page.get_by_role("link", name=re.compile(r"^[0-9a-f]{32}$")).first
        expect(mlflow_link).to_have_attribute("href", re.compile(re.escape(mlflow_url)))
    with prefect_api(stack) as c:
        runs_by_flow: dict[str, int] = {}
        flows = {f.id: f.name for f in c.read_flows()}
        for fr in c.read_flow_runs():
            runs_by_flow[flows[fr.flow_id]] = runs_by_flow.get(flows[fr.flow_id], 0) + 1
    # The stage rerun started no other stage: each ran once, inside the pipeline run.
    assert runs_by_flow == {"pipeline": 1, "ingest": 1, "contamination": 1, "tokenizer": 1, "pretrain": 1, "sft": 2,
                            "reward": 1, "ppo": 1, "evaluate": 1}, runs_by_flow  # fmt: skip


def check_mlflow(page, steps: Steps, pipeline_run_url: str, mlflow_url: str, exp_id: str, parent_id: str,
                 stage_runs: dict[str, str]) -> None:  # fmt: skip
    from playwright.sync_api import expect

    with steps.step("prefect pipeline summary links to mlflow"):
        page.goto(pipeline_run_url)
        page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
        page.get_by_role("link", name=re.compile("pipeline-summary")).click()
        expect(page.get_by_role("heading", name="Pipeline")).to_be_visible()
    link = page.get_by_role("link", name=stage_runs["pretrain"], exact=True)
    expect(link).to_have_attribute("href", re.compile(re.escape(mlflow_url)))
    # Prefect opens links from artifacts in a new tab.
    with page.context.expect_page() as new_tab:
        link.click()
    page = new_tab.value
    steps.page = page
    with steps.step("pretrain run overview"):
        expect(page.get_by_role("heading", name="pretrain", level=2)).to_be_visible(timeout=30_000)
        expect(page.get_by_text(stage_runs["pretrain"]).first).to_be_visible()
    with steps.step("pretrain loss chart"):
        page.get_by_role("tab", name="Model metrics").click()
        page.get_by_placeholder(re.compile("Search metric charts", re.I)).fill("loss")
        expect(page.get_by_text("loss", exact=True).first).to_be_visible()
        expect(page.get_by_text("Step").first).to_be_visible()
    with steps.step("pretrain artifacts model folder and samples"):
        page.get_by_role("tab", name="Artifacts").click()
        tree = page.get_by_role("list")
        expect(tree.get_by_text("hf", exact=True)).to_be_visible()
        expect(tree.get_by_text("checkpoint", exact=True)).to_be_visible()
        tree.get_by_text("hf", exact=True).click()
        expect(page.get_by_text("config.json").first).to_be_visible()
        # the weights are stored once under the artifact root; the run's record says where, with their sha256
        page.get_by_text("outputs.json", exact=True).click()
        expect(page.get_by_text(re.compile(r"model\.safetensors")).first).to_be_visible()
        page.get_by_text("samples.json", exact=True).click()
        expect(page.get_by_text(re.compile(r"prompt|response", re.I)).first).to_be_visible()
    with steps.step("tokenizer artifact"):
        page.goto(f"{mlflow_url}/#/experiments/{exp_id}/runs/{stage_runs['tokenizer']}/artifacts")
        page.get_by_role("list").get_by_text("tokenizer", exact=True).click()
        expect(page.get_by_text("tokenizer.json").first).to_be_visible()
    with steps.step("pipeline parent run with its stage runs"):
        page.goto(f"{mlflow_url}/#/experiments/{exp_id}/runs/{parent_id}?workflowType=machine_learning")
        expect(page.get_by_role("heading", name="pipeline", level=2)).to_be_visible()
        for stage in ("ingest", "contamination", "tokenizer", "pretrain", "sft", "reward", "ppo", "evaluate"):
            expect(page.get_by_role("link", name=stage, exact=True).first).to_be_visible()
    with steps.step("runs table"):
        page.goto(f"{mlflow_url}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
        expect(page.get_by_role("link", name="pipeline", exact=True).first).to_be_visible()
    with steps.step("registered model"):
        page.goto(f"{mlflow_url}/#/models")
        dismiss_promotion(page)
        page.get_by_role("link", name=REGISTERED_MODEL).first.click()
        dismiss_promotion(page)
        expect(page.get_by_role("link", name=re.compile(r"Version 1")).first).to_be_visible()
    with steps.step("model version: promotion alias and chat signature"):
        page.get_by_role("link", name=re.compile(r"Version 1")).first.click()
        dismiss_promotion(page)
        expect(page.get_by_text(re.compile(r"^(champion|candidate)$")).first).to_be_visible()
        page.get_by_role("cell", name=re.compile(r"^Inputs \(\d+\)")).first.click()  # the schema's input rows
        expect(page.get_by_role("cell", name="messages (required)").first).to_be_visible()  # llm/v1/chat's input


def dismiss_promotion(page) -> None:
    """MLflow 3 greets a first visit of the registry with a "new Model Registry UI" dialog; close it like a person."""
    dialog = page.get_by_role("dialog").filter(has_text="Model Registry")
    try:
        dialog.wait_for(timeout=4000)
    except Exception:  # no dialog this time
        return
    dialog.get_by_role("button", name=re.compile("close", re.I)).first.click()
