"""Reward stage (stages/reward.py): trains a scalar head, evaluates held-out pairs, bad input; run: pytest tests/test_reward.py"""

from __future__ import annotations

import json

import pytest
from posttrain_helpers import make_model, make_tasks, make_tokenizer

from stages import reward
from stages.common import ListTracker, StageError
from stages.posttrain.scoring import load_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    tasks = make_tasks(root, n_train=32, n_eval=20)
    tok = make_tokenizer(root / "tok", tasks)
    make_model(root / "sft", tok)
    return root, tasks


def test_reward_model_trains_and_its_saved_scores_match_the_metrics(setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    root, tasks = setup
    tracker = ListTracker()
    cfg = reward.Config(max_steps=4, batch_size=8, logging_steps=1, learning_rate=1e-3)
    res = reward.run(cfg, {"model": root / "sft", "tasks": tasks}, tmp_path / "out", tracker)
    hf = res.outputs["hf"]
    conf = json.loads((hf / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForSequenceClassification"]
    assert conf["pad_token_id"] == load_tokenizer(hf).pad_token_id
    assert len(tracker.series("train/loss")) == 4 and tracker.series("train/accuracy")
    for key in ("eval/pairwise_accuracy", "eval/reward_margin", "eval/pairwise_accuracy_before"):
        assert key in res.metrics
    assert 0 <= res.metrics["eval/pairwise_accuracy"] <= 1
    # accuracy per pair kind, and the overall figure is their pair-weighted mean
    kinds = [json.loads(x)["kind"] for x in (tasks / "preferences_eval.jsonl").read_text().splitlines()]
    per_kind = {k: res.metrics[f"eval/pairwise_accuracy/{k}"] for k in set(kinds)}
    assert set(per_kind) == {"harmful", "benign_vs_refusal", "benign_vs_wrong"}
    weighted = sum(per_kind[k] * kinds.count(k) for k in per_kind) / len(kinds)
    assert res.metrics["eval/pairwise_accuracy"] == pytest.approx(weighted)
    row = res.samples[0]
    assert set(row) >= {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "correct"}

    # the saved folder reproduces the reported evaluation: what PPO loads is what was measured
    model = AutoModelForSequenceClassification.from_pretrained(str(hf))
    assert model.config.num_labels == 1
    from stages.data.chat_data import load_preferences

    metrics, _ = reward.pairwise_eval(model, load_tokenizer(hf, "right"),
                                      load_preferences(tasks / "preferences_eval.jsonl"), 64)
    assert metrics["eval/pairwise_accuracy"] == res.metrics["eval/pairwise_accuracy"]
    assert metrics["eval/reward_margin"] == pytest.approx(res.metrics["eval/reward_margin"], abs=1e-5)


def test_a_judge_trains_on_held_out_pairs_only_and_accuracy_comes_with_its_error(setup, tmp_path):
    root, tasks = setup
    cfg = reward.Config(max_steps=2, batch_size=8, judge_min_pairs=10)
    res = reward.run(cfg, {"model": root / "sft", "tasks": tasks}, tmp_path / "out")
    m = res.metrics
    assert (res.outputs["judge"] / "config.json").is_file() and res.outputs["judge"] != res.outputs["hf"]
    held = len((tasks / "preferences_eval.jsonl").read_text().splitlines())
    assert 0 < m["eval/judge/train_pairs"] < held and 0 <= m["eval/judge/pairwise_accuracy"] <= 1
    assert m["eval/pairwise_accuracy_se"] > 0 and "eval/reward_margin_se" in m
    assert {f"eval/pairwise_accuracy/margin_q{q}" for q in (1, 2, 3, 4)} <= set(m)
    # too few held-out pairs: no judge, and nothing claims one
    res = reward.run(reward.Config(max_steps=1, batch_size=8), {"model": root / "sft", "tasks": tasks}, tmp_path / "o2")
    assert "judge" not in res.outputs and not any(k.startswith("eval/judge/") for k in res.metrics)


def test_reward_training_separates_the_training_pairs(setup, tmp_path):
    """A few dozen steps make chosen outscore rejected on the pairs it trained on (the loss is doing its job)."""
    from transformers import AutoModelForSequenceClassification

    from stages.data.chat_data import load_preferences

    root, tasks = setup
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in load_preferences(tasks / "preferences.jsonl")[:8]))
    cfg = reward.Config(dataset=str(train), eval_dataset=str(train), max_steps=15, batch_size=8,
                        learning_rate=5e-3, warmup_ratio=0.0)
    res = reward.run(cfg, {"model": root / "sft", "tasks": tasks}, tmp_path / "out")
    model = AutoModelForSequenceClassification.from_pretrained(str(res.outputs["hf"]))
    assert res.metrics["eval/pairwise_accuracy"] >= 0.9, res.metrics
    assert res.metrics["eval/reward_margin"] > 0, res.metrics
    assert model.config.num_labels == 1


def test_bad_preference_data_fails_before_training(setup, tmp_path):
    root, tasks = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(StageError, match=r"lacks column\(s\) \['rejected'\]"):
        reward.run(reward.Config(dataset=str(bad)), {"model": root / "sft", "tasks": tasks}, tmp_path / "o1")
    empty = tmp_path / "empty.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
                             "rejected": pa.array([], pa.string())}), empty)
    with pytest.raises(StageError, match="empty"):
        reward.run(reward.Config(dataset=str(empty)), {"model": root / "sft", "tasks": tasks}, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
