"""What a run shows in the Prefect UI: summary artifacts (metrics, MLflow links, samples) and this project's log
records in the run's log."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from flows.specs import DEBUG_ENV
from flows.stage_runner import StageOutcome

log = logging.getLogger(__name__)

OWN_LOGGERS = ("flows", "stages", "llm")

# The metrics that say whether a stage did its job, shown first in the summary (each stage logs many more).
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "ingest": ("rows",),
    "contamination": ("contamination/heldout/items",),
    "tokenizer": ("vocab_size", "val/bytes_per_token"),
    "pretrain": ("val/loss", "val/bpb", "eval/exact_match"),
    "sft": ("eval/exact_match",),
    "reward": ("eval/pairwise_accuracy", "eval/reward_margin"),
    "ppo": ("eval/reward_mean", "eval/sft_reward_mean", "eval/kl", "eval/exact_match"),
    "evaluate": ("lm_eval/base/world_qa/exact_match", "lm_eval/sft/world_qa/exact_match",
                 "lm_eval/aligned/world_qa/exact_match", "lm_eval/sft/world_mc/acc"),
}
KEY_METRICS_SHOWN = 5


def stage_summary_markdown(out: StageOutcome) -> str:
    """The `<stage>-summary` Prefect artifact: the run (linked to MLflow), its upstream runs (linked), metrics."""
    status = f"reused finished run `{out.run_id}` (cache hit)" if out.reused else f"new run `{out.run_id}`"
    lines = [f"### {out.stage}: {status}", ""]
    if out.link:
        lines += [f"MLflow run: [{out.run_id}]({out.link})", ""]
    elif out.tracking_uri:
        lines += [f"MLflow run `{out.run_id}` in `{out.tracking_uri}`; browse it with "
                  f"`mlflow ui --backend-store-uri {out.tracking_uri}` or `llm-pipeline up`", ""]
    if out.upstream:
        ups = [f"{s} [{r}]({out.upstream_links[s]})" if out.upstream_links.get(s) else f"{s} `{r}`"
               for s, r in sorted(out.upstream.items())]
        lines += ["Upstream runs: " + ", ".join(ups), ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted(out.metrics.items())]
    return "\n".join(lines)


def publish_prefect_artifacts(out: StageOutcome) -> None:
    """Metrics table, MLflow link and sample generations on the current Prefect flow run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    key = re.sub(r"[^a-z0-9-]", "-", out.stage.lower())
    create_markdown_artifact(stage_summary_markdown(out), key=f"{key}-summary", description=f"{out.stage} stage metrics")
    if out.link:
        create_link_artifact(out.link, link_text=f"MLflow run {out.run_id}", key=f"{key}-mlflow-run")
    if out.samples:
        create_table_artifact(out.samples[:20], key=f"{key}-samples", description=f"{out.stage} sample generations")


def _state_message(out: StageOutcome) -> str:
    if out.reused:
        return f"reused MLflow run {out.run_id}: config, inputs and code unchanged since it ran"
    return f"new MLflow run {out.run_id}"


def final_state(out: StageOutcome) -> Any:
    """The state a stage flow run ends in: `Cached` (a completed state) when it reused a finished run, so the UI
    tells a reuse from a computation, else `Completed`; the message names the MLflow run either way."""
    from prefect.states import Completed

    return Completed(name="Cached" if out.reused else "Completed", message=_state_message(out), data=out.to_dict())


def record_cached_stage(stage_flow: Any, out: StageOutcome, parameters: Mapping[str, Any]) -> None:
    """Inside the pipeline flow run: a subflow run of `stage_flow` that is created already `Cached`, for a stage
    the pipeline reused without running its flow (a few API calls instead of a whole flow run), so the run's
    graph and the stage's run list show the reuse and which MLflow run it reused."""
    from prefect import Flow, Task
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or not isinstance(stage_flow, Flow):
        return
    state = final_state(out).model_copy(update={"data": None})  # the outcome itself is not persisted
    try:
        with get_client(sync_client=True) as client:
            tracking_task = Task(name=stage_flow.name, fn=stage_flow.fn, version=stage_flow.version)
            parent = client.create_task_run(
                tracking_task, ctx.flow_run.id, dynamic_key=f"{out.stage}-cached-{out.run_id}",
                state=state,
            )  # fmt: skip
            client.create_flow_run(
                stage_flow, parameters=stage_flow.serialize_parameters(dict(parameters)),
                parent_task_run_id=parent.id, state=state,
            )  # fmt: skip
    except Exception as e:  # a view of the run; never fail the pipeline over it
        log.warning("could not record the reused %s stage in Prefect: %s", out.stage, e)


