"""The pretraining stage (stages/pretrain.py) on a tiny built-in corpus: outputs, metrics, reruns, config errors.

Run: .venv/bin/pytest tests/test_pretrain_stage.py -q
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydantic
import pytest
import torch

from stages import pretrain
from stages.common import ListTracker, StageError

SMALL_MODEL = {"n_layer": 1, "n_embd": 32, "n_heads": 2, "n_kv_heads": 2}


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A small corpus + tokenizer + token shards + tasks, made by the real upstream stages."""
    from stages import ingest, tokenizer

    root = tmp_path_factory.mktemp("data")
    src = ingest.BuiltinSource(n_documents=600, n_sft=20, n_pref=10, n_heldout=10, n_rl_prompts=10)
    ing = ingest.run(ingest.Config(sources=[src], val_fraction=0.1), {}, root / "ingest")
    tok = tokenizer.run(tokenizer.Config(vocab_size=300), {"corpus": ing.outputs["corpus"]}, root / "tok")
    return {**tok.outputs, "tasks": ing.outputs["tasks"]}


def small(**kw) -> pretrain.Config:
    base = dict(model_overrides=SMALL_MODEL, max_steps=6, micro_batch_size=4, seq_len=32, warmup_steps=2,
                eval_interval=3, eval_batches=2, checkpoint_interval=3, sample_prompts=["Mia has"],
                sample_max_new_tokens=4, device="cpu")
    base.update(kw)
    return pretrain.Config(**base)


