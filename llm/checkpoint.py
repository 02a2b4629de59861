"""Checkpoint folder: `model.safetensors` + `config.json` (+ `tokenizer/`), always written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch

from llm.config import ModelConfig
from llm.layers import DecoderLM
from llm.model import build_model

WEIGHTS, CONFIG, TOKENIZER_DIR = "model.safetensors", "config.json", "tokenizer"
FORMAT = "llm-pipeline/1"


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final` in renames only: an existing `final` is set aside first and removed
    once the new one is in place, so `final` never holds a half-written folder."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_output_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder next to `final`; on success it replaces `final` in two renames, so a reader never sees a
    half-written folder and an existing `final` is only removed once the new one is complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer(tokenizer_dir: str | Path, dest: Path) -> None:
    src = Path(tokenizer_dir)
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src / 'tokenizer.json'} not found: tokenizer_dir must be a tokenizer folder "
                                "(tokenizer.json, tokenizer_config.json, special_tokens_map.json)")
    shutil.copytree(src, dest, dirs_exist_ok=True)


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Later state_dict names that share storage with an earlier one (tied embeddings): {later: earlier}."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def _unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor kept once, under its first name, contiguous and on the CPU."""
    dropped = _aliases(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in dropped}


def save_model(dir: str | Path, model: DecoderLM, tokenizer_dir: str | Path | None = None) -> Path:
    """Write the model's weights (safetensors; tied weights stored once) and config, plus a copy of the tokenizer."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    with atomic_output_dir(dir) as tmp:
        # One metadata key only: safetensors writes metadata from a hash map, so several keys come out in a
        # process-dependent order and identical weights would give different file bytes (and hashes).
        safetensors.torch.save_file(_unique_tensors(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
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
        raise ValueError(f"{path}: not a valid model config ({e}); re-save the checkpoint with llm.save_model") from e


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
        for name, alias in _aliases(model).items():
            if name not in state and alias in state:
                state[name] = state[alias]
            elif alias not in state and name in state:
                state[alias] = state[name]
        model.load_state_dict(state, strict=True)
    except (RuntimeError, safetensors.SafetensorError) as e:
        raise ValueError(f"{weights}: weights do not match {Path(dir) / CONFIG} ({e}); the folder mixes two models, "
                         "re-save it with llm.save_model") from e
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), cfg


def load_any(dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> tuple[DecoderLM, ModelConfig]:
    """Load our checkpoint folder or a transformers folder (GPT2 / Llama / dense DeepseekV3), whichever `dir` is."""
    path = Path(dir)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: expected a checkpoint folder or a transformers model folder")
    try:
        is_ours = json.loads(cfg_file.read_text()).get("format") == FORMAT
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if is_ours:
        return load_model(path, device=device, dtype=dtype)
    from llm.hf import import_hf

    return import_hf(path, device=device, dtype=dtype or torch.float32)
