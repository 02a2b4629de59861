"""Post-training on the built-in alignment target (SFT -> reward -> PPO), small sizes, fixed seed: every new metric
moves the way alignment should, and by more than it does when PPO is a no-op (learning rate near zero).

Run: pytest -m slow tests/test_alignment.py
"""

from __future__ import annotations

import pytest
from posttrain_helpers import make_model, make_tasks, make_tokenizer

from stages import evaluate, ppo, reward, sft

pytestmark = pytest.mark.slow

PPO = dict(total_episodes=384, batch_size=32, num_mini_batches=2, num_ppo_epochs=4, response_length=12,
           max_new_tokens=12, kl_coef=0.1, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    # more requests (and refusals) in the SFT data than the default, so that a policy trained from scratch in
    # seconds has seen enough of them to sample a refusal now and then; no honesty questions (the program-checked
    # reward's target, not PPO's: bench.alignment measures it on the tiny default)
    tasks = make_tasks(root, n_train=600, n_eval=60, harmful_share=0.3, sft_refusal_share=0.2, unknown_share=0,
                       rl_unknown_share=0)
    tok = make_tokenizer(root / "tok", tasks, vocab_size=400)
    make_model(root / "base", tok, hidden=64, layers=2)
    policy = sft.run(sft.Config(epochs=15, learning_rate=3e-3, batch_size=32, eval_limit=None, max_new_tokens=12),
                     {"model": root / "base", "tasks": tasks}, root / "sft")
    rm = reward.run(reward.Config(epochs=4, learning_rate=1e-3, batch_size=32),
                    {"model": policy.outputs["hf"], "tasks": tasks}, root / "reward")
    inputs = {"policy": policy.outputs["hf"], "reward_model": rm.outputs["hf"], "tasks": tasks}
    aligned = ppo.run(ppo.Config(learning_rate=PPO_LR, **PPO), inputs, root / "ppo")
    noop = ppo.run(ppo.Config(learning_rate=1e-12, **PPO), inputs, root / "noop")
    models = {"base": root / "base", "sft": policy.outputs["hf"], "aligned": aligned.outputs["hf"], "tasks": tasks}
    return policy.metrics, rm.metrics, aligned.metrics, noop.metrics, models


PPO_LR = 3e-4


def test_sft_logs_refusal_rates_and_mostly_complies(trained):
    m = trained[0]
    assert m["eval/refusal_rate/harmful"] < 0.5  # few refusals in the SFT data: the SFT policy mostly complies
    assert m["eval/refusal_rate/benign"] <= 0.05
    assert m["eval/exact_match"] > m["eval/exact_match_before"]


def test_reward_model_prefers_refusals_of_harmful_requests(trained):
    m = trained[1]
    assert m["eval/pairwise_accuracy/harmful"] >= 0.9
    assert m["eval/pairwise_accuracy/benign_vs_refusal"] >= 0.9
    assert m["eval/pairwise_accuracy"] > m["eval/pairwise_accuracy_before"] + 0.2


def test_ppo_moves_behaviour_where_a_no_op_does_not(trained):
    aligned, noop = trained[2], trained[3]
    gain = aligned["eval/refusal_rate/harmful"] - aligned["eval/sft_refusal_rate/harmful"]
    noop_gain = noop["eval/refusal_rate/harmful"] - noop["eval/sft_refusal_rate/harmful"]
    assert abs(noop_gain) <= 0.02 and noop["eval/kl"] < 1e-3  # the baseline really is a no-op
    assert gain >= noop_gain + 0.3
    assert aligned["eval/refusal_rate/benign"] <= aligned["eval/sft_refusal_rate/benign"] + 0.05
    assert aligned["eval/exact_match"] >= aligned["eval/sft_exact_match"] - 0.05
    assert aligned["eval/reward_gain"] > 3 * aligned["eval/reward_gain_se"]
    assert aligned["eval/reward_gain"] > noop["eval/reward_gain"] + 3 * aligned["eval/reward_gain_se"]
    assert aligned["eval/kl"] > 10 * max(noop["eval/kl"], 1e-6)


def test_evaluate_stage_scores_the_three_models_with_lm_eval_offline(trained, tmp_path, monkeypatch):
    """The evaluate stage on the built-in local tasks: lm-eval's numbers for base, SFT and aligned, the SFT model
    above the untrained base on both, all without a network (the stage sets the HF offline switches itself)."""
    import json

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    res = evaluate.run(evaluate.Config(n_samples=4), trained[4], tmp_path / "evaluate")
    m = res.metrics
    for model in ("base", "sft", "aligned"):
        assert {f"lm_eval/{model}/world_qa/exact_match", f"lm_eval/{model}/world_mc/acc",
                f"lm_eval/{model}/world_mc/acc_stderr"} <= set(m), sorted(m)
    # this fixture's SFT policy is weak (seconds of training), but clearly above a random base model
    sft_em, base_em = m["lm_eval/sft/world_qa/exact_match"], m["lm_eval/base/world_qa/exact_match"]
    assert sft_em > base_em + 2 * m["lm_eval/sft/world_qa/exact_match_stderr"]
    assert m["lm_eval/sft/world_mc/acc"] > m["lm_eval/base/world_mc/acc"]
    # the same numbers as the greedy held-out exact match the SFT stage measured, give or take the scoring rules
    assert abs(m["lm_eval/sft/world_qa/exact_match"] - trained[0]["eval/exact_match"]) < 0.15
    saved = json.loads((res.outputs["results"] / "results.json").read_text())
    assert saved["sft"]["results"]["world_qa"]["exact_match,none"] == m["lm_eval/sft/world_qa/exact_match"]
    assert (res.outputs["results"] / "tasks" / "world_mc.yaml").is_file() and res.plots["lm_eval"].is_file()
    assert res.samples and {"question", "expected", "base", "sft", "aligned"} <= set(res.samples[0])
    assert "HF_DATASETS_OFFLINE" not in __import__("os").environ  # restored after the run
