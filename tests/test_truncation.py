"""One truncation policy for SFT, reward and RL data (stages/data/truncation.py): the final answer kept whole, the prompt
cut from the left, what still does not fit dropped; counted as data/truncated and data/dropped on each stage's run,
and no stage stops on an example the policy can cut. Run: .venv/bin/pytest tests/test_truncation.py"""

from __future__ import annotations

import json

import pytest
import torch
from posttrain_helpers import make_model, make_reward_model, make_tasks, make_tokenizer

from stages import ppo, reward, sft
from stages.common import ListTracker
from stages.data import truncation

LONG = " ".join(f"the {i} red kite is on the hill" for i in range(60))  # several hundred tokens: over 256


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("trunc")
    tasks = make_tasks(root, n_train=16, n_eval=4)
    tok = make_tokenizer(root / "tok", tasks)
    make_model(root / "base", tok, seed=0)  # context 256
    make_reward_model(root / "rm", root / "base", tok)
    return root, tok


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_the_policy_keeps_the_answer_cuts_the_prompt_from_the_left_and_drops_the_rest(setup):
    _, tok = setup
    long_prompt = _chat(f"{LONG} Where is the kite?", "On the hill.")
    multi = {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "Yes."},
                          {"role": "user", "content": "Where is the kite?"}, {"role": "assistant", "content": "There."}]}
    long_answer = _chat("Where?", LONG)
    fit = truncation.fit_chat(tok, [_chat("Hi", "Hello."), long_prompt, multi, long_answer], 256)
    assert (fit.truncated, fit.dropped, len(fit.kept)) == (2, 1, 3)
    cut, turns = fit.kept[1]["messages"], fit.kept[2]["messages"]
    assert cut[-1] == {"role": "assistant", "content": "On the hill."}  # the answer whole
    assert cut[0]["content"].endswith("Where is the kite?") and len(cut[0]["content"]) < len(LONG)  # cut from the left
    assert turns == multi["messages"][2:]  # whole earlier turns go first
    assert all(truncation.rendered_length(tok, r["messages"]) <= 256 for r in fit.kept)
    pairs = truncation.fit_pairs(tok, [{"prompt": [{"role": "user", "content": LONG}],
                                        "chosen": [{"role": "assistant", "content": "Yes."}],
                                        "rejected": [{"role": "assistant", "content": "No."}]}], 256)
    assert pairs.truncated == 1 and pairs.kept[0]["chosen"][0]["content"] == "Yes."
    prompts = truncation.fit_prompts(tok, [{"prompt": [{"role": "user", "content": LONG}]},
                                           {"prompt": [{"role": "user", "content": "Hi"}]}], 256, 16)
    assert (prompts.dropped, len(prompts.kept)) == (1, 1)  # an RL prompt is never cut, only dropped


def test_each_stage_counts_what_it_cut_and_runs_on_the_rest(setup, tmp_path):
    root, _ = setup
    short = [("Where is the kite?", "On the hill."), ("What colour is the ball?", "Red."), ("Who has a hat?", "Mia.")]
    # 20 SFT conversations, 3 too long; 10 preference pairs, 2 too long; 8 RL prompts, 1 too long
    convs = [_chat(f"{LONG} {q}" if i < 3 else q, a) for i, (q, a) in enumerate((short * 7)[:20])]
    pairs = [{"prompt": f"{LONG} {q}" if i < 2 else q, "chosen": a, "rejected": "I do not know."}
             for i, (q, a) in enumerate((short * 4)[:10])]
    prompts = [{"prompt": f"{LONG} {q}" if i == 0 else f"{q} ({i})"} for i, (q, _) in enumerate((short * 3)[:8])]
    held_chat = _jsonl(tmp_path / "sft_eval.jsonl", [_chat(q, a) for q, a in short])
    held_pairs = _jsonl(tmp_path / "pref_eval.jsonl", [{"prompt": q, "chosen": a, "rejected": "No."} for q, a in short])
    held_prompts = _jsonl(tmp_path / "rl_eval.jsonl", [{"prompt": q} for q, _ in short])

    res = sft.run(sft.Config(dataset=_jsonl(tmp_path / "sft.jsonl", convs), eval_dataset=held_chat, max_steps=1,
                             batch_size=4, eval_limit=2, max_new_tokens=2), {"model": root / "base"}, tmp_path / "s")
    assert (res.metrics["data/truncated"], res.metrics["data/dropped"]) == (3, 0)
    res = reward.run(reward.Config(dataset=_jsonl(tmp_path / "pref.jsonl", pairs), eval_dataset=held_pairs,
                                   max_steps=1, batch_size=4), {"model": root / "base"}, tmp_path / "r")
    assert (res.metrics["data/truncated"], res.metrics["data/dropped"]) == (2, 0)
    tracker = ListTracker()
    cfg = ppo.Config(dataset=_jsonl(tmp_path / "rl.jsonl", prompts), eval_dataset=held_prompts, total_episodes=7,
                     batch_size=7, num_mini_batches=1, num_ppo_epochs=1, response_length=4, max_new_tokens=4)
    res = ppo.run(cfg, {"policy": root / "base", "reward_model": root / "rm"}, tmp_path / "p", tracker)
    assert (res.metrics["data/truncated"], res.metrics["data/dropped"]) == (0, 1)
    assert tracker.series("train/episode")[-1] == 7, "PPO trains on the 7 prompts that fit"
    torch.manual_seed(0)
