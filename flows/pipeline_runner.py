"""The body of the `pipeline` flow: every stage under one parent MLflow run, then the final model registered.

Each stage receives the run ids of the upstream stages of *this* pipeline run, so a stage that is reused (cache
hit) hands its earlier run on to the next one. The final PPO policy is registered in the MLflow model registry
with the pipeline run as its source; an unchanged rerun finds the version made from the same PPO run and adds none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flows.artifacts import link_identical
from flows.lineage import TAG_PIPELINE, fetch_artifact, get_run
from flows.local_copies import pinned_inputs
from flows.locks import file_lock
from flows.outputs import stored_files
from flows.pools import run_via_deployment
from flows.prefect_ui import pipeline_summary_markdown, publish_pipeline_summary, record_cached_stage
from flows.preflight import check_after_tokenizer, check_inputs
from flows.promotion import TAG_PROMOTION, Verdict, judge, promote
from flows.registry import TAG_MODEL_FILES, files_manifest, manifest_text
from flows.report import publish_report
from flows.specs import DEFAULT_CACHE_GB, STAGES, PipelineSection, StageSpec, stage_config
from flows.stage_runner import StageOutcome, find_reusable, flatten
from flows.tracking import Tracking, call_with_retry, experiment_link, run_link, setup_tracking

log = logging.getLogger(__name__)

FINAL_STAGE = "ppo"
FINAL_OUTPUT = "hf"
TAG_MODEL_FROM = "llm.stage_run"  # on a model version: the PPO run whose `hf` output it holds
TAG_MODEL_SHA = "llm.model_sha256"  # on a model version: content hash of that folder (dedupes forced reruns)

# What the registered model needs at load time (explicit, else MLflow infers extras such as torchvision).
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "tokenizers==0.23.3", "safetensors==0.8.0"]


CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 16}


def _existing_version(tracking: Tracking, name: str, final: StageOutcome, sha: str) -> str | None:
    """A version of `name` that already holds this model (same content, or made from the same run)."""
    try:
        existing = tracking.client.search_model_versions(f"name='{name}'")
    except Exception:
        existing = []
    for mv in existing:
        if mv.tags.get(TAG_MODEL_SHA) == sha or mv.tags.get(TAG_MODEL_FROM) == final.run_id:
            log.info("model %s version %s already holds this model (run %s); not registering it again",
                     name, mv.version, mv.tags.get(TAG_MODEL_FROM))
            return str(mv.version)
    return None


def register_final_model(
    tracking: Tracking,
    name: str,
    parent_run_id: str,
    final: StageOutcome,
    work_dir: Path,
    cache_gb: float = DEFAULT_CACHE_GB,
) -> tuple[str, bool]:
    """Register the final stage's `hf` folder as a new version of `name` unless one with the same content exists.

    Returns (version, created).
    """
    import mlflow
    import mlflow.transformers

    art, sha = final.outputs.get(FINAL_OUTPUT), final.output_hashes.get(FINAL_OUTPUT)
    if not art or not sha:
        raise RuntimeError(f"the {final.stage} run {final.run_id} recorded no '{FINAL_OUTPUT}' output to register")
    if (version := _existing_version(tracking, name, final, sha)) is not None:
        return version, False
    local = fetch_artifact(tracking, final.run_id, art, sha, work_dir, cache_gb=cache_gb)
    files = stored_files(tracking, get_run(tracking, final.run_id), FINAL_OUTPUT) or files_manifest(local)

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
        # Logged into the stage run that trained it (left FINISHED: `run_id`, not a reopened run), as an MLflow
        # chat model: the llm/v1/chat task gives it the OpenAI-style messages signature, so the registry UI and
        # `mlflow models serve` take {"messages": [...]} and answer with a chat completion.
        return mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="model",
            task="llm/v1/chat",
            input_example=CHAT_EXAMPLE,
            pip_requirements=PIP_REQUIREMENTS,
            model_card=card,
            metadata={TAG_MODEL_FROM: final.run_id, "llm.pipeline_run": parent_run_id},
            run_id=final.run_id,
        )

    info = call_with_retry(log_model, "log model", 300)
    _share_model_files(tracking, info, local, files)
    # Register with the dedupe tags in the same call, so a crash cannot leave an untagged (duplicable) version.
    mv = call_with_retry(
        lambda: mlflow.register_model(
            info.model_uri,
            name,
            tags={TAG_MODEL_FROM: final.run_id, TAG_MODEL_SHA: sha, "llm.pipeline_run": parent_run_id,
                  TAG_MODEL_FILES: manifest_text(files)},  # what `generate`/`export` verify (flows.registry)
        ),
        "register model",
        300,
    )
    version = str(mv.version)
    tracking.client.update_model_version(
        name, version, description=f"Aligned policy from {final.stage} run {final.run_id}, pipeline run {parent_run_id}."
    )
    return version, True


def _share_model_files(tracking: Tracking, info: Any, local: Path, files: Mapping[str, str]) -> None:
    """MLflow keeps its own copy of a logged model (the registry UI and `models:/` URIs read it). When that copy is
    a folder on the disk of the stored output, its files that are byte for byte the output's become hard links to
    them, so the model is stored once; on an object store or behind an MLflow server the copy stays a copy."""
    from urllib.parse import unquote, urlparse

    try:
        location = tracking.client.get_logged_model(info.model_id).artifact_location
    except Exception as e:  # a view of where MLflow put it: never fail the registration over it
        log.debug("no logged model location (%s)", e)
        return
    if not str(location).startswith("file://") or not local.is_dir():
        return
    try:
        saved = link_identical(Path(unquote(urlparse(location).path)), {sha: local / rel for rel, sha in files.items()})
    except OSError as e:  # another file system, or one without hard links: the copy stays
        log.info("MLflow's copy of the registered model stays a copy (%s)", e)
        return
    if saved:
        log.info("MLflow's copy of the registered model shares %.1f MB with the stored output %s", saved / 1e6, local)


def _metrics(stage: str, metrics: Mapping[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(f"{stage}/{k}", float(v), ts, 0) for k, v in metrics.items()]


def _run_stages(
    cfg: BaseModel, stage_flows: Mapping[str, Any], specs: Sequence[StageSpec], force: bool, tracking: Tracking,
    pid: str,
) -> list[StageOutcome]:  # fmt: skip
    """Each stage in order, nested under the pipeline run `pid`; returns their outcomes."""
    client = tracking.client
    outcomes: list[StageOutcome] = []
    runs: dict[str, str] = {}
    fit_checked = False
    for spec in specs:
        upstream = {s: runs[s] for s in spec.upstream_stages}
        hit = None
        if not force:
            # An unchanged stage is looked up here rather than in a subflow: a cached rerun then costs a few
            # MLflow queries per stage instead of a Prefect flow run each.
            t = time.monotonic()
            hit = find_reusable(spec, stage_config(cfg, spec.name), tracking, upstream=upstream).hit
            if hit is not None:
                hit.wall_s = time.monotonic() - t
                log.info("stage %s: unchanged (config, inputs, code); reusing MLflow run %s", spec.name, hit.run_id)
        if hit is None and not fit_checked and spec.name not in ("ingest", "contamination", "tokenizer") and "tokenizer" in runs:
            # before the first stage after the tokenizer computes (pretraining, hours on a GPU): the post-training
            # data against the tokenizer and the model's context
            _check_fit(cfg, outcomes, tracking)
            fit_checked = True
        params = dict(config=stage_config(cfg, spec.name), pipeline=cfg.pipeline, force=force, upstream=upstream,
                      parent_run_id=pid)  # fmt: skip
        if hit is not None:
            o = hit
            record_cached_stage(stage_flows[spec.name], o, params)
        elif cfg.pipeline.dispatch == "deployments":  # on the stage's work pool (flows.pools)
            o = run_via_deployment(spec, params["config"], params, tracking, upstream, cfg.pipeline.deployment)
        else:
            o = StageOutcome(**stage_flows[spec.name](**params))
        outcomes.append(o)
        runs[spec.name] = o.run_id
        client.set_tag(pid, f"llm.stage_run.{spec.name}", o.run_id)
        client.set_tag(pid, f"llm.reused.{spec.name}", str(o.reused).lower())
        if o.metrics:
            client.log_batch(pid, metrics=_metrics(spec.name, o.metrics))
    return outcomes


def _check_fit(cfg: BaseModel, outcomes: Sequence[StageOutcome], tracking: Tracking) -> None:
    by = {o.stage: o for o in outcomes}
    work_dir = Path(cfg.pipeline.work_dir).resolve()

    def local(stage: str, output: str) -> Path | None:
        o = by.get(stage)
        if o is None or not o.outputs.get(output):
            return None
        return fetch_artifact(tracking, o.run_id, o.outputs[output], o.output_hashes[output], work_dir,
                              cache_gb=cfg.pipeline.artifact_cache_gb)

    tok_dir = local("tokenizer", "tokenizer")
    # (pipelines of other stages, as in tests, have no chat tokenizer to check with)
    if (tok_dir is not None and (tok_dir / "tokenizer.json").exists()
            and all(hasattr(cfg, s) for s in ("pretrain", "sft", "reward", "ppo"))):
        check_after_tokenizer(cfg, tok_dir, local("ingest", "tasks"))


def _run_under(
    cfg: BaseModel, stage_flows: Mapping[str, Any], specs: Sequence[StageSpec], force: bool, tracking: Tracking,
    pid: str,
) -> tuple[list[StageOutcome], str | None, bool, Verdict | None]:  # fmt: skip
    """Stages, model registration and the promotion gate inside the pipeline run `pid`, which ends FINISHED or
    FAILED."""
    from mlflow.entities import Param

    section: PipelineSection = cfg.pipeline
    client = tracking.client
    try:
        params = [Param(f"pipeline.{k}", v) for k, v in flatten(section.model_dump(mode="json")).items()]
        client.log_batch(pid, params=params)
        client.log_dict(pid, cfg.model_dump(mode="json"), "pipeline_config.json")
        outcomes = _run_stages(cfg, stage_flows, specs, force, tracking, pid)
        version, created, verdict = None, False, None
        final = next((o for o in outcomes if o.stage == FINAL_STAGE), None)
        if final is not None:
            work_dir = Path(section.work_dir).resolve()
            # two pipelines ending at once would each find no version holding this model and both register one
            with file_lock(work_dir / "locks" / f"register-{section.registered_model}.lock",
                           f"model {section.registered_model} to be registered"):
                version, created = register_final_model(tracking, section.registered_model, pid, final, work_dir,
                                                        section.artifact_cache_gb)
                ingest = next((o.metrics for o in outcomes if o.stage == "contamination"), {})
                verdict = judge(final.metrics, section.promotion_max_exact_match_drop, section.promotion_max_kl,
                                ingest, section.promotion_max_contamination, section.promotion_min_win_rate)
                call_with_retry(lambda: promote(client, section.registered_model, version, verdict), "set alias", 60)
            client.set_tag(pid, "llm.registered_model", f"models:/{section.registered_model}/{version}")
            client.set_tag(pid, TAG_PROMOTION, verdict.describe()[:5000])
        client.set_tag(pid, "llm.stages_reused", str(sum(o.reused for o in outcomes)))
        client.set_terminated(pid, "FINISHED")
    except BaseException as e:
        try:
            client.set_tag(pid, "llm.error", f"{type(e).__name__}: {e}"[:4000])
            client.set_terminated(pid, "FAILED")
        except Exception:
            log.warning("could not mark pipeline run %s as failed", pid)
        raise
    return outcomes, version, created, verdict


def run_pipeline(
    cfg: BaseModel,
    stage_flows: Mapping[str, Any],
    specs: Sequence[StageSpec] = STAGES,
    force: bool = False,
) -> dict[str, Any]:
    """Body of the pipeline flow (Prefect-agnostic apart from the stage flows it calls)."""
    section: PipelineSection = cfg.pipeline
    force = force or section.force
    if all(hasattr(cfg, s) for s in ("ingest", "sft", "reward", "ppo", "evaluate")):
        check_inputs(cfg)  # a run from the UI checks here; `llm-pipeline run` already did, before Prefect started
    tracking = setup_tracking(section.experiment, section.work_dir, section.offline_tracking)
    t0 = time.monotonic()
    parent = tracking.client.create_run(
        tracking.experiment_id, run_name="pipeline", tags={TAG_PIPELINE: "true", "mlflow.source.name": "flows.pipeline"}
    )
    pid = parent.info.run_id
    log.info("pipeline: MLflow run %s (%s)", pid, run_link(tracking, pid) or tracking.ui_hint())
    with pinned_inputs():  # cached outputs read for the checks and the registration stay until the run ends
        outcomes, version, created, verdict = _run_under(cfg, stage_flows, specs, force, tracking, pid)
    publish_pipeline_summary(pipeline_summary_markdown(
        outcomes, section.registered_model, version, created, parent_run_id=pid, parent_link=run_link(tracking, pid),
        experiment_link=experiment_link(tracking), experiment=tracking.experiment_name, ui_hint=tracking.ui_hint(),
        promotion=verdict.describe() if verdict else "",
    ))  # fmt: skip
    model = f"models:/{section.registered_model}/{version}" if version else None
    try:
        report = publish_report(tracking, outcomes, pid, model, verdict.describe() if verdict else None,
                                section.price_per_device_hour)
    except Exception as e:  # a view of finished runs: never fail the pipeline over it
        log.warning("could not write the report card: %s", e)
        report = ""
    reused = [o.stage for o in outcomes if o.reused]
    if reused:
        log.info("pipeline: reused unchanged stages %s", ", ".join(reused))
    return {
        "run_id": pid,
        "stages": [o.to_dict() for o in outcomes],
        "registered_model": section.registered_model if version else None,
        "model_version": version,
        "model_version_created": created,
        "report": report,
        "model_alias": verdict.alias if verdict else None,
        "promotion": verdict.describe() if verdict else None,
        "wall_s": time.monotonic() - t0,
        "tracking_uri": tracking.uri,
        "experiment_id": tracking.experiment_id,
    }
