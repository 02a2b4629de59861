"""What the pipeline is made of: its stages (module, inputs) and the settings of the orchestration itself.

Kept apart from `flows.config`, whose typed `PipelineConfig` imports every stage module: the stage runner, the
lineage lookup and `llm-pipeline generate` need only these names.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class StageSpec:
    """Where a stage lives and what feeds it.

    inputs: input name -> (upstream stage, that stage's output name), as in docs/ARCHITECTURE.md.
    optional: inputs the stage runs without when the upstream did not produce them (e.g. `tasks`).
    """

    name: str
    module: str
    inputs: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    optional: frozenset[str] = frozenset()

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def upstream_stages(self) -> list[str]:
        return sorted({stage for stage, _ in self.inputs.values()})


STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", "stages.ingest"),
    StageSpec("contamination", "stages.contamination", {"corpus": ("ingest", "corpus"), "tasks": ("ingest", "tasks")},
              optional=frozenset({"tasks"})),
    StageSpec("tokenizer", "stages.tokenizer", {"corpus": ("ingest", "corpus")}),
    StageSpec(
        "pretrain",
        "stages.pretrain",
        {"tokenizer": ("tokenizer", "tokenizer"), "tokens": ("tokenizer", "tokens"), "tasks": ("ingest", "tasks")},
        optional=frozenset({"tasks"}),
    ),
    # `tasks` (the built-in world's task data) feeds only the datasets a config leaves empty: a pipeline on the
    # user's own data runs without it, and the config check (flows.preflight) says which setting lacks data.
    StageSpec("sft", "stages.sft", {"model": ("pretrain", "hf"), "tasks": ("ingest", "tasks")},
              optional=frozenset({"tasks"})),
    StageSpec("reward", "stages.reward", {"model": ("sft", "hf"), "tasks": ("ingest", "tasks")},
              optional=frozenset({"tasks"})),
    StageSpec(
        "ppo",
        "stages.ppo",
        {"policy": ("sft", "hf"), "reward_model": ("reward", "hf"), "judge": ("reward", "judge"),
         "tasks": ("ingest", "tasks")},
        optional=frozenset({"tasks", "judge"}),
    ),
    StageSpec(
        "evaluate",
        "stages.evaluate",
        {"base": ("pretrain", "hf"), "sft": ("sft", "hf"), "aligned": ("ppo", "hf"), "tasks": ("ingest", "tasks"),
         "corpus": ("ingest", "corpus"), "chat_heldout": ("sft", "heldout")},
        optional=frozenset({"tasks", "corpus", "chat_heldout"}),
    ),
)

def stage_config(cfg: Any, name: str) -> Any:
    """The config a stage runs with: its own section, except that the contamination check reads the datasets the
    post-training sections and the evaluate stage's task folder name (so the two can never disagree)."""
    section = getattr(cfg, name)
    if name != "contamination" or not all(hasattr(cfg, s) for s in ("sft", "reward", "ppo", "evaluate")):
        return section
    mirrored = {s: {f: getattr(getattr(cfg, s), f) for f in ("dataset", "eval_dataset")} for s in ("sft", "reward", "ppo")}
    return type(section).model_validate({**section.model_dump(), **mirrored, "include_path": cfg.evaluate.include_path})


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DEFAULT_CACHE_GB = 50.0


class PipelineSection(BaseModel):
    """Settings of the orchestration itself (not of any stage)."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("llm-pipeline", min_length=1, description="MLflow experiment that holds the runs.")
    work_dir: str = Field(
        ".llm-pipeline",
        min_length=1,
        description="Local working directory: the stages' scratch folders, the artifact root unless "
        "artifact_root names another, the cache of outputs read from an object store, and (when "
        "MLFLOW_TRACKING_URI is unset) the embedded MLflow store mlflow.db + mlartifacts/.",
    )
    artifact_root: str = Field(
        "", description="Where stage outputs are stored, once, each run in its own `<root>/<stage>/<run id>/`: a "
        "local folder or an fsspec URL (s3://bucket/prefix, gs://...; credentials and endpoint from the "
        "environment, e.g. AWS_* and AWS_ENDPOINT_URL_S3). Empty: LLM_PIPELINE_ARTIFACT_ROOT if set, else "
        "`<work_dir>/artifacts`. Machines that run stages of one pipeline must all reach it.")
    artifact_cache_gb: float = Field(
        DEFAULT_CACHE_GB, gt=0, description="Bound of the local cache (`<work_dir>/cache/`) of outputs read from "
        "an object store; least recently used outputs are removed beyond it, never those a running stage reads.")
    registered_model: str = Field(
        "llm-pipeline-assistant",
        description="MLflow model registry name under which the final aligned (PPO) policy is registered.",
    )
    force: bool = Field(False, description="Rerun every stage even when a finished run with the same cache key exists.")
    offline_tracking: bool = Field(
        False,
        description="When the MLflow server is unreachable at start, log to the embedded store in work_dir "
        "instead of failing.",
    )
    retries: int = Field(2, ge=0, le=10, description="Retries of a stage after a transient failure (tracking or "
                         "storage hiccup); bad configs and bad data are never retried.")
    retry_delay_s: float = Field(2.0, ge=0, le=600, description="Delay before the first retry; doubles each retry.")
    tracking_wait_s: float = Field(
        300.0,
        ge=0,
        description="How long a finished stage keeps retrying delivery of buffered metrics and artifacts while "
        "the tracking server is away.",
    )
    system_metrics: bool = Field(True, description="Log CPU/GPU/memory system metrics to each stage run.")
    promotion_max_exact_match_drop: float = Field(
        0.02, ge=0, le=1, description="Promotion gate: the aligned model gets the registry alias `champion` only "
        "if its held-out exact match is at most this much below the SFT policy's (else `candidate`).")
    promotion_max_kl: float = Field(0.5, ge=0, description="Promotion gate: largest KL to the SFT policy on "
                                    "held-out prompts for the alias `champion`.")
    promotion_min_win_rate: float = Field(
        0.5, ge=0, le=1, description="Promotion gate: the held-out judge's win rate of the aligned over the SFT answers "
        "(when the reward stage trained a judge), plus two standard errors, must reach this for `champion`.")
    price_per_device_hour: float = Field(0.0, ge=0, description="Price of one device (GPU or CPU machine) per "
                                         "hour, for the report card's estimated cost per stage (0: not shown).")
    promotion_max_contamination: float = Field(
        0.01, ge=0, le=1, description="Promotion gate: largest share of an evaluation set's items that may share a "
        "word sequence with training text (the contamination stage's check) for the alias `champion`.")

    dispatch: Literal["inline", "deployments"] = Field(
        "inline", description="How the pipeline runs its stages: 'inline' in its own process, or 'deployments': "
        "each stage as a run of its deployment `<stage>/<deployment>` (created by `llm-pipeline deploy`), which "
        "the workers of that stage's work pool pick up; the pipeline waits for each.")
    deployment: str = Field("", description="With dispatch 'deployments': the deployments' name (the `NAME` of "
                            "`<stage>/NAME`; `llm-pipeline deploy` sets it).")

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not _MODEL_NAME.match(v):
            raise ValueError("use letters, digits, '_', '.', '-' (at most 128 characters)")
        return v


DEFAULT_CONFIG = "configs/tiny.yaml"
DEBUG_ENV = "LLM_PIPELINE_DEBUG"  # set by `llm-pipeline --debug`: errors keep their traceback everywhere


def default_config() -> Path | None:
    """The config used without --config (by `run`, `stage` and the deployments' forms), when it exists here."""
    path = Path(DEFAULT_CONFIG)
    return path if path.is_file() else None
