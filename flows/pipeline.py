"""The `pipeline` Prefect flow: every stage flow as a subflow under one parent MLflow run, then the final model
registered (the body is `flows.pipeline_runner.run_pipeline`).

`pipeline_flow` is the flow over the real stages; deployments load it as `flows.pipeline.pipeline_flow` or, with
`prefect deploy`, as `flows/pipeline.py:pipeline_flow`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from flows.config import PipelineConfig, build_config_model
from flows.pipeline_runner import register_final_model, run_pipeline
from flows.prefect_ui import route_logs_to_prefect
from flows.specs import STAGES, StageSpec
from flows.stage_flow import STAGE_FLOWS, make_stage_flow

__all__ = ["STAGE_FLOWS", "make_pipeline_flow", "pipeline_flow", "register_final_model", "run_pipeline"]


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

    pipeline_flow.__doc__ = """Run every stage in order (ingest, tokenizer, pretrain, sft, reward, ppo, evaluate) under one MLflow
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
    # log_prints off, as for the stage flows (see flows.stage_flow.make_stage_flow): our loggers reach the run log.
    f = flow(pipeline_flow, name=name, log_prints=False, persist_result=False, validate_parameters=True)
    f.config_model = model  # the `config` parameter's type, for callers that build configs for this flow
    return f


# Built at import, like the stage flows it calls (flows.stage_flow): a deployment entrypoint names this attribute.
pipeline_flow = make_pipeline_flow(STAGES, STAGE_FLOWS, PipelineConfig)
