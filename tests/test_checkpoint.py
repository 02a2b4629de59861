"""Checkpoint folder round trip, atomic overwrite and clear errors. Run: .venv/bin/pytest tests/test_checkpoint.py"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm.checkpoint import load_model, save_model
from llm.config import get_config
from llm.model import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("preset, kw", [("tiny", {}), ("tiny-gpt2", dict(bias=True)),
                                        ("tiny-mla", dict(tie_embeddings=False, q_lora_rank=16))])
def test_round_trip_is_exact(tmp: Path, preset: str, kw: dict) -> None:
    cfg = get_config(preset, vocab_size=300, n_layer=2, **kw)
    model = build_model(cfg).eval()
    save_model(tmp / "ckpt", model)
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded, cfg2 = load_model(tmp / "ckpt")
    assert cfg2 == cfg
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == cfg.tie_embeddings
    idx = torch.randint(0, 300, (2, 12))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert not any(p.name.startswith(".") for p in tmp.iterdir())  # no temp folders left behind


def test_tokenizer_copied_and_overwrite_is_atomic(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tmp / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    model = build_model(get_config("tiny", vocab_size=100, n_layer=1))
    save_model(tmp / "ckpt", model, tokenizer_dir=tok)
    assert (tmp / "ckpt" / "tokenizer" / "tokenizer_config.json").is_file()
    before = (tmp / "ckpt" / "model.safetensors").read_bytes()

    # a failure half-way through a second save leaves the first checkpoint untouched and no temp folder
    import safetensors.torch

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        save_model(tmp / "ckpt", build_model(get_config("tiny", vocab_size=100, n_layer=1)))
    assert (tmp / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp.iterdir()) == ["ckpt", "tok"]


def test_clear_errors(tmp: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp)
    save_model(tmp / "ckpt", build_model(get_config("tiny", vocab_size=100, n_layer=1)))
    cfg_file = tmp / "ckpt" / "config.json"
    data = json.loads(cfg_file.read_text())
    data["model"]["n_layer"] = 2  # config no longer matches the weights
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp / "ckpt")
    data["model"]["n_heads"] = 5
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json: not a valid model config \(ModelConfig\.n_"):
        load_model(tmp / "ckpt")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        save_model(tmp / "other", build_model(get_config("tiny", vocab_size=100, n_layer=1)), tokenizer_dir=tmp)


def test_saved_bytes_are_deterministic_and_tied_alias_loads(tmp: Path) -> None:
    """Same weights -> same file bytes (artifact hashes stay stable); a file keeping the other tied name loads."""
    import safetensors.torch

    model = build_model(get_config("tiny", vocab_size=100, n_layer=1))
    save_model(tmp / "a", model)
    save_model(tmp / "b", model)
    assert (tmp / "a" / "model.safetensors").read_bytes() == (tmp / "b" / "model.safetensors").read_bytes()
    # rewrite the file with the tied tensor stored under lm_head.weight instead of tok_emb.weight
    state = safetensors.torch.load_file(str(tmp / "a" / "model.safetensors"))
    state["lm_head.weight"] = state.pop("tok_emb.weight")
    safetensors.torch.save_file(state, str(tmp / "a" / "model.safetensors"), metadata={"format": "pt"})
    loaded, _ = load_model(tmp / "a")
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)
    assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()
