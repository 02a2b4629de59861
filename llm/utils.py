"""Model arithmetic: parameter counts, FLOPs per token and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import asdict

import torch
from torch import nn

from llm.config import ModelConfig


def num_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Unique parameters (tied weights counted once). non_embedding drops token/position embeddings, the usual
    N in scaling-law and FLOPs formulas (the tied LM head then counts as an embedding)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if non_embedding and name.split(".")[-2] in ("tok_emb", "pos_emb"):
            continue
        total += p.numel()
    return total


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token of the attention scores and weighted sum: 6 * n_layer * seq_len * (qk + v dims)
    (forward 2 + backward 4 multiply-adds, each counted as 2 FLOPs, averaged over a causal window's full length
    as in the PaLM appendix)."""
    if cfg.use_mla:
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.head_dim
    return 6 * cfg.n_layer * seq_len * cfg.n_heads * (qk + v)


def flops_per_token(model_or_cfg: nn.Module | ModelConfig, seq_len: int | None = None, *,
                    n_params: int | None = None) -> float:
    """Training FLOPs per token: 6N (N = non-embedding params + the LM head) + the attention term.

    llm models (and ModelConfigs) are counted exactly; any other module gets the generic estimate below.
    """
    if isinstance(model_or_cfg, nn.Module) and not isinstance(getattr(model_or_cfg, "config", None), ModelConfig):
        return _generic_flops_per_token(model_or_cfg, seq_len or 0)
    if isinstance(model_or_cfg, nn.Module):
        cfg = model_or_cfg.config
        n = num_params(model_or_cfg, non_embedding=True) + cfg.n_embd * cfg.padded_vocab_size
    else:
        cfg = model_or_cfg
        if n_params is None:
            from llm.model import build_model  # exact count without hand formulas; cheap on the meta device

            with torch.device("meta"):
                m = build_model(cfg)
            n = num_params(m, non_embedding=True) + cfg.n_embd * cfg.padded_vocab_size
        else:
            n = n_params
    return 6 * n + attention_flops_per_token(cfg, seq_len or cfg.max_seq_len)


def _generic_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 x non-embedding params (fwd + bwd matmuls) + causal attention scores/values, for a module that is not an
    llm model.

    The attention term is 12 x layers x d_model x seq_len for full attention (PaLM appendix B); counting it for the
    full square keeps the number comparable with nanoGPT/PaLM MFU figures.
    """
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    n = sum(p.numel() for p in model.parameters()) - emb
    cfg = model_config(model) or {}
    n_layer, d = cfg.get("n_layer"), cfg.get("n_embd")
    if not (n_layer and d):
        return 6.0 * n
    # the LM head shares the embedding table when tied, but its matmul still costs 6 x V x d per token
    if cfg.get("tie_embeddings", False):
        n += cfg.get("padded_vocab_size", cfg.get("vocab_size", 0)) * d
    return 6.0 * n + 12.0 * n_layer * d * seq_len


def model_config(model: nn.Module) -> dict | None:
    """The model's config as a dict (llm models carry `.config` / `.cfg` with `to_dict()`), else None."""
    for attr in ("config", "cfg"):
        cfg = getattr(model, attr, None)
        if cfg is None:
            continue
        if hasattr(cfg, "to_dict"):
            return dict(cfg.to_dict())
        with contextlib.suppress(TypeError):
            return asdict(cfg)
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float) -> float:
    """Fraction of the hardware peak (FLOP/s, e.g. 989e12 for an H100 in bf16) used by training."""
    return tokens_per_s * flops_per_tok / peak_flops


FLAG_METAVAR = "{true,false,auto}"
_FLAGS = {"true": True, "on": True, "false": False, "off": False, "auto": "auto"}


def parse_flag(value: str) -> bool | str:
    """A true / false / auto setting (compile, fused_loss, loss_kernel) as written on a command line, spelled as in
    the configs ("on" / "off" are accepted too): True, False or "auto". Usable as an argparse `type`."""
    flag = _FLAGS.get(str(value).strip().lower())
    if flag is None:
        raise FlagError(f"expected true, false or auto, got {value!r}")
    return flag


class FlagError(argparse.ArgumentTypeError, ValueError):
    """A flag value that is not true / false / auto; argparse prints its message as the usage error."""
