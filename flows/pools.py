"""Prefect work pools: every stage lands on the kind of machine it needs.

`llm-pipeline deploy` creates two process work pools (names configurable): `cpu` for ingest and tokenizer (and the
pipeline flow itself, which only waits), `gpu` for the training and evaluation stages, with a pool concurrency
limit of one slot per GPU machine, so two training stages never share a card however many pipelines run. It
registers the pipeline and every stage as deployments in those pools; `prefect worker start --pool NAME` on each
machine (the worker image in docker/) runs what its pool receives. The pipeline deployment's config says
`dispatch: deployments`, so the pipeline fans each stage out as a run of that stage's deployment and waits for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from flows.specs import StageSpec
from flows.stage_runner import StageOutcome, find_reusable
from flows.tracking import Tracking
from stages.common import StageError

log = logging.getLogger(__name__)

CPU_STAGES = frozenset({"ingest", "contamination", "tokenizer"})  # and the pipeline flow; the rest: the GPU pool


def pool_of(flow_key: str, cpu_pool: str, gpu_pool: str) -> str:
    return cpu_pool if flow_key == "pipeline" or flow_key in CPU_STAGES else gpu_pool


def run_via_deployment(spec: StageSpec, cfg: BaseModel, params: Mapping[str, Any], tracking: Tracking,
                       upstream: Mapping[str, str], deployment: str) -> StageOutcome:
    """Run the stage as a run of its deployment `<stage>/<deployment>` (a subflow run of the pipeline's), wait for
    it, and return the outcome recorded in MLflow (the finished run with this stage's cache key)."""
    from prefect.deployments import run_deployment

    if not deployment:
        raise StageError("pipeline.dispatch is 'deployments' but pipeline.deployment is empty; set it to the name "
                         "given to `llm-pipeline deploy` (the config file's name by default).")
    parameters = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in params.items()}
    t = time.monotonic()
    log.info("stage %s: handing it to deployment %s/%s and waiting", spec.name, spec.name, deployment)
    try:
        run = run_deployment(f"{spec.name}/{deployment}", parameters=parameters, timeout=None, poll_interval=2)
    except Exception as e:  # ObjectNotFound and friends: say which deployment and how to make it
        raise StageError(f"could not start deployment {spec.name}/{deployment} ({type(e).__name__}: {e}); "
                         "create it with `llm-pipeline deploy --config ...`") from e
    state = run.state
    if state is None or not state.is_completed():
        raise StageError(f"stage {spec.name} ended {state.name if state else 'without a state'} in its work pool "
                         f"(flow run {run.name}): {state.message if state else ''}")
    hit = find_reusable(spec, cfg, tracking, upstream=upstream).hit
    if hit is None:
        raise StageError(f"stage {spec.name}'s flow run {run.name} completed, but MLflow holds no finished run "
                         "with its cache key: do the workers and this process use the same MLflow server?")
    hit.reused = state.name == "Cached"
    hit.wall_s = time.monotonic() - t
    return hit


def ensure_pools(cpu_pool: str, gpu_pool: str, gpu_slots: int) -> None:
    """Create the two process work pools, or set the GPU pool's concurrency limit on existing ones."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name, limit in ((cpu_pool, None), (gpu_pool, gpu_slots)):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=limit))
                continue
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))


def deploy_to_pools(deployments: Mapping[str, Any], cpu_pool: str, gpu_pool: str) -> dict[str, str]:
    """Register each deployment (flow key -> RunnerDeployment) in its pool; returns flow key -> pool."""
    placed = {}
    for key, dep in deployments.items():
        pool = pool_of(key, cpu_pool, gpu_pool)
        dep.apply(work_pool_name=pool)
        placed[key] = pool
    return placed
