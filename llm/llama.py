"""LLaMA family: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, optional multi-head latent
attention (MLA, DeepSeek style: keys/values come from a small cached latent plus one shared RoPE key)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.config import ModelConfig
from llm.layers import (
    Attention,
    Block,
    DecoderLM,
    KVCache,
    RMSNorm,
    apply_rope,
    attend,
    maybe_dropout,
    rope_tables,
)

MLA_NORM_EPS = 1e-6  # DeepSeek's latent norms use a fixed eps, independent of the block norms'


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=cfg.bias)  # gate and up fused: one matmul
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.down.residual = True

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class LatentAttention(nn.Module):
    """MLA. Per token only the normed latent c (kv_lora_rank) and the shared rotated key k_rope (qk_rope_head_dim)
    are cached; per-head keys [k_nope, k_rope] and values are expanded from c by `kv_b` at attention time."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.rank, self.nope, self.rope_d, self.v_dim = (
            cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
        H, qk = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=cfg.bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, MLA_NORM_EPS)
            self.q_b = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.n_embd, H * qk, bias=False)
        self.kv_a = nn.Linear(cfg.n_embd, self.rank + self.rope_d, bias=cfg.bias)
        self.kv_norm = RMSNorm(self.rank, MLA_NORM_EPS)
        self.kv_b = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.proj = nn.Linear(H * self.v_dim, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True
        self.scale = qk**-0.5
        self.cache: KVCache | None = None

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        # one "head" holding the latent in k and the rotated shared key in v
        return KVCache(batch, 1, max_len, self.rank, self.rope_d, dtype, device)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, is_causal: bool,
                input_pos: Tensor | None = None, kv_len: int | None = None) -> Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_b(self.q_norm(self.q_a(x))) if hasattr(self, "q_a") else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, H, -1).transpose(1, 2).split([self.nope, self.rope_d], dim=-1)  # (B, H, T, *)
        c, k_rope = self.kv_a(x).split([self.rank, self.rope_d], dim=-1)
        c = self.kv_norm(c)[:, None]  # (B, 1, T, rank)
        q_rope, k_rope = apply_rope(q_rope, *rope), apply_rope(k_rope[:, None], *rope)  # k_rope (B, 1, T, r)
        if self.cache is not None and input_pos is not None:  # a kept (static) cache is ignored in training
            c, k_rope = self.cache.update(input_pos, c, k_rope)  # (B, 1, L, *)
            if kv_len is not None:
                c, k_rope = c[:, :, :kv_len], k_rope[:, :, :kv_len]
        S = c.shape[2]
        kv = self.kv_b(c[:, 0]).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)  # (B, H, S, nope + v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, self.rope_d)], dim=-1)  # (B, H, S, nope + rope)
        q = torch.cat([q_nope, q_rope], dim=-1)
        y = attend(q, k, v, mask, is_causal, self.dropout if self.training else 0.0, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))


class Llama(DecoderLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.drop = maybe_dropout(cfg.dropout)
        attention = LatentAttention if cfg.use_mla else Attention
        self.blocks = nn.ModuleList(
            Block(RMSNorm(cfg.n_embd, cfg.norm_eps), attention(cfg), RMSNorm(cfg.n_embd, cfg.norm_eps), SwiGLU(cfg),
                  cfg.dropout)
            for _ in range(cfg.n_layer)
        )
        self.norm_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self._finish_init()
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables, e.g. after building the model on the meta device."""
        cos, sin = rope_tables(self.config.rope_dim, self.config.max_seq_len, self.config.rope_theta)
        device = self.lm_head.weight.device
        device = "cpu" if device.type == "meta" else device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (max_seq_len, rope_dim)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)  # signed: first half negated

    def embed(self, idx: Tensor, position_ids: Tensor) -> Tensor:
        return self.drop(self.tok_emb(idx))

    def rope(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        dtype = self.lm_head.weight.dtype if not torch.is_autocast_enabled() else torch.float32
        # (B, 1, T, rope_dim): broadcast over heads
        return self.rope_cos[position_ids][:, None].to(dtype), self.rope_sin[position_ids][:, None].to(dtype)
