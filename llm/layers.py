"""Layers both model families share: norms, RoPE, the KV cache, attention, and the decoder-LM skeleton.

Shape letters: B batch, T query positions, S key positions, H query heads, K key/value heads, D head dim,
C model width (n_embd), V padded vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.config import ModelConfig


class _RMSNormCPU(torch.autograd.Function):
    """fp32 RMSNorm on CPU with a hand-written backward. torch has no CPU kernel for the fused norm's backward, so
    autograd differentiates its decomposition (pow, mean, rsqrt, mul and all their backwards); this backward is
    eight element-wise passes, which is faster (docs/FINDINGS.md, "The CPU training step")."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        g_w = (g * x_hat).flatten(0, -2).sum(0)
        g_xhat = g * weight
        # d/dx of x * rstd(x): rstd * (g_xhat - x_hat * mean(g_xhat * x_hat))
        g_x = torch.addcmul(g_xhat, x_hat, (g_xhat * x_hat).mean(-1, keepdim=True), value=-1).mul_(rstd)
        return g_x, g_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                return _RMSNormCPU.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        # normalise in fp32 even under bf16 (as LLaMA does), then scale in the input dtype
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_tables(dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin, each (max_len, dim), in the rotate-half layout (first half and second half pair up).

    The sin table's first half is negated: rotate_half(x) * sin == roll(x, dim/2) * signed_sin, so apply_rope needs
    no negation and no concatenation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))  # (dim/2,)
    freqs = torch.arange(max_len, dtype=torch.float32, device="cpu")[:, None] * inv_freq[None, :]  # (max_len, dim/2)
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x (B, H, T, D); cos/signed_sin (B, 1, T, D) from rope_tables. Rotate-half layout, so weights map 1:1 to HF
    Llama / DeepSeek: x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] written as a roll by D/2
    against the signed table (three element-wise passes forward and four backward, instead of five and five)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def maybe_dropout(p: float) -> nn.Module:
    """Dropout, or Identity when p == 0 (an eval-mode Dropout still costs a dispatch per call when decoding)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KVCache(nn.Module):
    """Preallocated (static) cache: shapes never change during generation, so torch.compile/CUDA graphs can
    replay one decode step. Buffers are non-persistent so they never end up in a checkpoint."""

    def __init__(self, batch: int, heads: int, max_len: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, heads, max_len, k_dim, dtype=dtype, device=device), False)
        self.register_buffer("v", torch.zeros(batch, heads, max_len, v_dim, dtype=dtype, device=device), False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, K, T, *) at cache slots `input_pos` (T,), return the whole cache (B, K, L, *)."""
        self.k.index_copy_(2, input_pos, k if k.dtype == self.k.dtype else k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v if v.dtype == self.v.dtype else v.to(self.v.dtype))
        return self.k, self.v


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout: float,
           scale: float | None = None) -> Tensor:
    """q (B, H, T, D), k/v (B, K, S, D) with K dividing H (grouped-query), mask (B, 1, T, S) bool or None."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


class Attention(nn.Module):
    """Causal self-attention with one fused qkv projection: multi-head (gpt2) or grouped-query with RoPE (llama)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = cfg.rope_dim > 0
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled init (GPT-2): keeps the residual stream's variance flat with depth
        self.cache: KVCache | None = None

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, self.head_dim, dtype, device)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, is_causal: bool,
                input_pos: Tensor | None = None, kv_len: int | None = None) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        # split, not slicing: the backward of a split is one concatenation written straight into the projection's
        # (B, T, H + 2K, D) layout, where slices would each zero-fill a full-size gradient and add them up
        qk, v = self.qkv(x).view(B, T, H + 2 * K, D).split([H + K, K], dim=2)
        qk, v = qk.transpose(1, 2), v.transpose(1, 2)  # (B, H + K, T, D), (B, K, T, D)
        if self.use_rope:
            qk = apply_rope(qk, *rope)  # q and k rotated together: half the ops of two calls
        q, k = qk.split([H, K], dim=1)  # (B, H, T, D), (B, K, T, D)
        if self.cache is not None and input_pos is not None:  # a kept (static) cache is ignored in training
            k, v = self.cache.update(input_pos, k, v)  # (B, K, L, D)
            if kv_len is not None:  # eager decoding: attend only to the filled prefix of the cache
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        y = attend(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: nn.Module, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.drop = maybe_dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, is_causal: bool,
                input_pos: Tensor | None = None, kv_len: int | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, is_causal, input_pos, kv_len))
        return x + self.drop(self.mlp(self.norm2(x)))


