"""The model package: GPT-2 and LLaMA families, generation, checkpoints, transformers interop, the training loop.

Import from the module that does the job (`llm.checkpoint.load_model`, `llm.generate.generate`,
`llm.hf.export_hf`, ...; the map is in docs/ARCHITECTURE.md). This file imports nothing, so that the light modules
(`llm.files`, `llm.utils.parse_flag`) are usable without loading torch: the CLI imports them before it starts a
Prefect server, and torch's import would delay that.

Needs only torch, safetensors and tokenizers (transformers is imported lazily inside `llm.hf`'s functions).
"""
