"""The promotion gate (flows.promotion): which model version gets `champion`, and why another gets `candidate`."""

from __future__ import annotations


def test_promotion_gate_names_each_failed_gate() -> None:
    from flows.promotion import judge

    good = {"eval/exact_match": 0.725, "eval/sft_exact_match": 0.735, "eval/kl": 0.04}
    assert judge(good, 0.02, 0.5).alias == "champion" and not judge(good, 0.02, 0.5).failed
    worse = judge({**good, "eval/exact_match": 0.70}, 0.02, 0.5)
    assert worse.alias == "candidate" and "0.035 below" in worse.describe()
    drift = judge({**good, "eval/kl": 0.9}, 0.02, 0.5)
    assert drift.alias == "candidate" and "promotion_max_kl=0.5" in drift.describe()
    assert len(judge({}, 0.02, 0.5).failed) == 2
    planted = {"contamination/heldout/items": 1.0, "contamination/heldout/rate": 0.001,
               "contamination/sft_eval/items": 0.0, "contamination/sft_eval/rate": 0.0}
    assert judge(good, 0.02, 0.5, planted, 0.01).alias == "champion", "below the tolerated share"
    dirty = judge(good, 0.02, 0.5, planted, 0.0)
    assert dirty.alias == "candidate" and dirty.failed == [dirty.failed[0]] and "1 heldout items" in dirty.failed[0]


def test_the_held_out_judge_gates_on_any_data() -> None:
    from flows.promotion import judge

    generic = {"eval/kl": 0.04, "eval/win_rate/judge": 0.56, "eval/win_rate/judge_se": 0.03}
    assert judge(generic, 0.02, 0.5, min_win_rate=0.5).alias == "champion", "no exact match: not a gate on it"
    worse = judge({**generic, "eval/win_rate/judge": 0.40}, 0.02, 0.5, min_win_rate=0.5)
    assert worse.alias == "candidate" and "held-out judge prefers the SFT" in worse.describe()
    noisy = judge({**generic, "eval/win_rate/judge": 0.46}, 0.02, 0.5, min_win_rate=0.5)
    assert noisy.alias == "champion", "within two standard errors of the bar"