class DecoderLM(nn.Module):
    """What every family shares: blocks, final norm, LM head, masks, loss, cache management and init.

    A family subclass builds `tok_emb`, `blocks`, `norm_f` and implements `embed(idx, position_ids)` and
    `rope(position_ids)` (None when positions are learned).
    """

    config: ModelConfig
    tok_emb: nn.Embedding
    blocks: nn.ModuleList
    norm_f: nn.Module

    def _finish_init(self) -> None:
        cfg = self.config
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_module)

    def _init_module(self, m: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(m, nn.Linear):
            scaled = getattr(m, "residual", False)
            nn.init.normal_(m.weight, 0.0, std / math.sqrt(2 * self.config.n_layer) if scaled else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    # ----- family hooks -----
    def embed(self, idx: Tensor, position_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def rope(self, position_ids: Tensor) -> tuple[Tensor, Tensor] | None:
        return None

    # ----- forward -----
    def hidden_states(self, idx: Tensor, *, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                      input_pos: Tensor | None = None, kv_len: int | None = None) -> Tensor:
        """Final-norm hidden states (B, T, C), before the LM head (for chunked/fused losses or value heads).

        idx (B, T) token ids. attention_mask (B, S) with 1 for real tokens and 0 for padding, where S = T without
        a cache, or the cache length with one. position_ids (B, T); default: counted from the mask (left padding
        gets position 0) or `input_pos`. input_pos (T,) cache slots to write (only with a cache, see setup_cache).
        kv_len: attend to cache slots [0, kv_len) only (eager decoding; leave None under torch.compile).
        """
        B, T = idx.shape
        if input_pos is None and T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model context max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            if input_pos is not None:
                position_ids = input_pos[None, :].expand(B, T)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(T, device=idx.device)[None, :].expand(B, T)
        mask, is_causal = self._mask(T, attention_mask, input_pos, kv_len)
        x = self.embed(idx, position_ids)  # (B, T, C)
        rope = self.rope(position_ids)
        for block in self.blocks:
            x = block(x, rope, mask, is_causal, input_pos, kv_len)
        return self.norm_f(x)

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, input_pos: Tensor | None = None, kv_len: int | None = None,
                last_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """-> (logits (B, T, vocab_size), loss). targets (B, T), -100 = ignored; loss = mean cross-entropy.

        last_only: compute logits for the last position only (B, 1, vocab_size), e.g. for generation.
        """
        x = self.hidden_states(idx, attention_mask=attention_mask, position_ids=position_ids, input_pos=input_pos,
                               kv_len=kv_len)
        if last_only:
            x = x[:, -1:]
        # the padded rows exist only for matmul speed: they are cut so they never get probability mass
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def _mask(self, T: int, attention_mask: Tensor | None, input_pos: Tensor | None,
              kv_len: int | None) -> tuple[Tensor | None, bool]:
        """-> (bool mask (B|1, 1, T, S) or None, is_causal). None + is_causal lets SDPA pick flash kernels."""
        if input_pos is None:
            if attention_mask is None:
                return None, True
            dev = attention_mask.device
            q_idx = torch.arange(T, device=dev)[:, None]
            k_idx = torch.arange(T, device=dev)[None, :]
            allowed = (k_idx <= q_idx)[None, None] & attention_mask.bool()[:, None, None, :]
        else:
            S = kv_len if kv_len is not None else self._cache_len()
            if attention_mask is None and kv_len is not None and T == 1:
                return None, False  # one new token sees the whole filled prefix
            if attention_mask is None and kv_len is not None and T == kv_len:
                return None, True  # prefill from slot 0: plain causal
            dev = input_pos.device
            q_idx = input_pos[:, None]
            k_idx = torch.arange(S, device=dev)[None, :]
            allowed = (k_idx <= q_idx)[None, None]
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, :S].bool()[:, None, None, :]
        # every query may see itself: padded queries would otherwise have no key and give NaN
        return allowed | (k_idx == q_idx)[None, None], False

    # ----- KV cache -----
    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, reuse: bool = False) -> None:
        """Attach a static KV cache of `max_len` slots to every attention layer (see llm.generate).

        reuse: keep existing caches of the same shape. A compiled (CUDA-graph) decode step has the cache's
        addresses baked in, so new cache tensors on every call would mean recapturing every call.
        """
        p = self.lm_head.weight
        dtype, device = dtype or p.dtype, torch.device(device or p.device)
        for block in self.blocks:
            old = block.attn.cache
            if reuse and old is not None and old.k.shape[:3] == (batch, old.k.shape[1], max_len) and \
                    old.k.dtype == dtype and old.k.device == device:
                continue
            block.attn.cache = block.attn.new_cache(batch, max_len, dtype, device)
            if reuse:
                for buf in block.attn.cache.buffers():
                    torch._dynamo.mark_static_address(buf)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None

    def _cache_len(self) -> int:
        cache = self.blocks[0].attn.cache
        if cache is None:
            raise ValueError("input_pos was given but no KV cache is set up; call model.setup_cache(batch, max_len)")
        return cache.k.shape[2]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device
