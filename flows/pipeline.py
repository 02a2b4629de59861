"""The `pipeline` flow: every stage flow as a subflow under one parent MLflow run, then the final model registered.

Each stage receives the run ids of the upstream stages of *this* pipeline run, so a stage that is reused (cache
hit) hands its earlier run on to the next one. The final PPO policy is registered in the MLflow model registry
with the pipeline run as its source; an unchanged rerun finds the version made from the same PPO run and adds none.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# Loaded by file path (`prefect deploy flows/pipeline.py:pipeline_flow`), Prefect puts flows/ first on sys.path, where
# flows/stages.py would shadow the `stages` package; take that entry out before the project imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from flows.config import STAGES, PipelineSection, StageSpec, build_config_model, dump_config  # noqa: E402
from flows.stages import (  # noqa: E402
    PARENT_TAG,
    TAG_PIPELINE,
    StageOutcome,
    experiment_link,
    fetch_artifact,
    find_reusable,
    flatten,
    make_stage_flow,
    route_logs_to_prefect,
    run_link,
)
from flows.tracking import Tracking, call_with_retry, setup_tracking  # noqa: E402

log = logging.getLogger(__name__)

FINAL_STAGE = "ppo"
FINAL_OUTPUT = "hf"
TAG_MODEL_FROM = "llm.stage_run"  # on a model version: the PPO run whose `hf` output it holds
TAG_MODEL_SHA = "llm.model_sha256"  # on a model version: content hash of that folder (dedupes forced reruns)

# What the registered model needs at load time (explicit, else MLflow infers extras such as torchvision).
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "tokenizers==0.23.3", "safetensors==0.8.0"]


def register_final_model(
    tracking: Tracking,
    name: str,
    parent_run_id: str,
    final: StageOutcome,
    work_dir: Path,
) -> tuple[str, bool]:
    """Register the final stage's `hf` folder as a new version of `name` unless one with the same content exists.

    Returns (version, created).
    """
    import mlflow
    import mlflow.transformers

    client = tracking.client
    try:
        existing = client.search_model_versions(f"name='{name}'")
    except Exception:
        existing = []
    art, sha = final.outputs.get(FINAL_OUTPUT), final.output_hashes.get(FINAL_OUTPUT)
    if not art or not sha:
        raise RuntimeError(f"the {final.stage} run {final.run_id} recorded no '{FINAL_OUTPUT}' output to register")
    for mv in existing:
        if mv.tags.get(TAG_MODEL_SHA) == sha or mv.tags.get(TAG_MODEL_FROM) == final.run_id:
            log.info("model %s version %s already holds this model (run %s); not registering it again",
                     name, mv.version, mv.tags.get(TAG_MODEL_FROM))
            return str(mv.version), False
    local = fetch_artifact(tracking, final.run_id, art, sha, work_dir)

    def log_model() -> Any:
        # In-memory components, not the folder path: MLflow 3.17's local-checkpoint path breaks on transformers 5.
        from huggingface_hub import ModelCard
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(local)
        tokenizer = AutoTokenizer.from_pretrained(local)
        card = ModelCard(
            f"---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# {name}\n\n"
            f"Aligned policy trained by llm-pipeline: {final.stage} run {final.run_id}, pipeline run {parent_run_id}.\n"
        )
        with mlflow.start_run(run_id=parent_run_id, nested=True):
            return mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-generation",
                pip_requirements=PIP_REQUIREMENTS,
                model_card=card,
                metadata={TAG_MODEL_FROM: final.run_id},
            )

    info = call_with_retry(log_model, "log model", 300)
    # Register with the dedupe tags in the same call, so a crash cannot leave an untagged (duplicable) version.
    mv = call_with_retry(
        lambda: mlflow.register_model(
            info.model_uri,
            name,
            tags={TAG_MODEL_FROM: final.run_id, TAG_MODEL_SHA: sha, "llm.pipeline_run": parent_run_id},
        ),
        "register model",
        300,
    )
    version = str(mv.version)
    client.update_model_version(
        name, version, description=f"Aligned policy from {final.stage} run {final.run_id}, pipeline run {parent_run_id}."
    )
    return version, True


# The metrics that say whether a stage did its job, shown first in the summary (each stage logs many more).
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "ingest": ("rows",),
    "tokenizer": ("vocab_size", "val/bytes_per_token"),
    "pretrain": ("val/loss", "val/bpb", "eval/exact_match"),
    "sft": ("eval/exact_match",),
    "reward": ("eval/pairwise_accuracy", "eval/reward_margin"),
    "ppo": ("eval/reward_mean", "eval/sft_reward_mean", "eval/kl", "eval/exact_match"),
}
KEY_METRICS_SHOWN = 5


def key_metrics(stage: str, metrics: Mapping[str, float], limit: int = KEY_METRICS_SHOWN) -> list[str]:
    """Names of the metrics to show for a stage: its headline metrics that were logged, then others (overall
    metrics before per-kind breakdowns such as `eval/exact_match/add`) up to `limit`."""
    head = [k for k in HEADLINE_METRICS.get(stage, ()) if k in metrics]
    rest = sorted((k for k in metrics if k not in head), key=lambda k: (k.count("/"), k))
    return head + rest[: max(0, limit - len(head))]


def _summary_markdown(
    outcomes: Sequence[StageOutcome],
    model: str,
    version: str | None,
    created: bool,
    parent_run_id: str = "",
    parent_link: str | None = None,
    experiment_link: str | None = None,
    experiment: str = "",
    ui_hint: str = "",
) -> str:
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
    return "\n".join(lines)


def run_pipeline(
    cfg: BaseModel,
    stage_flows: Mapping[str, Any],
    specs: Sequence[StageSpec] = STAGES,
    force: bool = False,
) -> dict[str, Any]:
    """Body of the pipeline flow (Prefect-agnostic apart from the stage flows it calls)."""
    section: PipelineSection = cfg.pipeline
    force = force or section.force
    tracking = setup_tracking(section.experiment, section.work_dir, section.offline_tracking)
    client = tracking.client
    work_dir = Path(section.work_dir).resolve()
    t0 = time.monotonic()
    parent = client.create_run(
        tracking.experiment_id, run_name="pipeline", tags={TAG_PIPELINE: "true", "mlflow.source.name": "flows.pipeline"}
    )
    pid = parent.info.run_id
    log.info("pipeline: MLflow run %s (%s)", pid, run_link(tracking, pid) or tracking.ui_hint())
    outcomes: list[StageOutcome] = []
    try:
        from mlflow.entities import Param

        params = [Param(f"pipeline.{k}", v) for k, v in flatten(section.model_dump(mode="json")).items()]
        client.log_batch(pid, params=params)
        client.log_dict(pid, dump_config(cfg), "pipeline_config.json")
        runs: dict[str, str] = {}
        for spec in specs:
            upstream = {s: runs[s] for s in spec.upstream_stages}
            hit = None
            if not force:
                # An unchanged stage is looked up here rather than in a subflow: a cached rerun then costs a few
                # MLflow queries per stage instead of a Prefect flow run each.
                t = time.monotonic()
                hit, *_ = find_reusable(spec, getattr(cfg, spec.name), tracking, upstream=upstream)
                if hit is not None:
                    hit.wall_s = time.monotonic() - t
                    log.info("stage %s: unchanged (config, inputs, code); reusing MLflow run %s", spec.name, hit.run_id)
            if hit is not None:
                o = hit
            else:
                out = stage_flows[spec.name](
                    config=getattr(cfg, spec.name),
                    pipeline=section,
                    force=force,
                    upstream=upstream,
                    parent_run_id=pid,
                )
                o = StageOutcome(**out)
            outcomes.append(o)
            runs[spec.name] = o.run_id
            client.set_tag(pid, f"llm.stage_run.{spec.name}", o.run_id)
            client.set_tag(pid, f"llm.reused.{spec.name}", str(o.reused).lower())
            if o.metrics:
                client.log_batch(pid, metrics=_metrics(spec.name, o.metrics))
        version, created = None, False
        final = next((o for o in outcomes if o.stage == FINAL_STAGE), None)
        if final is not None:
            version, created = register_final_model(tracking, section.registered_model, pid, final, work_dir)
            client.set_tag(pid, "llm.registered_model", f"models:/{section.registered_model}/{version}")
        client.set_tag(pid, "llm.stages_reused", str(sum(o.reused for o in outcomes)))
        client.set_terminated(pid, "FINISHED")
    except BaseException as e:
        try:
            client.set_tag(pid, "llm.error", f"{type(e).__name__}: {e}"[:4000])
            client.set_terminated(pid, "FAILED")
        except Exception:
            log.warning("could not mark pipeline run %s as failed", pid)
        raise
    summary = _summary_markdown(
        outcomes, section.registered_model, version, created, parent_run_id=pid, parent_link=run_link(tracking, pid),
        experiment_link=experiment_link(tracking), experiment=tracking.experiment_name, ui_hint=tracking.ui_hint(),
    )
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(summary, key="pipeline-summary", description="Stages, MLflow runs, registered model")
    except Exception as e:
        log.warning("could not create the Prefect summary artifact: %s", e)
    reused = [o.stage for o in outcomes if o.reused]
    if reused:
        log.info("pipeline: reused unchanged stages %s", ", ".join(reused))
    return {
        "run_id": pid,
        "stages": [o.to_dict() for o in outcomes],
        "registered_model": section.registered_model if version else None,
        "model_version": version,
        "model_version_created": created,
        "wall_s": time.monotonic() - t0,
        "tracking_uri": tracking.uri,
        "experiment_id": tracking.experiment_id,
    }


def _metrics(stage: str, metrics: Mapping[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(f"{stage}/{k}", float(v), ts, 0) for k, v in metrics.items()]


def make_pipeline_flow(
    specs: Sequence[StageSpec] = STAGES,
    stage_flows: Mapping[str, Any] | None = None,
    config_model: type[BaseModel] | None = None,
    name: str = "pipeline",
) -> Any:
    """The `pipeline` Prefect flow over `specs`; its `config` parameter is the typed pipeline config."""
    from prefect import flow

    model = config_model or build_config_model(specs)
    flows_ = dict(stage_flows) if stage_flows is not None else {s.name: make_stage_flow(s) for s in specs}

    def pipeline_flow(config: Any = None, force: bool = False) -> dict[str, Any]:
        return run_pipeline(config if config is not None else model(), flows_, specs, force)

    pipeline_flow.__doc__ = """Run every stage in order (ingest, tokenizer, pretrain, sft, reward, ppo) under one MLflow
    run, reusing unchanged stages, and register the aligned model.

    Args:
        config: One section per stage plus `pipeline` (experiment, work dir, registered model name).
        force: Rerun every stage even when nothing changed.
    """
    pipeline_flow.__annotations__ = {"config": model, "force": bool, "return": dict[str, Any]}
    try:
        default: Any = model()
    except Exception:
        default = None
    pipeline_flow.__defaults__ = (default, False)
    pipeline_flow.__module__ = __name__
    # A deployment's entrypoint is `<file>:<qualname>`; the default flow is this module's `pipeline_flow` attribute,
    # so `prefect deploy flows/pipeline.py:pipeline_flow` (and `flow.to_deployment`) must name that, not the local.
    pipeline_flow.__qualname__ = "pipeline_flow"
    route_logs_to_prefect()
    # log_prints off, as for the stage flows (see flows.stages.make_stage_flow): our loggers reach the run log.
    f = flow(pipeline_flow, name=name, log_prints=False, persist_result=False, validate_parameters=True)
    f.config_model = model  # the `config` parameter's type, for callers that build configs for this flow
    return f


@cache
def _default_flow() -> Any:
    from flows.config import PipelineConfig
    from flows.stages import STAGE_FLOWS

    return make_pipeline_flow(STAGES, STAGE_FLOWS, PipelineConfig)


def __getattr__(attr: str) -> Any:
    # Built on first use: the typed config imports every stage module.
    if attr == "pipeline_flow":
        return _default_flow()
    raise AttributeError(attr)


__all__ = ["PARENT_TAG", "make_pipeline_flow", "register_final_model", "run_pipeline"]
