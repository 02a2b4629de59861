"""A Hugging Face model card (README.md with YAML metadata) in every model folder a stage writes, so an exported
model says where it came from, what it was trained on, how it scored and what it is for. The card holds only
deterministic facts (no timings), so an unchanged rerun writes the same bytes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.common import atomic_file

_WHAT = {
    "pretrain": ("base model", "next-token prediction on the ingested corpus", "text-generation"),
    "sft": ("assistant (supervised fine-tuning)", "chat data, loss on the assistant's tokens only", "text-generation"),
    "reward": ("reward model", "preference pairs (chosen over rejected), a scalar score head", "text-classification"),
    "ppo": ("aligned assistant", "online RL against the reward model, KL-bound to the SFT policy", "text-generation"),
}
_USE = ("Research and teaching: trained by llm-pipeline, by default on its small built-in synthetic world. Not "
        "evaluated for safety or factuality beyond the metrics above; do not deploy it to answer people.")


def _shape(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "unknown architecture"
    arch = ", ".join(cfg.get("architectures") or [cfg.get("model_type", "?")])
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    width = cfg.get("hidden_size", cfg.get("n_embd"))
    ctx = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    return f"{arch}: {layers} layers, width {width}, context {ctx} tokens, vocabulary {cfg.get('vocab_size')}"


def write_model_card(folder: Path, stage: str, started_from: str, data: str,
                     metrics: Mapping[str, float], settings: Mapping[str, Any]) -> Path:
    """Write `folder/README.md`: `started_from` and `data` say what the stage read; `metrics` (only eval/ and val/
    ones are shown) and `settings` (a few of the stage's config values) are listed as tables."""
    role, method, task = _WHAT.get(stage, (stage, stage, "text-generation"))
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("eval/", "val/"))}
    lines = ["---", "library_name: transformers", f"pipeline_tag: {task}", "tags:", "- llm-pipeline", f"- {stage}",
             "---", "", f"# {role}", "", f"Written by the `{stage}` stage of llm-pipeline: {method}.", "",
             f"- Model: {_shape(folder)}", f"- Started from: {started_from}", f"- Data: {data}", ""]
    if settings:
        lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in settings.items()] + [""]
    if shown:
        lines += ["## Evaluation (held-out)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in shown.items()] + [""]
    lines += ["## Intended use", "", _USE, "", "## How to load", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer",
              f"model = {'AutoModelForSequenceClassification' if stage == 'reward' else 'AutoModelForCausalLM'}"
              '.from_pretrained("PATH")', 'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", ""]
    path = Path(folder) / "README.md"
    with atomic_file(path, "w") as f:
        f.write("\n".join(lines))
    return path


def source_of(description: str) -> str:
    """How a card names a stage's data: the user's dataset in code style, the built-in world's in words."""
    return description if description.startswith("the built-in") else f"`{description}`"


def settings_of(cfg: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The named config values that the stage's config has (for the card's settings table)."""
    return {n: getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None}
