"""One Prefect flow per stage: `flows.stage_runner.run_stage` in a task retried with backoff for transient errors
only, plus Prefect artifacts (metrics table, MLflow link, sample generations) on the flow run.

A stage flow run ends `Cached` (a completed state) when the stage reused a finished run, `Completed` otherwise,
each with the MLflow run in the state's message; calling the flow returns the `StageOutcome` as a dict.

`STAGE_FLOWS` holds the flow of every stage of the pipeline; each is also a module attribute `<stage>_flow`, the
name deployments load it by (`flows.stage_flow.sft_flow`, or `flows/stage_flow.py:sft_flow`).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import Field

from flows.fanout_prefect import prefect_dask_mapper
from flows.prefect_ui import final_state, publish_prefect_artifacts, route_logs_to_prefect
from flows.progress import prefect_progress
from flows.specs import STAGES, PipelineSection, StageSpec
from flows.stage_runner import StageOutcome, run_stage
from flows.tracking import is_transient
from stages.runtime import fanout

log = logging.getLogger(__name__)


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as e:  # the failed state re-raises its exception
            exc = e
    retry = is_transient(exc)
    log.warning("stage attempt failed with %s: %s", type(exc).__name__, "retrying" if retry else "not retried")
    return retry


def _backoff(pipeline: PipelineSection) -> list[float]:
    return [pipeline.retry_delay_s * 2**i for i in range(pipeline.retries)]


def _stage_task(spec: StageSpec) -> Any:
    """The Prefect task that runs the stage; a retry resumes the failed attempt's work even under `force`."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def _execute(config: Any, pipeline: PipelineSection, from_run: Any, upstream: Any, parent: Any, force: bool):
        from prefect.runtime import task_run

        retrying = (task_run.run_count or 1) > 1
        with fanout.using(prefect_dask_mapper):  # a stage's fanned-out units become task runs of this flow run
            return run_stage(
                spec, config, pipeline, from_run=from_run, upstream=upstream, parent_run_id=parent, force=force,
                retrying=retrying,
            ).to_dict()

    return task(_execute, name=f"run-{spec.name}", cache_policy=NO_CACHE, persist_result=False)


def _stage_flow_doc(spec: StageSpec) -> str:
    return f"""Run the {spec.name} stage ({spec.module}) and record it in MLflow.

    Args:
        config: The {spec.name} stage's settings.
        pipeline: Orchestration settings: MLflow experiment, work dir, retries.
        from_run: Upstream MLflow runs to start from: a pipeline run id, a stage run id (its recorded ancestors
            come along), or stage=RUN_ID. Upstream stages not named use their latest finished run.
        force: Rerun even if a finished run with the same config, inputs and code exists.
        upstream: Advanced, filled in by the pipeline flow; leave empty to use the latest finished upstream
            runs (or those of `from_run`). Otherwise a map of upstream stage to MLflow run id, e.g.
            {{"pretrain": "<run id>"}}; it takes precedence over `from_run`. Upstream stages of {spec.name}:
            {", ".join(spec.upstream_stages) or "none"}.
        parent_run_id: Advanced, filled in by the pipeline flow; leave empty for a standalone run. Otherwise the
            MLflow run id of a pipeline run: this stage's run is then nested under it in MLflow.
    """


def _stage_flow_annotations(cfg_cls: type) -> dict[str, Any]:
    """The flow's parameter types, from which Prefect renders the run form (the config typed by the stage)."""
    return {
        "config": cfg_cls,
        "pipeline": PipelineSection,
        "from_run": list[str] | None,
        "force": bool,
        # The form's labels: the bare parameter names say nothing to a person starting a run from the UI.
        "upstream": Annotated[
            dict[str, str] | None, Field(json_schema_extra={"title": "upstream: run ids per upstream stage"})
        ],
        "parent_run_id": Annotated[
            str | None, Field(json_schema_extra={"title": "parent_run_id: pipeline run to nest under"})
        ],
        "return": dict[str, Any],
    }


def make_stage_flow(spec: StageSpec) -> Any:
    """A Prefect flow for one stage; its parameters are typed so the Prefect UI renders a form."""
    from prefect import flow

    cfg_cls = spec.load().Config
    execute = _stage_task(spec)

    def stage_flow(
        config: Any = None,
        pipeline: PipelineSection | None = None,
        from_run: list[str] | None = None,
        force: bool = False,
        upstream: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> dict[str, Any]:
        pipeline = pipeline or PipelineSection()
        config = config if config is not None else cfg_cls()
        t = execute.with_options(
            retries=pipeline.retries,
            retry_delay_seconds=_backoff(pipeline) or 0,
            retry_condition_fn=_retry_if_transient,
        )
        with prefect_progress(spec.name):
            out = t(config, pipeline, from_run, upstream, parent_run_id, force)
        outcome = StageOutcome(**out)
        if outcome.reused:
            log.info("stage %s: nothing changed, reused MLflow run %s", spec.name, outcome.run_id)
        try:
            publish_prefect_artifacts(outcome)
        except Exception as e:  # Prefect artifacts are a view; never fail a finished stage over them
            log.warning("could not create Prefect artifacts: %s", e)
        return final_state(outcome)

    # The name deployments load the flow by: this module's attribute `<stage>_flow` (see the bottom of the file).
    stage_flow.__name__ = stage_flow.__qualname__ = f"{spec.name}_flow"
    stage_flow.__module__ = __name__
    stage_flow.__doc__ = _stage_flow_doc(spec)
    stage_flow.__annotations__ = _stage_flow_annotations(cfg_cls)
    try:
        default_cfg: Any = cfg_cls()
    except Exception:
        default_cfg = None
    stage_flow.__defaults__ = (default_cfg, PipelineSection(), None, False, None, None)
    route_logs_to_prefect()
    # log_prints stays off: Prefect's print capture replaces `print` process-wide during a run, which also grabs
    # library output meant for a private buffer (dill's `dis` listings while datasets fingerprints a function,
    # which then flooded the run log with bytecode and left the fingerprint without the function's globals).
    return flow(stage_flow, name=spec.name, log_prints=False, persist_result=False, validate_parameters=True)


# Built at import (it imports every stage module and Prefect, ~2 s), so the registry and the deployment entrypoints
# are plain module attributes; code that only runs a stage imports flows.stage_runner and stays light.
STAGE_FLOWS: dict[str, Any] = {spec.name: make_stage_flow(spec) for spec in STAGES}
ingest_flow = STAGE_FLOWS["ingest"]
contamination_flow = STAGE_FLOWS["contamination"]
tokenizer_flow = STAGE_FLOWS["tokenizer"]
pretrain_flow = STAGE_FLOWS["pretrain"]
sft_flow = STAGE_FLOWS["sft"]
reward_flow = STAGE_FLOWS["reward"]
ppo_flow = STAGE_FLOWS["ppo"]
evaluate_flow = STAGE_FLOWS["evaluate"]
