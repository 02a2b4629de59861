"""Conversion to and from transformers-native checkpoints (no trust_remote_code anywhere).

gpt2 -> GPT2LMHeadModel, llama -> LlamaForCausalLM, llama + MLA -> DeepseekV3ForCausalLM with dense MLPs
(first_k_dense_replace = n_layer). Every mapping is exact: the same weights give the same logits (fp32).
Our RoPE uses the rotate-half layout, like HF Llama, so q/k need no permutation; for DeepSeek we export
`rope_interleave=False` and permute interleaved checkpoints on import.
transformers is imported inside the functions so `import llm` never needs it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from llm.checkpoint import CONFIG, FORMAT, TOKENIZER_DIR, load_model
from llm.config import ModelConfig
from llm.files import atomic_dir
from llm.layers import DecoderLM
from llm.model import build_model
from llm.tokenizer import TOKENIZER_FILES

SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}


# ----------------------------------------------------------------------------------------------------- export
def _special_token_ids(tokenizer_dir: Path | None) -> dict[str, int | None]:
    """bos/eos/pad ids: the tokens named in tokenizer_config.json (else our defaults), looked up in tokenizer.json."""
    ids: dict[str, int | None] = {k: None for k in SPECIAL}
    if tokenizer_dir is None:
        return ids
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tc_path = tokenizer_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    for kind, default in SPECIAL.items():
        name = tc.get(f"{kind}_token") or default
        if isinstance(name, dict):  # {"content": "<|eos|>", ...}
            name = name.get("content")
        ids[kind] = tok.token_to_id(name) if isinstance(name, str) else None
    return ids


def _must_be_zero(t: Tensor, what: str) -> None:
    if t.count_nonzero():
        raise ValueError(f"export_hf: {what} is non-zero but the transformers class has no such parameter")


def _gpt2_state(model: DecoderLM) -> dict[str, Tensor]:
    cfg, sd = model.config, model.state_dict()
    V, C = cfg.vocab_size, cfg.n_embd

    def bias(name: str, n: int) -> Tensor:  # HF GPT-2 always has biases; ours may be off (= zeros)
        return sd[name] if name in sd else torch.zeros(n, dtype=sd["tok_emb.weight"].dtype)

    out = {"transformer.wte.weight": sd["tok_emb.weight"][:V], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": bias("norm_f.bias", C)}
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        # HF GPT-2 uses Conv1D: weights stored (in, out), the transpose of nn.Linear
        pairs = {"ln_1": ("norm1", None), "ln_2": ("norm2", None), "attn.c_attn": ("attn.qkv", 3 * C),
                 "attn.c_proj": ("attn.proj", C), "mlp.c_fc": ("mlp.fc", cfg.mlp_hidden), "mlp.c_proj": ("mlp.proj", C)}
        for hf, (ours, n_out) in pairs.items():
            w = sd[o + ours + ".weight"]
            out[h + hf + ".weight"] = w if n_out is None else w.t()
            out[h + hf + ".bias"] = bias(o + ours + ".bias", C if n_out is None else n_out)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    return out


def _llama_state(model: DecoderLM) -> dict[str, Tensor]:
    cfg, sd = model.config, model.state_dict()
    V = cfg.vocab_size
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"][:V], "model.norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[o + "norm1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[o + "norm2.weight"]
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            gate, up = sd[f"{o}mlp.gate_up.{suffix}"].chunk(2, dim=0)
            out[f"{h}mlp.gate_proj.{suffix}"], out[f"{h}mlp.up_proj.{suffix}"] = gate, up
            out[f"{h}mlp.down_proj.{suffix}"] = sd[f"{o}mlp.down.{suffix}"]
            a = o + "attn."
            if cfg.use_mla:
                if suffix == "bias":
                    for name in ("gate_proj", "up_proj", "down_proj"):  # DeepSeek's MLP has no biases
                        _must_be_zero(out.pop(f"{h}mlp.{name}.bias"), f"{o}mlp bias")
                names = {"q_a": "q_a_proj", "kv_a": "kv_a_proj_with_mqa", "proj": "o_proj"}
                if suffix == "weight":
                    names |= {"q_proj": "q_proj", "q_norm": "q_a_layernorm", "q_b": "q_b_proj",
                              "kv_norm": "kv_a_layernorm", "kv_b": "kv_b_proj"}
                for ours, hf in names.items():
                    if f"{a}{ours}.{suffix}" in sd:
                        out[f"{h}self_attn.{hf}.{suffix}"] = sd[f"{a}{ours}.{suffix}"]
            else:
                q, k, v = sd[f"{a}qkv.{suffix}"].split([H * D, K * D, K * D], dim=0)
                out[f"{h}self_attn.q_proj.{suffix}"], out[f"{h}self_attn.k_proj.{suffix}"] = q, k
                out[f"{h}self_attn.v_proj.{suffix}"] = v
                out[f"{h}self_attn.o_proj.{suffix}"] = sd[f"{a}proj.{suffix}"]
    return out


def _hf_config(cfg: ModelConfig, ids: dict[str, int | None], dtype: torch.dtype):
    import transformers

    common = dict(vocab_size=cfg.vocab_size, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                  pad_token_id=ids["pad"], tie_word_embeddings=cfg.tie_embeddings,
                  dtype=str(dtype).removeprefix("torch."))
    if cfg.family == "gpt2":
        return transformers.GPT2Config(
            n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_heads, n_positions=cfg.max_seq_len,
            n_inner=cfg.mlp_hidden, activation_function="gelu_pytorch_tanh", layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **common)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.use_mla:
        return transformers.DeepseekV3Config(
            hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, kv_lora_rank=cfg.kv_lora_rank,
            q_lora_rank=cfg.q_lora_rank or None, qk_rope_head_dim=cfg.qk_rope_head_dim,
            qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim,
            first_k_dense_replace=cfg.n_layer, num_mtp_layers=0, max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps, rope_parameters=rope, rope_interleave=False, attention_bias=cfg.bias,
            attention_dropout=cfg.dropout, hidden_act="silu", **common)
    return transformers.LlamaConfig(
        hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
        attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=cfg.dropout, hidden_act="silu", **common)


def export_hf(model_or_dir: DecoderLM | str | Path, out_dir: str | Path,
              tokenizer_dir: str | Path | None = None) -> Path:
    """Write a folder that `AutoModelForCausalLM.from_pretrained(out_dir)` loads as a native class, with
    generation_config.json and (when known) the tokenizer, so `AutoTokenizer.from_pretrained(out_dir)` works and
    the chat template travels. A checkpoint folder's own `tokenizer/` is used when tokenizer_dir is None.

    The vocab padding is dropped: the HF model has exactly `vocab_size` rows, matching the tokenizer.
    """
    from transformers import GenerationConfig

    if isinstance(model_or_dir, str | Path):
        ckpt = Path(model_or_dir)
        model, _ = load_model(ckpt)
        if tokenizer_dir is None and (ckpt / TOKENIZER_DIR / "tokenizer.json").is_file():
            tokenizer_dir = ckpt / TOKENIZER_DIR
    else:
        model = getattr(model_or_dir, "_orig_mod", model_or_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok_dir is not None and not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tok_dir / 'tokenizer.json'} not found: tokenizer_dir must be a tokenizer folder")
    cfg = model.config
    state = _gpt2_state(model) if cfg.family == "gpt2" else _llama_state(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    dtype = model.lm_head.weight.dtype
    ids = _special_token_ids(tok_dir)
    hf_cfg = _hf_config(cfg, ids, dtype)
    hf_cfg.architectures = [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[cfg.family]
                            if not cfg.use_mla else "DeepseekV3ForCausalLM"]
    with atomic_dir(out_dir) as tmp:
        safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_cfg.save_pretrained(tmp)
        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]).save_pretrained(tmp)
        (tmp / "llm_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")  # exact round trip
        if tok_dir is not None:
            for name in TOKENIZER_FILES:
                if (tok_dir / name).is_file():
                    shutil.copy2(tok_dir / name, tmp / name)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------------- import
def _read_hf_weights(hf_dir: Path) -> dict[str, Tensor]:
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return safetensors.torch.load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for f in files:
            out |= safetensors.torch.load_file(str(hf_dir / f))
        return out
    if any(hf_dir.glob("*.bin")):
        raise ValueError(f"{hf_dir}: only pickle (.bin) weights found; they are refused for safety. Convert them to "
                         "safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json found")


def _config_from_hf(c: dict, path: Path) -> ModelConfig:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(f"{path}: {what} is not supported by llm's model families")

    kind = c.get("model_type")
    rope = c.get("rope_parameters") or {"rope_type": (c.get("rope_scaling") or {}).get("rope_type", "default"),
                                        "rope_theta": c.get("rope_theta", 10000.0)}
    if kind == "gpt2":
        need(c.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
             f"activation_function={c.get('activation_function')!r}")
        need(not c.get("scale_attn_by_inverse_layer_idx") and c.get("scale_attn_weights", True),
             "non-standard attention scaling")
        return ModelConfig(family="gpt2", vocab_size=c["vocab_size"], max_seq_len=c["n_positions"],
                           n_layer=c["n_layer"], n_heads=c["n_head"], n_embd=c["n_embd"], ffn_hidden=c.get("n_inner"),
                           norm_eps=c.get("layer_norm_epsilon", 1e-5), bias=True,
                           tie_embeddings=c.get("tie_word_embeddings", True))
    need(kind in ("llama", "deepseek_v3"), f"model_type={kind!r} (expected gpt2, llama or deepseek_v3)")
    need(rope.get("rope_type", "default") == "default", f"RoPE scaling {rope.get('rope_type')!r}")
    need(c.get("hidden_act", "silu") == "silu", f"hidden_act={c.get('hidden_act')!r}")
    common = dict(family="llama", vocab_size=c["vocab_size"], max_seq_len=c["max_position_embeddings"],
                  n_layer=c["num_hidden_layers"], n_heads=c["num_attention_heads"], n_embd=c["hidden_size"],
                  ffn_hidden=c["intermediate_size"], rope_theta=float(rope.get("rope_theta", 10000.0)),
                  norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=c.get("tie_word_embeddings", False),
                  bias=bool(c.get("attention_bias") or c.get("mlp_bias")))
    if kind == "llama":
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        need(head_dim * c["num_attention_heads"] == c["hidden_size"], f"head_dim={head_dim} != hidden/heads")
        return ModelConfig(n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], **common)
    need((c.get("first_k_dense_replace") or 0) >= c["num_hidden_layers"], "a DeepSeek model with MoE layers")
    return ModelConfig(use_mla=True, kv_lora_rank=c["kv_lora_rank"], q_lora_rank=c.get("q_lora_rank") or 0,
                       qk_rope_head_dim=c["qk_rope_head_dim"], qk_nope_head_dim=c["qk_nope_head_dim"],
                       v_head_dim=c["v_head_dim"], **common)


def _deinterleave_rows(w: Tensor, block: int, rope: int) -> Tensor:
    """DeepSeek's interleaved RoPE pairs dims (0,1),(2,3)...; reorder the last `rope` rows of every `block`-row
    head to [even..., odd...], the rotate-half layout, which gives identical attention scores."""
    perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    w = w.view(-1, block, *w.shape[1:]).clone()
    w[:, block - rope:] = w[:, block - rope:][:, perm]
    return w.view(-1, *w.shape[2:])


def import_hf(hf_dir: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[DecoderLM, ModelConfig]:
    """Load a GPT2LMHeadModel / LlamaForCausalLM / dense DeepseekV3ForCausalLM folder (safetensors) as our model."""
    path = Path(hf_dir)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: {path} is not a transformers model folder")
    c = json.loads(cfg_file.read_text())
    cfg = _import_config(path, _config_from_hf(c, cfg_file))
    w = _read_hf_weights(path)
    if cfg.family == "gpt2":
        cfg, sd = _gpt2_from_hf(cfg, w)
    else:
        sd = _llama_from_hf(cfg, w, interleaved=bool(c.get("rope_interleave", True)) and cfg.use_mla)
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = _pad_vocab(w["lm_head.weight"], cfg)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not map onto {cfg.family} (missing {missing}, unexpected {unexpected})")
    return model.to(device=device, dtype=dtype).eval(), cfg


def _import_config(path: Path, cfg: ModelConfig) -> ModelConfig:
    """export_hf's llm_config.json (fields HF has no slot for: padding, init, ...) when it still fits the weights."""
    ours_file = path / "llm_config.json"
    if not ours_file.is_file():
        return cfg
    ours = ModelConfig.from_dict(json.loads(ours_file.read_text()))
    # trust it only while it still describes these weights (a later stage may have changed the HF model)
    same = ("family", "vocab_size", "max_seq_len", "n_layer", "n_heads", "n_embd", "n_kv_heads", "mlp_hidden",
            "rope_theta", "norm_eps", "tie_embeddings", "use_mla", "kv_lora_rank", "q_lora_rank",
            "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    return ours if all(getattr(ours, f) == getattr(cfg, f) for f in same) else cfg


def _pad_vocab(t: Tensor, cfg: ModelConfig) -> Tensor:
    """An embedding / LM-head matrix with its vocab rows padded with zeros to the model's padded size."""
    out = torch.zeros(cfg.padded_vocab_size, t.shape[1], dtype=t.dtype)
    out[: t.shape[0]] = t[: cfg.vocab_size]
    return out


def _gpt2_from_hf(cfg: ModelConfig, w: dict[str, Tensor]) -> tuple[ModelConfig, dict[str, Tensor]]:
    sd: dict[str, Tensor] = {}
    if not cfg.bias and any(t.count_nonzero() for k, t in w.items() if k.endswith(".bias")):
        cfg = cfg.replace(bias=True)  # HF GPT-2 always trains biases
    sd["tok_emb.weight"], sd["pos_emb.weight"] = _pad_vocab(w["transformer.wte.weight"], cfg), w["transformer.wpe.weight"]
    sd["norm_f.weight"] = w["transformer.ln_f.weight"]
    if cfg.bias:
        sd["norm_f.bias"] = w["transformer.ln_f.bias"]
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        for hf, ours, conv in (("ln_1", "norm1", False), ("ln_2", "norm2", False), ("attn.c_attn", "attn.qkv", True),
                               ("attn.c_proj", "attn.proj", True), ("mlp.c_fc", "mlp.fc", True),
                               ("mlp.c_proj", "mlp.proj", True)):
            sd[o + ours + ".weight"] = w[h + hf + ".weight"].t() if conv else w[h + hf + ".weight"]
            if cfg.bias:
                sd[o + ours + ".bias"] = w[h + hf + ".bias"]
            else:
                _must_be_zero(w[h + hf + ".bias"], h + hf + ".bias")
    return cfg, sd


def _llama_from_hf(cfg: ModelConfig, w: dict[str, Tensor], interleaved: bool) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    sd["tok_emb.weight"], sd["norm_f.weight"] = _pad_vocab(w["model.embed_tokens.weight"], cfg), w["model.norm.weight"]
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        a, s = o + "attn.", h + "self_attn."
        sd[o + "norm1.weight"], sd[o + "norm2.weight"] = (w[h + "input_layernorm.weight"],
                                                          w[h + "post_attention_layernorm.weight"])
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            def get(name: str, n: int, suffix: str = suffix) -> Tensor:  # missing biases are zeros
                return w.get(f"{name}.{suffix}", torch.zeros(n))

            hidden, C = cfg.mlp_hidden, cfg.n_embd
            sd[f"{o}mlp.gate_up.{suffix}"] = torch.cat([get(h + "mlp.gate_proj", hidden), get(h + "mlp.up_proj", hidden)])
            sd[f"{o}mlp.down.{suffix}"] = get(h + "mlp.down_proj", C)
            if cfg.use_mla:
                sd.update(_mla_from_hf(cfg, a, s, suffix, get, interleaved))
            else:
                H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
                sd[f"{a}qkv.{suffix}"] = torch.cat([get(s + "q_proj", H * D), get(s + "k_proj", K * D),
                                                    get(s + "v_proj", K * D)])
                sd[f"{a}proj.{suffix}"] = get(s + "o_proj", C)
    return sd


def _mla_from_hf(cfg: ModelConfig, a: str, s: str, suffix: str, get, interleaved: bool) -> dict[str, Tensor]:
    """One layer's multi-head latent attention tensors (DeepseekV3 names -> ours), de-interleaving RoPE rows."""
    sd: dict[str, Tensor] = {}
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    names = {"q_a": ("q_a_proj", cfg.q_lora_rank), "kv_a": ("kv_a_proj_with_mqa", 0), "proj": ("o_proj", cfg.n_embd)}
    if suffix == "weight":
        names |= {"q_proj": ("q_proj", 0), "q_norm": ("q_a_layernorm", 0), "q_b": ("q_b_proj", 0),
                  "kv_norm": ("kv_a_layernorm", 0), "kv_b": ("kv_b_proj", 0)}
    for ours, (hf, n) in names.items():
        if ours.startswith("q_") and ours != "q_proj" and not cfg.q_lora_rank:
            continue
        if ours == "q_proj" and cfg.q_lora_rank:
            continue
        n = n or (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        t = get(s + hf, n)
        if interleaved and ours in ("q_proj", "q_b"):
            t = _deinterleave_rows(t, qk, cfg.qk_rope_head_dim)
        if interleaved and ours == "kv_a":
            t = _deinterleave_rows(t, t.shape[0], cfg.qk_rope_head_dim)
        sd[f"{a}{ours}.{suffix}"] = t
    return sd


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
    return import_hf(path, device=device, dtype=dtype or torch.float32)
