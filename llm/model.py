"""`build_model(cfg)`: the one place a config's family picks a model class."""

from __future__ import annotations

from llm.config import ModelConfig
from llm.gpt2 import GPT2
from llm.layers import DecoderLM
from llm.llama import Llama

FAMILY_CLASSES: dict[str, type[DecoderLM]] = {"gpt2": GPT2, "llama": Llama}


def build_model(cfg: ModelConfig) -> DecoderLM:
    """A randomly initialised model (GPT-2 init with scaled residual projections) on the default device."""
    return FAMILY_CLASSES[cfg.family](cfg)


__all__ = ["DecoderLM", "GPT2", "Llama", "build_model"]
