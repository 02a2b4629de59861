"""The contamination stage (stages/contamination.py) on a user's data: every evaluation set the run uses against every
training text, its own cache key, and the promotion gate. Run: .venv/bin/pytest tests/test_contamination.py"""

from __future__ import annotations

import json
from pathlib import Path

from flows import external
from flows.config import load_config
from flows.promotion import judge
from flows.specs import stage_config
from stages import contamination, ingest
from stages.data.readers import FilesSource

LONG = ("Priya wants to know how long the slow train from Fernhill takes when it stops at every village on the way, "
        "waits twenty minutes in Ashby and leaves at seven o'clock on a rainy Monday morning?")


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _corpus(tmp: Path, name: str, extra: str = "") -> Path:
    text = tmp / f"{name}.txt"
    docs = [f"Note {i}: the market in town sells rice and beans by the bag every morning before the sun comes up."
            for i in range(30)]  # templated: the held-out split's notes share 13 words with the training split's
    text.write_text("\n\n".join(docs) + (f"\n\nA long page about trains and markets. {extra} The end.\n" if extra else "\n"))
    return ingest.run(ingest.Config(sources=[FilesSource(paths=[str(text)])], val_fraction=0.1), None,
                      tmp / f"ingest-{name}").outputs["corpus"]


def test_a_planted_passage_of_a_user_eval_item_is_found_named_and_gated(tmp_path):
    sft = _jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Question {i}?", "completion": "Yes."} for i in range(20)])
    held = _jsonl(tmp_path / "held.jsonl", [{"prompt": LONG, "completion": "Three hours."},
                                            {"prompt": "How far is Ashby?", "completion": "Ten miles."}])
    tasks = tmp_path / "lm-tasks"
    tasks.mkdir()
    _jsonl(tasks / "quiz.jsonl", [{"question": "What colour is the sky over Millbrook at noon?", "answer": "Blue"}])
    (tasks / "quiz.yaml").write_text("task: quiz\n")
    cfg = contamination.Config(sft={"dataset": sft, "eval_dataset": held}, include_path=str(tasks))

    clean = contamination.run(cfg, {"corpus": _corpus(tmp_path, "clean")}, tmp_path / "c1")
    assert clean.metrics["contamination/sft_eval/items"] == 0
    assert clean.metrics["contamination/lm_eval_quiz/items"] == 0 and clean.metrics["contamination/mb_per_s"] > 0
    passage = " ".join(LONG.split()[4:34])  # 30 words from the middle of the held-out item
    dirty = contamination.run(cfg, {"corpus": _corpus(tmp_path, "dirty", passage)}, tmp_path / "c2")
    report = json.loads((dirty.outputs["contamination"] / "report.json").read_text())["sets"]
    assert dirty.metrics["contamination/sft_eval/items"] == 1 and report["sft_eval"]["examples"] == [LONG]
    gates = {"eval/kl": 0.01}
    assert judge(gates, 0.02, 0.5, clean.metrics, 0.01).alias == "champion"
    verdict = judge(gates, 0.02, 0.5, dirty.metrics, 0.01)
    assert verdict.alias == "candidate" and "1 sft_eval items" in verdict.describe()
    # a copy of the task folder's quiz question in the training data is found too
    leak = _jsonl(tmp_path / "leak.jsonl", [{"prompt": "What colour is the sky over Millbrook at noon?",
                                             "completion": "Blue."}, {"prompt": "Hi", "completion": "Hello."}])
    found = contamination.run(cfg.model_copy(update={"sft": contamination.TaskRefs(dataset=leak, eval_dataset=held)}),
                              {"corpus": _corpus(tmp_path, "clean")}, tmp_path / "c3")
    assert found.metrics["contamination/lm_eval_quiz/items"] == 1


def test_the_held_out_text_is_reported_not_gated(tmp_path):
    cfg = contamination.Config()
    res = contamination.run(cfg, {"corpus": _corpus(tmp_path, "plain")}, tmp_path / "c")
    assert res.metrics["contamination/heldout_text/rate"] > 0  # templated notes overlap each other
    assert judge({"eval/kl": 0.01}, 0.02, 0.5, res.metrics, 0.0).alias == "champion"


def test_its_cache_key_follows_the_datasets_and_ingest_does_not(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "r", "completion": "b"}\n')
    (tmp_path / "doc.txt").write_text("some text\n")
    cfg = load_config(None, [f"sft.dataset={sft}", f"ingest.sources=[{{type: files, paths: ['{tmp_path}/doc.txt']}}]"])
    mirrored = stage_config(cfg, "contamination")
    assert mirrored.sft.dataset == cfg.sft.dataset and cfg.contamination.sft.dataset is None
    before = (external.fingerprints(mirrored), external.fingerprints(cfg.ingest))
    sft.write_text('{"prompt": "q", "completion": "c"}\n{"prompt": "r", "completion": "b"}\n')
    after = (external.fingerprints(stage_config(cfg, "contamination")), external.fingerprints(cfg.ingest))
    assert after[0] != before[0] and after[1] == before[1]
