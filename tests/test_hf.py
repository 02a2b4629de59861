"""transformers interop (export/import parity, greedy generate, tokenizer hand-off). Run: .venv/bin/pytest tests/test_hf.py"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llm.checkpoint import save_model  # noqa: E402
from llm.config import get_config  # noqa: E402
from llm.generate import generate  # noqa: E402
from llm.hf import export_hf, import_hf  # noqa: E402
from llm.model import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {
    "gpt2": ("tiny-gpt2", {}, "GPT2LMHeadModel"),
    "gpt2-bias-untied": ("tiny-gpt2", dict(bias=True, tie_embeddings=False), "GPT2LMHeadModel"),
    "llama-gqa": ("tiny", dict(n_kv_heads=2, rope_theta=500.0), "LlamaForCausalLM"),
    "llama-bias-untied": ("tiny", dict(bias=True, tie_embeddings=False), "LlamaForCausalLM"),
    "mla": ("tiny-mla", {}, "DeepseekV3ForCausalLM"),
    "mla-qlora": ("tiny-mla", dict(q_lora_rank=24, tie_embeddings=False), "DeepseekV3ForCausalLM"),
}


def random_model(preset: str, **kw) -> torch.nn.Module:
    model = build_model(get_config(preset, **{"vocab_size": 250, "max_seq_len": 64, "n_layer": 2, **kw})).eval()
    with torch.no_grad():  # non-trivial norms and biases so a mapping mistake there shows up
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(1.0 if model.config.tie_embeddings else 30.0)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_export_parity_and_import_back(tmp: Path, case: str) -> None:
    preset, kw, cls = CASES[case]
    model = random_model(preset, **kw)
    export_hf(model, tmp / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == cls
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = torch.randint(0, 250, (2, 20))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
        back, cfg = import_hf(tmp / "hf")
        again, _ = back(idx)
    assert theirs.shape == ours.shape == (2, 20, 250)
    assert (ours - theirs).abs().max() <= 1e-4
    assert cfg == model.config  # llm_config.json keeps what HF has no slot for
    assert (ours - again).abs().max() <= 1e-6

    prompt = [3, 17, 42, 99, 7]
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                             max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert generate(model, [prompt], max_new_tokens=12) == [hf_out[0, 5:].tolist()]


@pytest.mark.parametrize("fused", [False, True], ids=["plain-loss", "fused-loss"])
@pytest.mark.parametrize("preset, kw", [
    ("tiny-gpt2", dict(bias=True)),  # tied head; with biases, as transformers' GPT-2 always trains them
    ("tiny", dict(n_kv_heads=2)),
    ("tiny-mla", {}),
], ids=["gpt2", "llama-gqa", "mla"])
def test_training_step_matches_transformers(tmp: Path, preset: str, kw: dict, fused: bool) -> None:
    """One SGD step on the same weights gives the same model on both sides: our backward (split q/k/v, rolled
    RoPE, the CPU RMSNorm backward, the fused loss) computes the gradients transformers' autograd does. The
    weight mappings are permutations and splits, which commute with an SGD update."""
    from llm.train import FusedLossLM

    model = random_model(preset, **kw).train()
    export_hf(model, tmp / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", attn_implementation="sdpa").train()
    idx = torch.randint(0, 250, (2, 21))
    trained = FusedLossLM(model, chunk=16) if fused else model  # chunk 16: three chunks, a ragged last one
    ours = trained(idx[:, :-1], idx[:, 1:])[1]
    theirs = hf(input_ids=idx, labels=idx).loss  # shifted inside: the same 20 targets (the last input is causal)
    assert abs(ours.item() - theirs.item()) <= 1e-5
    ours.backward()
    theirs.backward()
    for m in (model, hf):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    probe = torch.randint(0, 250, (2, 20))
    with torch.no_grad():
        before_after = (model.eval()(probe)[0] - hf.eval()(probe).logits).abs().max()
    assert before_after <= 1e-4


def _random_hf(kind: str):
    C = transformers
    if kind == "gpt2":
        return C.GPT2LMHeadModel(C.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                              bos_token_id=0, eos_token_id=0))
    if kind == "llama":
        return C.LlamaForCausalLM(C.LlamaConfig(
            vocab_size=300, hidden_size=32, intermediate_size=70, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 500.0}))
    return C.DeepseekV3ForCausalLM(C.DeepseekV3Config(
        vocab_size=300, hidden_size=32, intermediate_size=70, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, first_k_dense_replace=2, max_position_embeddings=64, rope_interleave=True, num_mtp_layers=0))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "deepseek_v3"])
def test_import_random_hf_model(tmp: Path, kind: str) -> None:
    hf = _random_hf(kind).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and ("norm" in name or "ln_" in name) else 0.0))
    hf.save_pretrained(tmp / "hf")
    model, cfg = import_hf(tmp / "hf")
    assert cfg.vocab_size == 300 and cfg.padded_vocab_size == 320
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


def test_import_refuses_pickle_and_moe(tmp: Path) -> None:
    (tmp / "bin").mkdir()
    _random_hf("llama").config.save_pretrained(tmp / "bin")
    (tmp / "bin" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        import_hf(tmp / "bin")
    moe = _random_hf("deepseek_v3").config
    moe.first_k_dense_replace = 1
    moe.save_pretrained(tmp / "moe")
    with pytest.raises(ValueError, match="MoE"):
        import_hf(tmp / "moe")


def test_export_from_checkpoint_with_tokenizer(tmp: Path) -> None:
    from llm.tokenizer import save_dir, train_bpe

    texts = ["Mia has a red kite and Tom has a green boat. What is 7 plus 5? 12."] * 50
    save_dir(train_bpe(texts, vocab_size=300, show_progress=False), tmp / "tok")
    model = random_model("tiny", vocab_size=300)
    save_model(tmp / "ckpt", model, tokenizer_dir=tmp / "tok")
    export_hf(tmp / "ckpt", tmp / "hf")  # the checkpoint's own tokenizer/ is used
    tok = transformers.AutoTokenizer.from_pretrained(tmp / "hf")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")}
    cfg = transformers.AutoConfig.from_pretrained(tmp / "hf")
    gen = transformers.GenerationConfig.from_pretrained(tmp / "hf")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == tuple(ids.values())
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == tuple(ids.values())
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|bos|>") and text.endswith("<|assistant|>")
    assert cfg.vocab_size == 300
