"""Generation: KV cache vs recompute, padding, sampling, EOS, streaming. Run: .venv/bin/pytest tests/test_generate.py"""

from __future__ import annotations

import pytest
import torch

from llm.config import get_config
from llm.generate import generate, sample_next, stream
from llm.model import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def small(preset: str, sharpen: float = 30.0, **kw) -> torch.nn.Module:
    cfg = get_config(preset, vocab_size=200, max_seq_len=64, n_layer=2, tie_embeddings=False, **kw)
    model = build_model(cfg).eval()
    with torch.no_grad():  # peakier than the 0.02 init gives, so greedy choices are never near-ties
        model.lm_head.weight.mul_(sharpen)
    return model


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2", "tiny-mla"])
def test_kv_cache_equals_recompute_and_padding_is_invisible(preset: str) -> None:
    model = small(preset, n_kv_heads=2) if preset == "tiny" else small(preset)
    cached = generate(model, PROMPTS, max_new_tokens=12)
    recomputed = generate(model, PROMPTS, max_new_tokens=12, use_cache=False)
    one_by_one = [generate(model, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert cached == recomputed == one_by_one
    assert all(len(row) == 12 for row in cached)
    assert len({tuple(r) for r in cached}) > 1  # not a degenerate constant output
    auto = generate(model, PROMPTS, max_new_tokens=12, compile="auto")  # CPU: eager fallback
    assert auto == cached


@pytest.mark.slow
def test_compiled_static_cache_on_cpu_gives_the_eager_tokens() -> None:
    """`compile=True` (static cache of max_seq_len slots + torch.compile) is also usable on CPU (see bench/generate.py)."""
    model = small("tiny", n_kv_heads=2)
    eager = generate(model, PROMPTS, max_new_tokens=12)
    compiled = generate(model, PROMPTS, max_new_tokens=12, compile=True)
    again = generate(model, PROMPTS[:1], max_new_tokens=5, compile=True)  # other batch and length: new cache shape
    assert compiled == eager
    assert again == [eager[0][:5]]


def test_greedy_matches_argmax_of_full_forward() -> None:
    model = small("tiny")
    seq = list(PROMPTS[0])
    for _ in range(5):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert generate(model, [PROMPTS[0]], max_new_tokens=5)[0] == seq[len(PROMPTS[0]):]


def test_sampling_is_seeded_and_filters_work() -> None:
    model = small("tiny", sharpen=3.0)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95)
    a = generate(model, PROMPTS, seed=1, **kw)
    assert a == generate(model, PROMPTS, seed=1, **kw)
    assert a != generate(model, PROMPTS, seed=2, **kw)
    greedy = generate(model, PROMPTS, max_new_tokens=10)
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=0.7, top_k=1, seed=3) == greedy
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=3) == greedy


def test_sample_next_top_k_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen_p = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert seen_p == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: exactly the top two survive
    seen_k = {int(sample_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert seen_k == {0, 1, 2}
    assert int(sample_next(logits)) == 0


def test_eos_stops_each_prompt_and_streaming_matches() -> None:
    model = small("tiny")
    free = generate(model, PROMPTS, max_new_tokens=10)
    eos = free[1][3]  # the 4th token of prompt 1 becomes the EOS
    assert eos not in free[1][:3]
    out = generate(model, PROMPTS, max_new_tokens=10, eos_token_id=eos)
    for row, full in zip(out, free, strict=True):
        cut = full.index(eos) if eos in full else len(full)
        assert row == full[:cut]
    assert generate(model, PROMPTS, max_new_tokens=10, eos_token_id=[eos], include_eos=True)[1] == free[1][:4]

    steps = list(stream(model, PROMPTS, max_new_tokens=10, eos_token_id=eos))
    for i, full in enumerate(free):
        got = [s[i] for s in steps]
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert got[:cut] == full[:cut] and all(t is None for t in got[cut:])


def test_context_limit_and_bad_prompts() -> None:
    model = small("tiny")  # max_seq_len 64
    with pytest.warns(UserWarning, match="max_new_tokens"):
        out = generate(model, [list(range(1, 61))], max_new_tokens=10)
    assert len(out[0]) == 4
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [list(range(64))], max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=1)
    assert model.blocks[0].attn.cache is None  # caches are released after generation


def test_cli_generate_and_export(tmp, capsys: pytest.CaptureFixture[str]) -> None:
    from llm.checkpoint import save_model
    from llm.cli import main
    from llm.hf import load_any
    from llm.tokenizer import save_dir, train_bpe

    save_dir(train_bpe(["Mia has a red kite and Tom has a green boat."] * 20, vocab_size=300, show_progress=False),
             tmp / "tok")
    model = build_model(get_config("tiny", vocab_size=300, n_layer=1))
    save_model(tmp / "ckpt", model, tokenizer_dir=tmp / "tok")
    assert main(["generate", "--model", str(tmp / "ckpt"), "--prompt", "Mia has", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Mia has") and "5 tokens" in out.err
    assert main(["export", "--model", str(tmp / "ckpt"), "--out", str(tmp / "hf")]) == 0
    assert (tmp / "hf" / "generation_config.json").is_file() and (tmp / "hf" / "tokenizer.json").is_file()
    back, cfg = load_any(tmp / "hf")  # a transformers folder loads too
    idx = torch.randint(0, 300, (1, 8))
    torch.testing.assert_close(back(idx)[0], model.eval()(idx)[0])
    assert main(["generate", "--model", str(tmp / "hf"), "--prompt", "Tom", "--chat", "--max-new-tokens", "3",
                 "--temperature", "0.8", "--seed", "1"]) == 0


def test_flag_arguments_take_the_config_spelling():
    """--compile (and the benches' --fused-loss / --loss-kernel) accept what the YAML configs accept."""
    import argparse

    import pytest

    from llm.utils import FLAG_METAVAR, parse_flag

    p = argparse.ArgumentParser()
    p.add_argument("--compile", type=parse_flag, metavar=FLAG_METAVAR, default="auto")
    assert [p.parse_args(["--compile", v]).compile for v in ("true", "False", "auto", "on", "off")] == [
        True, False, "auto", True, False]
    assert p.parse_args([]).compile == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--compile", "maybe"])
