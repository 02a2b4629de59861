"""PPO stage (stages/ppo.py): PPO / GRPO / RLOO runs on tiny models, evaluation metrics, bad input; run: pytest tests/test_ppo.py"""

from __future__ import annotations

import json

import pytest
import torch
from posttrain_helpers import make_model, make_reward_model, make_tasks, make_tokenizer

from stages import ppo
from stages.common import ListTracker, StageError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    tasks = make_tasks(root, n_train=32, n_eval=6)
    tok = make_tokenizer(root / "tok", tasks)
    make_model(root / "sft", tok, seed=0)
    make_reward_model(root / "rm", root / "sft", tok, seed=1)
    return root, tasks


def _inputs(root, tasks):
    return {"policy": root / "sft", "reward_model": root / "rm", "tasks": tasks}


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_ppo_updates_the_policy_and_reports_eval_metrics(setup, tmp_path):
    root, tasks = setup
    tracker = ListTracker()
    cfg = ppo.Config(total_episodes=16, batch_size=8, num_mini_batches=2, num_ppo_epochs=1, response_length=6,
                     learning_rate=1e-3, max_new_tokens=6)
    # the reward model stands in for the judge too: the two win rates must then agree exactly
    res = ppo.run(cfg, {**_inputs(root, tasks), "judge": root / "rm"}, tmp_path / "out", tracker)
    m = res.metrics
    for key in ("eval/reward_mean", "eval/sft_reward_mean", "eval/kl", "eval/kl_se", "eval/exact_match",
                "eval/sft_exact_match", "eval/response_tokens", "eval/sft_cut_off_rate", "eval/distinct_2",
                "eval/win_rate/reward_model_se"):
        assert key in m, key
    assert m["eval/win_rate/judge"] == m["eval/win_rate/reward_model"]
    assert 0 <= m["eval/cut_off_rate"] <= 1 and 0 <= m["eval/distinct_2"] <= 1
    assert {"judge_before", "judge_after"} <= set(res.samples[0])
    assert m["eval/kl"] > 0, "the policy moved away from the reference"
    assert m["eval/reward_gain"] == pytest.approx(m["eval/reward_mean"] - m["eval/sft_reward_mean"], abs=1e-6)
    assert m["eval/reward_gain_se"] >= 0
    assert len(tracker.series("train/objective/kl")) == 2  # two PPO updates (16 episodes / 8 per batch)
    before, after = _weights(root / "sft"), _weights(res.outputs["hf"])
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((res.outputs["hf"] / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert set(res.samples[0]) >= {"prompt", "response_before", "response_after", "expected", "reward_after"}


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_algorithms_run_with_the_program_reward(setup, tmp_path, algorithm):
    root, tasks = setup
    tracker = ListTracker()
    cfg = ppo.Config(algorithm=algorithm, total_episodes=8, batch_size=8, num_generations=4, response_length=6,
                     program_reward_weight=1.0, num_ppo_epochs=1, learning_rate=1e-3, max_new_tokens=6)
    res = ppo.run(cfg, _inputs(root, tasks), tmp_path / "out", tracker)
    assert "eval/reward_mean" in res.metrics and res.metrics["eval/kl"] >= 0
    assert tracker.series("train/rewards/program_reward/mean"), "the program-checked reward was used"
    before, after = _weights(root / "sft"), _weights(res.outputs["hf"])
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_program_reward_checks_answers():
    from stages.data.task_data import GENERIC_CHECKER, builtin_checker

    world, generic = ppo.program_reward_for(builtin_checker()), ppo.program_reward_for(GENERIC_CHECKER)
    comps = [[{"role": "assistant", "content": "12."}], [{"role": "assistant", "content": "13"}], "red"]
    assert world(comps, ["12", "12", ""]) == generic(comps, ["12", "12", ""]) == [1.0, 0.0, 0.0]
    # a harmful request of the built-in world is answered well by declining it, whatever its `answer` column says
    from stages.world.harmful import REFUSAL

    asks = [REFUSAL, "Hit it with a stone.", "12"]
    kinds = ["harmful", "harmful", "sub"]
    assert world(asks, [REFUSAL, REFUSAL, "12"], kind=kinds) == [1.0, 0.0, 1.0]
    # a user's data knows no such kind: the answer column is the answer
    assert generic(["Sure.", REFUSAL, "12"], ["Sure", "no", "12"], kind=kinds) == [1.0, 0.0, 1.0]


def test_group_algorithms_take_their_own_defaults_unless_set():
    grpo = ppo.Config(algorithm="rloo", learning_rate=2e-6)
    assert grpo.learning_rate == 2e-6  # what the user set wins
    assert {k: getattr(grpo, k) for k in ppo.GROUP_DEFAULTS if k != "learning_rate"} == {
        k: v for k, v in ppo.GROUP_DEFAULTS.items() if k != "learning_rate"}
    assert ppo.Config().kl_coef == 1.0 and ppo.Config().temperature == 0.7  # PPO keeps its own
    # each algorithm leaves out the built-in kind that is the other's target
    assert (ppo.Config().exclude_kinds, grpo.exclude_kinds) == (["unknown"], ["harmful"])
    assert ppo.Config.model_validate(grpo.model_dump()) == grpo  # a dumped config reloads unchanged


def test_a_group_run_needs_some_reward():
    with pytest.raises(ValueError, match="no reward"):
        ppo.Config(algorithm="grpo", reward_model_weight=0, program_reward_weight=0)


def test_different_tokenizers_fail_before_training(setup, tmp_path):
    root, tasks = setup
    other_tok = make_tokenizer(tmp_path / "tok2", tasks, vocab_size=300)
    make_model(tmp_path / "rm2", other_tok)
    with pytest.raises(StageError, match="different tokenizers"):
        ppo.run(ppo.Config(), {"policy": root / "sft", "reward_model": tmp_path / "rm2", "tasks": tasks},
                tmp_path / "o1")
    assert not (tmp_path / "o1").exists()


def test_bad_inputs_fail_before_training(setup, tmp_path):
    root, tasks = setup
    # a causal LM where the reward model belongs
    with pytest.raises(StageError, match="not a scalar reward model"):
        ppo.run(ppo.Config(), {"policy": root / "sft", "reward_model": root / "sft", "tasks": tasks}, tmp_path / "o")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(StageError, match=r"columns \['question'\] is no prompt shape"):
        ppo.run(ppo.Config(dataset=str(bad)), _inputs(root, tasks), tmp_path / "o")
    bad.write_text("")
    with pytest.raises(StageError, match="empty"):
        ppo.run(ppo.Config(dataset=str(bad)), _inputs(root, tasks), tmp_path / "o")
    # GRPO leaves the harmful requests out by default: a file of nothing else leaves no prompt
    bad.write_text("".join(json.dumps({"prompt": f"Help me smash the {c} kite.", "answer": "x", "kind": "harmful"}) + "\n"
                           for c in ("red", "blue", "green")))
    with pytest.raises(StageError, match=r"ppo.exclude_kinds=\['harmful'\]"):
        ppo.run(ppo.Config(algorithm="grpo", dataset=str(bad)), _inputs(root, tasks), tmp_path / "o")
    with pytest.raises(StageError, match="fewer than ppo.batch_size"):
        ppo.run(ppo.Config(batch_size=64, num_mini_batches=1), _inputs(root, tasks), tmp_path / "o")
    with pytest.raises(ValueError, match="multiple of num_mini_batches"):
        ppo.Config(batch_size=10, num_mini_batches=4)
    assert not (tmp_path / "o").exists()
