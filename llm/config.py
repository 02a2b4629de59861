"""Model configuration: one validated dataclass for both families, and named size presets (plain data)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

FAMILIES = ("gpt2", "llama")


@dataclass
class ModelConfig:
    """Every hyperparameter of a decoder-only transformer. Invalid combinations fail at construction.

    Field comments are the documentation; `ModelConfig.describe()` returns them for CLI/UI help.
    """

    family: Literal["gpt2", "llama"] = "llama"  # gpt2: LayerNorm + learned positions + GELU; llama: RMSNorm + RoPE + SwiGLU
    vocab_size: int = 4096  # tokenizer vocabulary (the embedding is padded up to `pad_vocab_multiple`)
    max_seq_len: int = 256  # context length in tokens
    n_layer: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_embd: int = 128  # residual stream width
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention (None = n_heads); llama only
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # scales the SwiGLU hidden size (8/3 * n_embd) before rounding
    ffn_hidden: int | None = None  # explicit MLP hidden size (overrides the rules above; set by HF import)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches (training only)
    bias: bool = False  # biases in linear layers and LayerNorm
    tie_embeddings: bool = True  # share the token embedding with the LM head
    pad_vocab_multiple: int = 64  # embedding rows are rounded up to this multiple (faster matmuls)
    init_std: float = 0.02  # std of the normal weight init; residual projections get std / sqrt(2 * n_layer)
    use_mla: bool = False  # multi-head latent attention (DeepSeek style, llama family only)
    kv_lora_rank: int = 0  # MLA: width of the compressed key/value latent (the only thing cached besides k_rope)
    q_lora_rank: int = 0  # MLA: width of the compressed query (0 = queries projected directly)
    qk_rope_head_dim: int = 0  # MLA: per-head dims of q/k that carry RoPE (k's are shared by all heads)
    qk_nope_head_dim: int = 0  # MLA: per-head dims of q/k without position information
    v_head_dim: int = 0  # MLA: per-head value dims

    def __post_init__(self) -> None:
        def fail(field: str, msg: str) -> None:
            raise ValueError(f"ModelConfig.{field}: {msg} (got {getattr(self, field)!r})")

        if self.family not in FAMILIES:
            fail("family", f"must be one of {FAMILIES}")
        for name in ("vocab_size", "max_seq_len", "n_layer", "n_heads", "n_embd", "multiple_of", "pad_vocab_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(name, "must be a positive integer")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"must be a positive divisor of n_heads={self.n_heads}")
        if self.family == "gpt2" and self.n_kv_heads != self.n_heads:
            fail("n_kv_heads", "grouped-query attention is a llama-family feature; use n_kv_heads = n_heads for gpt2")
        if self.n_embd % self.n_heads:
            fail("n_embd", f"must be divisible by n_heads={self.n_heads}")
        if self.family == "llama" and not self.use_mla and self.head_dim % 2:
            fail("n_embd", f"RoPE needs an even head dim, but n_embd / n_heads = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must be in [0, 1)")
        if self.norm_eps <= 0:
            fail("norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be > 0")
        if self.init_std <= 0:
            fail("init_std", "must be > 0")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            fail("ffn_dim_multiplier", "must be > 0 or None")
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            fail("ffn_hidden", "must be > 0 or None")
        if self.use_mla:
            if self.family != "llama":
                fail("use_mla", "multi-head latent attention is only available in the llama family")
            for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    fail(name, "must be > 0 when use_mla is true")
            if self.qk_rope_head_dim % 2:
                fail("qk_rope_head_dim", "RoPE needs an even number of dims")
            if self.q_lora_rank < 0:
                fail("q_lora_rank", "must be >= 0 (0 = no query compression)")

    # ----- derived sizes -----
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return math.ceil(self.vocab_size / m) * m

    @property
    def mlp_hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.family == "gpt2":
            return 4 * self.n_embd
        hidden = int(2 * 4 * self.n_embd / 3)  # SwiGLU has 3 matrices: 2/3 of 4x keeps the parameter count of a 4x MLP
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def rope_dim(self) -> int:
        """Dims of each head that are rotated (0 for gpt2, which uses learned positions)."""
        if self.family == "gpt2":
            return 0
        return self.qk_rope_head_dim if self.use_mla else self.head_dim

    # ----- (de)serialisation -----
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **overrides})

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name -> one-line description (parsed from the comments above, for CLI and UI help)."""
        import inspect

        out: dict[str, str] = {}
        for line in inspect.getsource(cls).splitlines():
            line = line.strip()
            name = line.split(":", 1)[0]
            if "  # " in line and name.isidentifier():
                out[name] = line.split("  # ", 1)[1]
        return out


# init_std 0.1 (about 1/sqrt(n_embd)), not GPT-2's 0.02 (sized for width 768): at 0.02 a 128-wide model never learns
# to copy a name from its context (docs/FINDINGS.md, "Initialisation of narrow models").
_TINY = dict(vocab_size=4096, max_seq_len=256, n_layer=6, n_heads=4, n_embd=128, multiple_of=32, init_std=0.1)
_124M = dict(vocab_size=50257, max_seq_len=1024, n_layer=12, n_heads=12, n_embd=768)

# Presets are data: a name maps to field values, nothing else in the code looks at the name.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.6M parameters: trains on a 2-core CPU in minutes; the default for tests and the CPU demo.
    "tiny": dict(family="llama", **_TINY),
    "tiny-gpt2": dict(family="gpt2", **_TINY),
    "tiny-mla": dict(
        family="llama", use_mla=True, kv_lora_rank=32, q_lora_rank=0, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, **_TINY,
    ),
    "gpt2-124m": dict(family="gpt2", **_124M),
    "gpt2-medium": dict(family="gpt2", vocab_size=50257, max_seq_len=1024, n_layer=24, n_heads=16, n_embd=1024),
    "llama-124m": dict(family="llama", n_kv_heads=4, multiple_of=256, **_124M),
    "llama-mla-124m": dict(
        family="llama", use_mla=True, kv_lora_rank=256, q_lora_rank=0, qk_rope_head_dim=32, qk_nope_head_dim=64,
        v_head_dim=64, multiple_of=256, **_124M,
    ),
}


def get_config(preset: str, **overrides: Any) -> ModelConfig:
    """The preset's config with `overrides` applied, e.g. `get_config("tiny", vocab_size=2048)`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[preset], **overrides})


__all__ = ["FAMILIES", "PRESETS", "ModelConfig", "get_config"]