def test_stage_outputs_metrics_and_rerun(data, tmp_path):
    tracker = ListTracker()
    inputs = {"tokenizer": data["tokenizer"], "tokens": data["tokens"]}
    res = pretrain.run(small(), inputs, tmp_path / "out", tracker)

    assert {"train/loss", "val/loss", "val/ppl", "val/bpb"} <= res.metrics.keys()
    assert len(tracker.series("train/loss")) == 6 and len(tracker.series("val/loss")) >= 2
    manifest = json.loads((data["tokens"] / "manifest.json").read_text())
    bpt = manifest["splits"]["val"]["bytes_per_token"]
    assert res.metrics["val/bpb"] == pytest.approx(res.metrics["val/loss"] / 0.6931471805599453 / bpt)
    assert res.samples and res.samples[0]["prompt"] == "Mia has" and isinstance(res.samples[0]["response"], str)
    assert res.plots["loss_curve"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # our checkpoint (with tokenizer) and the transformers export compute the same logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.checkpoint import load_model

    ours, mcfg = load_model(res.outputs["checkpoint"])
    from llm.tokenizer import Tokenizer

    assert mcfg.vocab_size == Tokenizer.from_dir(data["tokenizer"]).vocab_size
    assert (res.outputs["checkpoint"] / "tokenizer" / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(res.outputs["hf"]).eval()
    tok = AutoTokenizer.from_pretrained(res.outputs["hf"])
    ids = torch.tensor([tok("Mia has a red kite.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], rtol=1e-4, atol=1e-4)

    # same config, same inputs: the stage resumes from its last checkpoint and trains no step again (whether a
    # finished stage runs at all is the flow layer's decision, tests/test_flows.py)
    again = ListTracker()
    res2 = pretrain.run(small(), inputs, tmp_path / "out", again)
    assert not again.series("train/loss") and res2.metrics["train/resumed_from"] == 6

    # a longer schedule continues from the last training checkpoint rather than starting over
    res3 = pretrain.run(small(max_steps=8), inputs, tmp_path / "out", (t3 := ListTracker()))
    assert [s for s, m in t3.history if "train/loss" in m] == [7, 8]
    assert res3.metrics["train/tokens"] == 8 * 4 * 32


def test_stage_with_tasks_logs_base_exact_match(data, tmp_path):
    res = pretrain.run(small(max_steps=2, exact_match_limit=4), data, tmp_path / "out")
    assert 0.0 <= res.metrics["eval/exact_match"] <= 1.0
    assert any(r["source"] == "exact_match" and "expected" in r for r in res.samples)
    # generations and exact-match answers share one set of columns (one `response` column in the table)
    assert len({tuple(r) for r in res.samples}) == 1 and "completion" not in res.samples[0]


def test_config_errors_name_the_field(data, tmp_path):
    inputs = {"tokenizer": data["tokenizer"], "tokens": data["tokens"]}
    with pytest.raises(StageError, match=r"pretrain\.seq_len=512 exceeds the model's context"):
        pretrain.run(small(seq_len=512, model_overrides={**SMALL_MODEL, "max_seq_len": 64}), inputs, tmp_path)
    with pytest.raises(StageError, match=r"model_overrides\.vocab_size"):
        pretrain.run(small(model_overrides={"vocab_size": 50}), inputs, tmp_path)
    with pytest.raises(StageError, match=r"n_embd"):
        pretrain.run(small(model_overrides={"n_embd": 30, "n_heads": 4}), inputs, tmp_path)
    with pytest.raises(StageError, match=r"pretrain\.model: unknown preset"):
        pretrain.run(small(model="huge"), inputs, tmp_path)
    with pytest.raises(StageError, match=r"tokens_per_step"):
        pretrain.run(small(tokens_per_step=100), inputs, tmp_path)
    with pytest.raises(StageError, match=r"pretrain\.loss_kernel is on .* set loss_kernel to 'auto' or 'off'"):
        pretrain.run(small(fused_loss=True, loss_kernel=True), inputs, tmp_path)  # CPU: the kernel cannot run
    with pytest.raises(pydantic.ValidationError, match="lr"):
        small(lr=-1.0)
    with pytest.raises(pydantic.ValidationError, match="n_layers"):
        pretrain.Config(n_layers=3)
    with pytest.raises(StageError, match="tokens"):
        pretrain.run(small(), {"tokenizer": data["tokenizer"]}, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written by any of the failures


def test_resume_with_changed_model_or_tokenizer_fails_fast(data, tmp_path):
    inputs = {"tokenizer": data["tokenizer"], "tokens": data["tokens"]}
    out = tmp_path / "out"
    pretrain.run(small(max_steps=3, checkpoint_interval=3), inputs, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    t0 = time.perf_counter()
    with pytest.raises(StageError, match=r"model\.n_layer: 1 -> 2"):
        pretrain.run(small(max_steps=6, model_overrides={**SMALL_MODEL, "n_layer": 2}), inputs, out)
    # a different tokenizer folder (same vocabulary, other merges): caught by the tokenizer hash
    other_tok = tmp_path / "tok2"
    other_tok.mkdir()
    for f in data["tokenizer"].iterdir():
        (other_tok / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((data["tokens"] / "manifest.json").read_text())
    tokens2 = tmp_path / "tokens2"
    tokens2.mkdir()
    for f in data["tokens"].iterdir():
        (tokens2 / f.name).write_bytes(f.read_bytes())
    manifest["tokenizer_sha256"] = "0" * 64
    (tokens2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match=r"fingerprint\.(tokenizer|data)"):
        pretrain.run(small(max_steps=6), {"tokenizer": other_tok, "tokens": tokens2}, out)
    assert time.perf_counter() - t0 < 10
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_command_line_entry_point(data, tmp_path):
    """`python -m stages.pretrain` (what torchrun launches on GPU workers): trains, prints metrics, names bad keys."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "stages.pretrain", "--tokenizer", str(data["tokenizer"]), "--tokens",
            str(data["tokens"]), "--out", str(tmp_path / "out")]
    sets = ["--set", "model_overrides={n_layer: 1, n_embd: 32, n_heads: 2, n_kv_heads: 2}", "--set", "max_steps=2",
            "--set", "micro_batch_size=2", "--set", "seq_len=32", "--set", "eval_batches=1",
            "--set", "device=cpu", "--set", "sample_prompts=[]"]
    p = subprocess.run(base + sets, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["metrics"]["train/tokens"] == 2 * 2 * 32 and Path(out["outputs"]["hf"]).is_dir()
    bad = subprocess.run(base + ["--set", "max_stepz=3"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "max_stepz" in bad.stderr and "Traceback" not in bad.stderr