def key_metrics(stage: str, metrics: Mapping[str, float], limit: int = KEY_METRICS_SHOWN) -> list[str]:
    """Names of the metrics to show for a stage: its headline metrics that were logged, then others (overall
    metrics before per-kind breakdowns such as `eval/exact_match/add`) up to `limit`."""
    head = [k for k in HEADLINE_METRICS.get(stage, ()) if k in metrics]
    rest = sorted((k for k in metrics if k not in head), key=lambda k: (k.count("/"), k))
    return head + rest[: max(0, limit - len(head))]


def pipeline_summary_markdown(
    outcomes: Sequence[StageOutcome],
    model: str,
    version: str | None,
    created: bool,
    parent_run_id: str = "",
    parent_link: str | None = None,
    experiment_link: str | None = None,
    experiment: str = "",
    ui_hint: str = "",
    promotion: str = "",
) -> str:
    """The `pipeline-summary` Prefect artifact: the pipeline run, each stage's run and key metrics, the model."""
    lines = ["### Pipeline", ""]
    if parent_run_id:
        run = f"[{parent_run_id}]({parent_link})" if parent_link else f"`{parent_run_id}`"
        lines.append(f"Pipeline MLflow run: {run} (the stage runs are nested under it)  ")
    if experiment:
        exp = f"[{experiment}]({experiment_link})" if experiment_link else f"`{experiment}`"
        lines.append(f"MLflow experiment: {exp}" + ("" if experiment_link or not ui_hint else f"; browse with `{ui_hint}`"))
    if parent_run_id or experiment:
        lines.append("")
    lines += ["| stage | MLflow run | status | wall s | key metrics |", "|---|---|---|---|---|"]
    for o in outcomes:
        key = ", ".join(f"{k}={o.metrics[k]:.4g}" for k in key_metrics(o.stage, o.metrics))
        run = f"[{o.run_id}]({o.link})" if o.link else f"`{o.run_id}`"
        lines.append(f"| {o.stage} | {run} | {'reused' if o.reused else 'ran'} | {o.wall_s:.1f} | {key} |")
    if version:
        lines += ["", f"Registered model `models:/{model}/{version}` ({'new version' if created else 'unchanged'})."]
        if promotion:
            lines.append(f"Alias: {promotion}.")
    return "\n".join(lines)


def publish_pipeline_summary(summary: str) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(summary, key="pipeline-summary", description="Stages, MLflow runs, registered model")
    except Exception as e:  # a view of the runs; never fail a finished pipeline over it
        log.warning("could not create the Prefect summary artifact: %s", e)


class _InPrefectRun(logging.Filter):
    """Passes records emitted inside a Prefect flow or task run (the API handler has nowhere to send others)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def is_user_error(exc: BaseException | None) -> bool:
    """An error the user fixes by changing config, data or a run reference: its message is the whole story."""
    from pydantic import ValidationError

    from stages.common import StageError

    return isinstance(exc, StageError | ValidationError)


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback; for a user error that is forty lines of engine
    frames around a one-line message that already names the file or field and the fix. Any other error's traceback
    goes to a log file (flows.errors) whose path replaces it in the record, so the terminal and the run's log in
    the UI show one line either way. The traceback stays with `--debug` (LLM_PIPELINE_DEBUG) or when Prefect's run
    loggers are at DEBUG level."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        keep = os.environ.get(DEBUG_ENV) or logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        if exc is None or keep:
            return True
        if not is_user_error(exc):
            from flows.errors import save_traceback

            path, _ = save_traceback(exc)
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {str(exc).strip()[:300]}" + (
                f"; traceback in {path})" if path else ")")
            record.args = None
        record.exc_info, record.exc_text = None, None
        return True


@cache
def hide_user_error_tracebacks() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())


@cache
def route_logs_to_prefect() -> None:
    """Send this project's own log records (INFO and up) to the Prefect run they happen in, so the run's log in the
    UI says what the stage did; library chatter (prints, other loggers) stays on the worker's console."""
    from prefect.logging.handlers import APILogHandler

    hide_user_error_tracebacks()

    handler = APILogHandler(level=logging.INFO)
    handler.addFilter(_InPrefectRun())
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # an explicit level set by the user wins
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
