"""Tiny models, tokenizer and task files shared by the post-training tests (test_sft/reward/ppo/evaluate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def make_tasks(root: Path, n_train: int = 48, n_eval: int = 12, seed: int = 0, **spec: float) -> Path:
    """A tasks folder written by the built-in generator (the ingest stage's format), small; `spec`: other
    stages.world.corpus.TaskSpec fields."""
    from stages.world.corpus import write_tasks

    tasks = root / "tasks"
    write_tasks(tasks, seed=seed, n_sft=n_train, n_pref=n_train, n_heldout=n_eval, n_rl_prompts=n_train,
                **{"n_heldout_harmful": max(2, n_eval // 2), **spec})
    return tasks


def make_tokenizer(out: Path, tasks: Path, vocab_size: int = 320):
    """A small BPE with the project's special tokens and chat template (llm.tokenizer), loaded by transformers."""
    from transformers import AutoTokenizer

    from llm.tokenizer import save_dir, train_bpe

    texts = []
    for name in ("sft.jsonl", "heldout.jsonl", "preferences.jsonl"):
        for line in (tasks / name).read_text().splitlines():
            texts.append(json.dumps(json.loads(line)))
    save_dir(train_bpe(texts, vocab_size, show_progress=False), out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.source_dir = out  # make_model copies the tokenizer stage's files from here
    return tok


def make_model(out: Path, tok, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A tiny random LlamaForCausalLM saved with the tokenizer: stands in for the pretrain stage's `hf` output."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    for f in Path(tok.source_dir).iterdir():  # the folder layout the pretrain stage's export has
        shutil.copy2(f, out / f.name)
    return model


def make_reward_model(out: Path, policy_dir: Path, tok, seed: int = 1):
    """A reward model with a fresh scalar head on a policy's weights, saved with the tokenizer (the reward stage's
    `hf` output layout)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    rm = AutoModelForSequenceClassification.from_pretrained(str(policy_dir), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(str(out))
    for f in Path(tok.source_dir).iterdir():
        shutil.copy2(f, out / f.name)
    return rm
