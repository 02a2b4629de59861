"""The pipeline's configuration: one section per stage (validated by that stage's own `Config`) plus `pipeline`.

YAML loading and `--set section.key=value` overrides. Unknown keys and bad values fail naming the key. The stages
themselves (which module implements one, what feeds it) are listed in `flows.specs`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from flows.specs import STAGES, PipelineSection, StageSpec
from stages.common import StageError

__all__ = [
    "STAGES", "ConfigError", "PipelineConfig", "PipelineSection", "StageSpec", "apply_overrides", "build_config_model",
    "dump_config", "load_config", "parse_override", "read_yaml", "validate_config",
]  # fmt: skip


class ConfigError(StageError):
    """A config file or override that does not validate; the message names the file and the key."""


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


# Built at import, so importing this module imports every stage module; code that needs only the stage list or the
# orchestration settings imports `flows.specs` instead and stays light.
PipelineConfig: type[BaseModel] = build_config_model(STAGES)


def _closest_key(loc: tuple) -> str | None:
    """The known key nearest to an unknown one (a renamed or misspelt setting), as a dotted path, or None."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field is not None else None
    names = list(getattr(model, "model_fields", {}))
    by_word = [n for n in names if set(str(loc[-1]).split("_")) & set(n.split("_")) - {"max", "min"}]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6) or by_word[:1]
    return ".".join([*map(str, loc[:-1]), close[0]]) if close else None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = _closest_key(e["loc"])
            fix = f"did you mean '{hint}'?" if hint else "remove it or fix its spelling"
            lines.append(f"{source}: unknown key '{key}'; {fix}")
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
    model = model or PipelineConfig
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
