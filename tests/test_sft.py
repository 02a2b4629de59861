"""SFT stage (stages/sft.py): full and LoRA runs, assistant-only loss masks, LoRA merge, bad input; run: pytest tests/test_sft.py"""

from __future__ import annotations

import json

import pytest
import torch
from posttrain_helpers import make_model, make_tasks, make_tokenizer

from stages import sft
from stages.common import ListTracker, StageError
from stages.posttrain import hf_training


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tasks = make_tasks(root, n_train=32, n_eval=8)
    tok = make_tokenizer(root / "tok", tasks)
    make_model(root / "base", tok)
    return root, tasks


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_full_sft_trains_saves_and_evaluates(setup, tmp_path):
    root, tasks = setup
    tracker = ListTracker()
    cfg = sft.Config(max_steps=3, batch_size=8, logging_steps=1, eval_limit=4, max_new_tokens=4)
    res = sft.run(cfg, {"model": root / "base", "tasks": tasks}, tmp_path / "out", tracker)

    hf = res.outputs["hf"]
    assert (hf / "config.json").exists() and (hf / "tokenizer.json").exists()
    assert "{% generation %}" in json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]
    before, after = _weights(root / "base"), _weights(hf)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no weight"
    for key in ("eval/exact_match", "eval/exact_match_before", "eval/loss", "train/loss_final"):
        assert key in res.metrics
    assert len(tracker.series("train/loss")) == 3  # one per step, through the TrainerCallback
    assert set(res.samples[0]) >= {"prompt", "response_before", "response_after", "expected", "correct"}
    assert not (tmp_path / "out" / ".trainer").exists()


def _chat_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_assistant_only_loss_masks_exactly_the_assistant_tokens(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from stages.posttrain.scoring import load_tokenizer

    root, _ = setup
    tok = load_tokenizer(root / "base", padding_side="right")
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    u1, a1, u2, a2 = ({"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"},
                      {"role": "user", "content": "And 4 plus 4?"}, {"role": "assistant", "content": "8"})
    rows = [{"messages": [u1, a1]}, {"messages": [u1, a1, u2, a2]}]
    trainer = sft.build_trainer(sft.Config(), model, tok, rows, None, tmp_path / "w", 128,
                                hf_training.precision_args("cpu", "auto"))
    for row, ex in zip(rows, trainer.train_dataset, strict=True):
        msgs = row["messages"]
        ids = _chat_ids(tok, msgs)
        assert ex["input_ids"] == ids
        expected = [-100] * len(ids)
        # an assistant turn spans from after its generation prompt to the end of that turn (<|end|><|eos|> included)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(_chat_ids(tok, msgs[:i], add_generation_prompt=True))
                end = len(_chat_ids(tok, msgs[: i + 1]))
                expected[start:end] = ids[start:end]
                assert ids[end - 1] == tok.eos_token_id
        assert ex["labels"] == expected


def test_lora_merge_gives_the_adapter_models_logits(setup):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, _ = setup
    base = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # non-zero update
    peft_model = get_peft_model(base, cfg).eval()
    ids = torch.randint(7, 300, (2, 12))
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(root / "base"))(input_ids=ids).logits
        merged = hf_training.merge_lora(peft_model)
        merged_logits = merged(input_ids=ids).logits
    assert not torch.allclose(adapter_logits, plain, atol=1e-3), "the adapter must change the output"
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-4)


def test_lora_sft_writes_a_merged_plain_model(setup, tmp_path):
    root, tasks = setup
    cfg = sft.Config(method="lora", lora=sft.LoraSettings(r=4, alpha=8), max_steps=2, batch_size=8,
                     learning_rate=1e-2, eval_limit=2, max_new_tokens=2)
    res = sft.run(cfg, {"model": root / "base", "tasks": tasks}, tmp_path / "out")
    after, before = _weights(res.outputs["hf"]), _weights(root / "base")
    assert set(after) == set(before), "merged output has exactly the base model's tensors (no lora_* keys)"
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_input_fails_before_training(setup, tmp_path):
    root, tasks = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(StageError, match=r"columns \[.answer., .question.\] is no chat \(SFT\) shape"):
        sft.run(sft.Config(dataset=str(bad)), {"model": root / "base", "tasks": tasks}, tmp_path / "o1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(StageError, match="empty"):
        sft.run(sft.Config(dataset=str(empty)), {"model": root / "base", "tasks": tasks}, tmp_path / "o2")
    with pytest.raises(StageError, match="input `model`"):
        sft.run(sft.Config(), {"model": tmp_path / "missing", "tasks": tasks}, tmp_path / "o3")
    with pytest.raises(StageError, match="exceeds the model's context"):
        sft.run(sft.Config(max_length=100000), {"model": root / "base", "tasks": tasks}, tmp_path / "o4")
    # a chat template without {% generation %} markers cannot do assistant-only loss
    plain = tmp_path / "plain"
    import shutil

    shutil.copytree(root / "base", plain)
    conf = json.loads((plain / "tokenizer_config.json").read_text())
    conf["chat_template"] = conf["chat_template"].replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (plain / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(StageError, match="generation"):
        sft.run(sft.Config(), {"model": plain, "tasks": tasks}, tmp_path / "o5")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6)), "nothing is written on bad input"


KILL_CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from stages import sft

class KillAt:
    '''kill -9 of the whole process once step {kill_at} is logged (the checkpoint of step {ckpt} is complete)'''
    def log_metrics(self, metrics, step=None):
        if step is not None and step >= {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

cfg = sft.Config(**{cfg!r})
sft.run(cfg, {{"model": Path({base!r}), "tasks": Path({tasks!r})}}, Path({out!r}), KillAt())
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_kill9_mid_sft_resumes_from_the_last_checkpoint_and_matches(setup, tmp_path, method):
    """Fault 1 (SFT): kill -9 after a Trainer checkpoint; the rerun resumes there, finishes, and ends on the weights
    an uninterrupted run reaches (full fine-tuning and LoRA)."""
    import subprocess
    import sys
    from pathlib import Path

    root, tasks = setup
    torch.set_num_threads(1)
    kw = dict(max_steps=8, batch_size=4, logging_steps=1, checkpoint_steps=2, eval_limit=2, max_new_tokens=2,
              learning_rate=1e-2, method=method)
    ref = sft.run(sft.Config(**kw), {"model": root / "base", "tasks": tasks}, tmp_path / "ref")

    out = tmp_path / "out"
    code = KILL_CHILD.format(root=str(Path(__file__).parent.parent), kill_at=5, ckpt=4, cfg=kw,
                             base=str(root / "base"), tasks=str(tasks), out=str(out))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-3000:]
    ckpts = sorted(c.name for c in (out / ".trainer").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"], ckpts
    assert not (out / "hf").exists()
    # a checkpoint cut off mid-write (no trainer_state.json yet) must be skipped and removed
    torn = out / ".trainer" / "checkpoint-6"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")

    tracker = ListTracker()
    res = sft.run(sft.Config(**kw), {"model": root / "base", "tasks": tasks}, out, tracker)
    assert res.metrics["train/resumed_from_step"] == 4
    steps = [s for s, m in tracker.history if "train/loss" in m]
    assert steps == [5, 6, 7, 8], "the resumed run trains exactly the steps after the checkpoint"
    assert not (out / ".trainer").exists()
    resumed, reference = _weights(res.outputs["hf"]), _weights(ref.outputs["hf"])
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], atol=1e-6, rtol=1e-5, msg=k)
