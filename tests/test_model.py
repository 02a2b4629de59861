"""Model config validation, presets, shapes, causality, padding, init, overfitting. Run: .venv/bin/pytest tests/test_model.py"""

from __future__ import annotations

import pytest
import torch

from llm.config import PRESETS, ModelConfig, get_config
from llm.model import build_model
from llm.utils import flops_per_token, mfu, num_params

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["tiny", "tiny-gpt2", "tiny-mla"]


def small(preset: str, **kw) -> torch.nn.Module:
    return build_model(get_config(preset, vocab_size=200, max_seq_len=32, n_layer=2, **kw)).eval()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=130, n_heads=4), "n_embd"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_embd=12, n_heads=4), "n_embd"),  # head dim 3 is odd: no RoPE
        (dict(family="gpt2", n_kv_heads=2), "n_kv_heads"),
        (dict(use_mla=True, kv_lora_rank=8, qk_rope_head_dim=5, qk_nope_head_dim=8, v_head_dim=8), "qk_rope_head_dim"),
        (dict(use_mla=True, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8), "kv_lora_rank"),
        (dict(family="gpt2", use_mla=True), "use_mla"),
        (dict(family="bert"), "family"),
        (dict(dropout=1.5), "dropout"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_config_rejects_impossible_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
        ModelConfig(**kwargs)


def test_config_round_trip_and_unknown_fields() -> None:
    cfg = get_config("tiny-mla", vocab_size=1000)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.padded_vocab_size == 1024 and cfg.padded_vocab_size % 64 == 0
    assert get_config("gpt2-124m").padded_vocab_size == 50304
    with pytest.raises(ValueError, match="n_embed"):
        ModelConfig.from_dict({"n_embed": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("gpt5")
    assert "n_kv_heads" in ModelConfig.describe()


def test_every_preset_builds_on_meta_with_expected_size() -> None:
    for name in PRESETS:
        with torch.device("meta"):
            model = build_model(get_config(name))
        n = num_params(model)
        if name.startswith("tiny"):
            assert 1e6 <= n <= 3e6, (name, n)
        elif "124m" in name:
            assert 100e6 <= n <= 130e6, (name, n)
    gpt2 = get_config("gpt2-124m")
    with torch.device("meta"):
        assert num_params(build_model(gpt2)) == 124_373_760  # 124.4M with the padded vocab of 50304


def test_llama_mlp_hidden_rounding() -> None:
    cfg = get_config("llama-124m")
    assert cfg.mlp_hidden == 2048 and cfg.mlp_hidden % cfg.multiple_of == 0
    assert get_config("tiny", multiple_of=100).mlp_hidden == 400  # int(8/3*128)=341 -> 400
    assert get_config("tiny", ffn_hidden=77).mlp_hidden == 77


@pytest.mark.parametrize("preset", TINY)
def test_shapes_and_loss(preset: str) -> None:
    model = small(preset)
    idx = torch.randint(0, 200, (3, 17))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 17, 200)  # vocab padding never leaks out
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)
    targets = idx.clone()
    targets[:, :10] = -100
    _, loss_part = model(idx, targets)
    manual = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, 200), idx[:, 10:].reshape(-1))
    torch.testing.assert_close(loss_part, manual)
    last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("preset", TINY)
def test_causality(preset: str) -> None:
    model = small(preset)
    idx = torch.randint(0, 200, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 200
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-5, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # the change is visible where it should be


@pytest.mark.parametrize("preset", TINY)
def test_left_padding_does_not_change_results(preset: str) -> None:
    model = small(preset)
    seq = torch.randint(1, 200, (1, 10))
    ref, _ = model(seq)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], dim=1)
    out, _ = model(padded, attention_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 5:], ref, atol=1e-5, rtol=0)


def test_scaled_residual_init() -> None:
    cfg = get_config("gpt2-124m", n_layer=12, vocab_size=1000, max_seq_len=64)
    model = build_model(cfg)
    std_proj = model.blocks[0].attn.proj.weight.std().item()
    std_fc = model.blocks[0].mlp.fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / (2 * 12) ** 0.5) < 0.001
    assert model.lm_head.weight is model.tok_emb.weight


def test_dropout_only_in_training() -> None:
    model = small("tiny-gpt2", dropout=0.5)
    idx = torch.randint(0, 200, (2, 8))
    a, b = model(idx)[0], model(idx)[0]
    torch.testing.assert_close(a, b)
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize("preset", TINY)
def test_tiny_model_overfits_one_batch(preset: str) -> None:
    model = small(preset).train()
    idx = torch.randint(0, 200, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = None
    for _ in range(40):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.5 and loss.item() < 0.5, (first, loss.item())


def test_flops_and_mfu() -> None:
    cfg = get_config("gpt2-124m")
    with torch.device("meta"):
        model = build_model(cfg)
    n = num_params(model, non_embedding=True) + cfg.n_embd * cfg.padded_vocab_size
    f = flops_per_token(model, 1024)
    assert f == 6 * n + 6 * 12 * 1024 * 768 * 2
    assert flops_per_token(cfg, 1024) == f
    assert mfu(1000.0, f, 1e12) == pytest.approx(1000 * f / 1e12)
