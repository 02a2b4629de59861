"""GPT-2 family: learned positions, pre-LayerNorm blocks, multi-head attention, GELU MLP (4x), tied LM head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from llm.config import ModelConfig
from llm.layers import Attention, Block, DecoderLM, maybe_dropout


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True

    def forward(self, x: Tensor) -> Tensor:
        # tanh approximation: what GPT-2 was trained with (HF "gelu_new" / "gelu_pytorch_tanh")
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class GPT2(DecoderLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.drop = maybe_dropout(cfg.dropout)

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)

        self.blocks = nn.ModuleList(
            Block(norm(), Attention(cfg), norm(), GeluMLP(cfg), cfg.dropout) for _ in range(cfg.n_layer)
        )
        self.norm_f = norm()
        self._finish_init()

    def embed(self, idx: Tensor, position_ids: Tensor) -> Tensor:
        return self.drop(self.tok_emb(idx) + self.pos_emb(position_ids))  # (B, T, C)
