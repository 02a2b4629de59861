"""The evaluate stage's own logic (stages/evaluate.py): the built-in lm-eval tasks, metric names, bad input.
The stage on trained models is in tests/test_alignment.py. Run: .venv/bin/pytest tests/test_harness.py"""

from __future__ import annotations

import json

import pytest
from posttrain_helpers import make_model, make_tasks, make_tokenizer

from stages import evaluate
from stages.common import StageError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tasks = make_tasks(root, n_train=48, n_eval=40)
    make_model(root / "model", make_tokenizer(root / "tok", tasks))
    return root, tasks


def test_world_tasks_are_the_benign_heldout_questions_with_same_kind_distractors(world, tmp_path):
    _, tasks = world
    heldout = [json.loads(x) for x in (tasks / "heldout.jsonl").read_text().splitlines()]
    benign = [r for r in heldout if r["kind"] != "harmful"]
    evaluate.write_local_tasks(tmp_path, tasks, evaluate.Config())
    qa = [json.loads(x) for x in (tmp_path / "world_qa.jsonl").read_text().splitlines()]
    mc = [json.loads(x) for x in (tmp_path / "world_mc.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in qa] == [(r["prompt"], r["answer"]) for r in benign]
    answers_of = {k: {r["answer"] for r in benign if r["kind"] == k} for k in {r["kind"] for r in benign}}
    # questions the story does not answer share one answer: no distractors of their kind, so not multiple choice
    assert answers_of["unknown"] == {"The story does not say."}
    benign = [r for r in benign if r["kind"] != "unknown"]
    for row, src in zip(mc, benign, strict=True):
        assert row["choices"][row["label"]] == src["answer"] and len(set(row["choices"])) == len(row["choices"])
        assert set(row["choices"]) <= answers_of[src["kind"]] and 2 <= len(row["choices"]) <= 4
    assert "data_files" in (tmp_path / "world_qa.yaml").read_text()
    again = tmp_path / "again"
    evaluate.write_local_tasks(again, tasks, evaluate.Config())
    assert (again / "world_mc.jsonl").read_bytes() == (tmp_path / "world_mc.jsonl").read_bytes()  # same seed


def test_metric_names_follow_lm_eval_results():
    results = {"world_mc": {"alias": "world_mc", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 8},
               "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"}}
    assert evaluate.flatten("sft", results) == {
        "lm_eval/sft/world_mc/acc": 0.5, "lm_eval/sft/world_mc/acc_stderr": 0.1,
        "lm_eval/sft/gsm8k/exact_match/strict-match": 0.25}


def test_bad_input_names_the_setting(world, tmp_path):
    root, tasks = world
    inputs = {"base": root / "model", "sft": root / "model", "aligned": root / "model"}
    with pytest.raises(StageError, match="tasks input"):  # the world tasks need the held-out questions
        evaluate.run(evaluate.Config(tasks=["world_qa"]), inputs, tmp_path / "a")
    # with none named and no built-in task data there is nothing to run: said, not an error
    res = evaluate.run(evaluate.Config(), inputs, tmp_path / "none")
    assert res.metrics == {}
    assert "no lm-eval tasks named" in json.loads((res.outputs["results"] / "results.json").read_text())["note"]
    with pytest.raises(StageError, match="include_path"):
        evaluate.run(evaluate.Config(include_path=str(tmp_path / "nowhere")), {**inputs, "tasks": tasks}, tmp_path / "b")
    with pytest.raises(StageError, match="evaluate.tasks"):
        evaluate.run(evaluate.Config(tasks=["world_qa", "no_such_task_anywhere"], models=["base"], limit=2),
                    {**inputs, "tasks": tasks}, tmp_path / "c")
    assert not (tmp_path / "c" / evaluate.RESULTS).exists()  # nothing half-written


def test_heldout_text_bits_per_byte_agrees_with_lm_eval(world, tmp_path):
    """The canonical bits per byte (stages.posttrain.heldout_metrics) and lm-eval's on the same held-out documents, some
    longer than the model's context (256 tokens), agree within 1 %."""
    from stages import ingest
    from stages.data.readers import FilesSource

    root, _ = world
    text = tmp_path / "docs.txt"
    paragraphs = [f"Doc {i}: " + " ".join(f"the {c} kite of Mia {i}" for c in ("red", "blue") * (1 + 40 * (i % 3 == 0)))
                  for i in range(12)]
    text.write_text("\n\n".join(paragraphs) + "\n")
    corpus = ingest.run(ingest.Config(sources=[FilesSource(paths=[str(text)])], val_fraction=0.5), None,
                        tmp_path / "ingest").outputs["corpus"]
    inputs = {"base": root / "model", "corpus": corpus}
    res = evaluate.run(evaluate.Config(models=["base"], tasks=["heldout_text"]), inputs, tmp_path / "e")
    ours, theirs = res.metrics["heldout/text_bpb/base"], res.metrics["lm_eval/base/heldout_text/bits_per_byte"]
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
    assert res.metrics["heldout/text_bpb_se/base"] > 0
    assert any(len(p) > 1000 for p in evaluate.heldout_eval.val_docs(corpus, 100)), "no document spans two windows"
