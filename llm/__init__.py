"""The model package: GPT-2 and LLaMA families, generation, checkpoints and transformers interop.

Imports only torch, safetensors and tokenizers (transformers is imported lazily inside `llm.hf`'s functions).
"""

from llm.checkpoint import load_model, save_model
from llm.config import PRESETS, ModelConfig, get_config
from llm.generate import generate, stream
from llm.hf import export_hf, import_hf, load_any
from llm.model import build_model

__all__ = ["PRESETS", "ModelConfig", "build_model", "export_hf", "generate", "get_config", "import_hf", "load_any",
           "load_model", "save_model", "stream"]
