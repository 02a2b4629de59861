"""The pipeline's configuration: one section per stage (validated by that stage's own `Config`) plus `pipeline`.

Also the stage registry (which module implements a stage, and which upstream output feeds each of its inputs),
YAML loading and `--set section.key=value` overrides. Unknown keys and bad values fail naming the key.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from stages.common import StageError


class ConfigError(StageError):
    """A config file or override that does not validate; the message names the file and the key."""


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
    StageSpec("tokenizer", "stages.tokenizer", {"corpus": ("ingest", "corpus")}),
    StageSpec(
        "pretrain",
        "stages.pretrain",
        {"tokenizer": ("tokenizer", "tokenizer"), "tokens": ("tokenizer", "tokens"), "tasks": ("ingest", "tasks")},
        optional=frozenset({"tasks"}),
    ),
    StageSpec("sft", "stages.sft", {"model": ("pretrain", "hf"), "tasks": ("ingest", "tasks")}),
    StageSpec("reward", "stages.reward", {"model": ("sft", "hf"), "tasks": ("ingest", "tasks")}),
    StageSpec(
        "ppo",
        "stages.ppo",
        {"policy": ("sft", "hf"), "reward_model": ("reward", "hf"), "tasks": ("ingest", "tasks")},
    ),
)

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class PipelineSection(BaseModel):
    """Settings of the orchestration itself (not of any stage)."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("llm-pipeline", min_length=1, description="MLflow experiment that holds the runs.")
    work_dir: str = Field(
        ".llm-pipeline",
        min_length=1,
        description="Local working directory: stage outputs, downloaded inputs, and (when MLFLOW_TRACKING_URI "
        "is unset) the embedded MLflow store mlflow.db + mlartifacts/.",
    )
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

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not _MODEL_NAME.match(v):
            raise ValueError("use letters, digits, '_', '.', '-' (at most 128 characters)")
        return v


def build_config_model(specs: Sequence[StageSpec], name: str = "PipelineConfig") -> type[BaseModel]:
    """Compose `pipeline` + one section per stage, each typed by the stage module's own `Config`."""
    fields: dict[str, Any] = {
        "pipeline": (
            PipelineSection,
            Field(default_factory=PipelineSection, description="Orchestration settings (work dir, MLflow, retries)."),
        )
    }
    for spec in specs:
        cfg_cls = spec.load().Config
        try:
            cfg_cls()
            default: Any = Field(default_factory=cfg_cls, description=f"Config of the {spec.name} stage ({spec.module}).")
        except ValidationError:
            default = Field(..., description=f"Config of the {spec.name} stage ({spec.module}).")
        fields[spec.name] = (cfg_cls, default)
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


@cache
def _default_model() -> type[BaseModel]:
    return build_config_model(STAGES)


def __getattr__(attr: str) -> Any:
    # `PipelineConfig` imports every stage module (torch, transformers): build it on first use only.
    if attr == "PipelineConfig":
        return _default_model()
    raise AttributeError(attr)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'; remove it or fix its spelling")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        else:
            got = repr(e.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            lines.append(f"{source}: invalid value for '{key}': {e['msg']} (got {got})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set pretrain.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {item!r}: '{where}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found; pass an existing YAML file, e.g. --config configs/tiny.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of sections (ingest:, tokenizer:, ...) at the top")
    return data


def validate_config(data: Mapping[str, Any], source: str, model: type[BaseModel] | None = None) -> Any:
    model = model or _default_model()
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    model: type[BaseModel] | None = None,
) -> Any:
    """Read a YAML config (or only defaults), apply `section.key=value` overrides, validate every section."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    source = str(path) if path is not None else "config"
    if overrides:
        source += " (with --set overrides)"
    return validate_config(data, source, model)


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
