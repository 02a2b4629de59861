"""Checkpoint folder: `model.safetensors` + `config.json` (+ `tokenizer/`), always written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from llm.config import ModelConfig
from llm.files import atomic_dir
from llm.layers import DecoderLM
from llm.model import build_model
from llm.tokenizer import copy_tokenizer

WEIGHTS, CONFIG, TOKENIZER_DIR = "model.safetensors", "config.json", "tokenizer"
FORMAT = "llm-pipeline/1"


def _aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Later state-dict names that share storage with an earlier one (tied embeddings): {later: earlier}."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def _unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor kept once, under its first name, contiguous and on the CPU."""
    dropped = _aliases(state)
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in dropped}


def save_model(dir: str | Path, model: DecoderLM, tokenizer_dir: str | Path | None = None) -> Path:
    """Write the model's weights (safetensors; tied weights stored once) and config, plus a copy of the tokenizer."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    with atomic_dir(dir) as tmp:
        # One metadata key only: safetensors writes metadata from a hash map, so several keys come out in a
        # process-dependent order and identical weights would give different file bytes (and hashes).
        safetensors.torch.save_file(_unique_tensors(model.state_dict()), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps({"format": FORMAT, "model": model.config.to_dict()}, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp / TOKENIZER_DIR)
    return Path(dir)


def read_config(dir: str | Path) -> ModelConfig:
    path = Path(dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {dir} is not a checkpoint folder (expected {WEIGHTS} + {CONFIG})")
    try:
        data = json.loads(path.read_text())
        return ModelConfig.from_dict(data["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid model config ({e}); re-save the checkpoint with llm.checkpoint.save_model") from e


def load_model(dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[DecoderLM, ModelConfig]:
    """Build the model from `config.json` and load `model.safetensors` (strict: every tensor must match)."""
    cfg = read_config(dir)
    weights = Path(dir) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the checkpoint folder {dir} is incomplete")
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device)
    if hasattr(model, "reset_rope"):
        model.reset_rope()
    if cfg.tie_embeddings:  # to_empty() keeps the tie, but be explicit: the file stores the shared tensor once
        model.lm_head.weight = model.tok_emb.weight
    try:
        state = safetensors.torch.load_file(str(weights), device=str(device))
        # A tied tensor is stored once under either name (ours keeps the first in state_dict order; files written
        # by other tools may keep the other): fill in whichever alias is absent.
        for name, alias in _aliases(model.state_dict()).items():
            if name not in state and alias in state:
                state[name] = state[alias]
            elif alias not in state and name in state:
                state[alias] = state[name]
        model.load_state_dict(state, strict=True)
    except (RuntimeError, safetensors.SafetensorError) as e:
        raise ValueError(f"{weights}: weights do not match {Path(dir) / CONFIG} ({e}); the folder mixes two models, "
                         "re-save it with llm.checkpoint.save_model") from e
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), cfg
