"""The pipeline on a user's own files alone (slow): no built-in source, every post-training dataset the user's, in the
shapes public datasets come in (examples/own-data: a gzip JSONL corpus beside plain text, Alpaca SFT data,
Human/Assistant transcripts as preference pairs, prompts with checkable answers). Also: files edited in place rerun
exactly the stages that read them, and bad inputs fail before any stage starts.
Run: .venv/bin/pytest tests/test_own_data.py"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "own-data"
MODEL = "own-assistant"
STAGES = ("ingest", "contamination", "tokenizer", "pretrain", "sft", "reward", "ppo", "evaluate")

pytestmark = pytest.mark.slow


def own_config(tmp: Path, data: Path, **sections: dict[str, Any]) -> Path:
    """configs/own-data.yaml at configs/smoke.yaml's sizes, on the example files copied to `data`."""
    own = yaml.safe_load((ROOT / "configs" / "own-data.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    # gates set so that only contamination can keep the model from `champion`
    cfg = {**smoke, "pipeline": {"experiment": "own", "work_dir": str(tmp / "work"), "registered_model": MODEL,
                                 "promotion_max_kl": 1e9, "promotion_max_exact_match_drop": 1.0,
                                 "promotion_min_win_rate": 0.0}}
    cfg["ingest"] = {"sources": [{**s, "paths": [p.replace("examples/own-data", str(data)) for p in s["paths"]]}
                                 for s in own["ingest"]["sources"]]}
    for stage in ("sft", "reward", "ppo"):
        for field in ("dataset", "eval_dataset"):
            if field in own[stage]:
                cfg[stage][field] = own[stage][field].replace("examples/own-data", str(data))
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = tmp / f"config-{len(list(tmp.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(tmp: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=tmp, env=env,
                       timeout=1200)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def store(tmp: Path) -> tuple[Any, str]:
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{tmp / 'work' / 'mlflow.db'}")
    return c, c.get_experiment_by_name("own").experiment_id


def latest_pipeline(c: Any, exp: str) -> Any:
    return c.search_runs([exp], "tags.`llm.pipeline` = 'true'", order_by=["attributes.start_time DESC"])[0]


def edit_in_place(path: Path, old: bytes, new: bytes) -> None:
    """The same name and size, other content (and a later mtime), as an editor saving a fix would leave it."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert old in data, f"{old!r} not in {path}"
    path.write_bytes(data.replace(old, new))


# A held-out conversation long enough that a 30-word passage of it can leak into the pretraining text.
LONG_ITEM = ("Lena wants to bake bread for the whole family on Sunday morning, so she checks the old recipe card, walks "
             "to the market in Ashby for flour and butter, and then asks how many grams of flour twelve loaves need?")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLES, tmp_path / "data", ignore=shutil.ignore_patterns("*.py"))
    with open(tmp_path / "data" / "sft_eval.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": LONG_ITEM},
                                         {"role": "assistant", "content": "6000 grams."}]}) + "\n")
    return tmp_path / "data"


def test_the_whole_pipeline_on_user_files_alone_then_edits_rerun_what_read_them(tmp_path: Path, data: Path) -> None:
    config = own_config(tmp_path, data)
    r = cli(tmp_path, "run", "--config", str(config))
    c, exp = store(tmp_path)
    parent = latest_pipeline(c, exp)
    runs = {s: c.get_run(parent.data.tags[f"llm.stage_run.{s}"]) for s in STAGES}
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert not any(k.startswith("llm.input.tasks") for run in runs.values() for k in run.data.tags), \
        "a stage took the built-in task data"
    assert "tasks" not in runs["ingest"].data.tags["llm.outputs"].split(",")
    (version,) = c.search_model_versions(f"name='{MODEL}'")
    assert f"models:/{MODEL}/1" in r.stdout
    # the aligned policy is measured on held-out prompts of the user's data (10 % of rl_prompts.jsonl by hash)
    ppo = runs["ppo"].data.metrics
    assert {"eval/kl", "eval/reward_mean", "eval/sft_reward_mean", "eval/reward_gain"} <= set(ppo)
    assert "eval/exact_match" in ppo and "eval/refusal_rate/harmful" not in ppo  # the answers column is checked
    assert not any(k.startswith("eval/exact_match") or "refusal" in k for k in runs["sft"].data.metrics), \
        "SFT on the user's data logged the built-in world's metrics"
    # with no lm-eval task named, the evaluate stage still has its yardstick: bits per byte on held-out text
    assert {t.split("/")[2] for t in runs["evaluate"].data.metrics if t.startswith("lm_eval/")} == {"heldout_text"}
    _check_report_card(c, parent, runs, r.stdout, tmp_path)
    _check_same_corpus_as_uncompressed(c, runs["ingest"], data, tmp_path)
    # every external file is fingerprinted into its stage's cache key, and recorded on the run
    assert {"llm.external.sources.0", "llm.external.sources.1"} <= set(runs["ingest"].data.tags)
    assert {"llm.external.dataset", "llm.external.eval_dataset"} <= set(runs["reward"].data.tags)

    # preference pairs edited in place (same name, same size): reward and what follows rerun, the rest is reused
    # (every pair about prices, so that the few smoke-size steps see some and the reward model changes)
    edit_in_place(data / "preferences.jsonl", b"euros.", b"Euros.")
    cli(tmp_path, "run", "--config", str(config))
    again = latest_pipeline(c, exp)
    reused = {s: again.data.tags[f"llm.reused.{s}"] == "true" for s in STAGES}
    assert reused == {"ingest": True, "contamination": False, "tokenizer": True, "pretrain": True, "sft": True,
                      "reward": False, "ppo": False, "evaluate": False}, reused

    assert "alias      champion" in r.stdout, "the clean run must pass the gates (only contamination can fail)"

    # 30 words of a held-out item planted inside long pretraining documents: ingest and everything after it run
    # again, the contamination check finds it, the card names it, and the model is only a `candidate`
    passage = " ".join(LONG_ITEM.split()[3:33])
    notes = data / "corpus" / "kitchen-notes.txt"
    notes.write_text(notes.read_text() + "".join(f"\n\nNotes {i} from the kitchen. The market opens early. {passage} "
                                                  f"The end of note {i}.\n" for i in range(5)))
    r = cli(tmp_path, "run", "--config", str(config))
    third = latest_pipeline(c, exp)
    assert third.data.tags["llm.reused.ingest"] == "false"
    found = c.get_run(third.data.tags["llm.stage_run.contamination"]).data.metrics
    assert found["contamination/sft_eval/items"] == 1, found
    assert "sft_eval 1 items" in r.stdout and "alias      candidate: contaminated: 1 sft_eval items" in r.stdout

    # an execution-only setting (how ingest spreads its work, not what it computes) reuses, through `stage` and `run`
    r = cli(tmp_path, "stage", "ingest", "--config", str(config), "--set", "ingest.workers=2")
    assert f"reused unchanged run {third.data.tags['llm.stage_run.ingest']}" in r.stdout, r.stdout[-2000:]
    cli(tmp_path, "run", "--config", str(config), "--set", "ingest.workers=2")
    fourth = latest_pipeline(c, exp)
    assert all(fourth.data.tags[f"llm.reused.{s}"] == "true" for s in STAGES)


def _check_same_corpus_as_uncompressed(c: Any, ingest_run: Any, data: Path, tmp: Path) -> None:
    """The pipeline's corpus, read from a .jsonl.gz beside the .txt, holds the documents, in the same order, that
    ingesting the same files uncompressed gives."""
    import gzip

    from stages import ingest
    from stages.data import corpus_reader
    from stages.data.readers import FilesSource

    plain = tmp / "plain"
    plain.mkdir()
    shutil.copy(data / "corpus" / "kitchen-notes.txt", plain / "kitchen-notes.txt")
    (plain / "chat-logs.jsonl").write_bytes(gzip.decompress((data / "corpus" / "chat-logs.jsonl.gz").read_bytes()))
    sources = [FilesSource(paths=[str(plain / "*.txt")]), FilesSource(paths=[str(plain / "*.jsonl")])]
    expected = ingest.run(ingest.Config(sources=sources), None, tmp / "plain-ingest").outputs["corpus"]
    from flows.lineage import run_output
    from flows.tracking import Tracking

    tracking = Tracking(f"sqlite:///{tmp / 'work' / 'mlflow.db'}", ingest_run.info.experiment_id, "", True, c)
    got = run_output(tracking, ingest_run.info.run_id, "corpus", tmp / "reader")  # where the pipeline stored it
    for split in ("train", "val"):
        texts = [t for batch in corpus_reader.iter_texts(got, split) for t in batch]
        assert texts == [t for batch in corpus_reader.iter_texts(expected, split) for t in batch], split
        assert texts or split == "val"


def _check_report_card(c: Any, parent: Any, runs: dict[str, Any], stdout: str, tmp: Path) -> None:
    """On the user's data the card shows base -> SFT -> aligned bits per byte, the reward model, the win rate with
    its judge and standard error, KL and answer length, and no built-in world metric; each number is the MLflow
    metric it came from."""
    import json

    folder = Path(c.download_artifacts(parent.info.run_id, "report", str(tmp / "report")))
    card = json.loads((folder / "report.json").read_text())
    metrics = {s: {k: v for k, v in run.data.metrics.items()} for s, run in runs.items()}
    models = {"base": "base", "SFT": "sft", "aligned": "aligned"}
    assert set(card["heldout"]) == {"heldout/text_bpb", "heldout/response_bpb"}
    for metric, entry in card["heldout"].items():
        assert entry["values"] == {m: metrics["evaluate"][f"{metric}/{k}"] for m, k in models.items()}, metric
        assert entry["se"] == {m: metrics["evaluate"][f"{metric}_se/{k}"] for m, k in models.items()}, metric
    for model in ("base", "sft", "aligned"):
        assert f"lm_eval/{model}/heldout_text/bits_per_byte" in metrics["evaluate"]
    for key, v in card["reward_model"].items():
        assert v == metrics["reward"][key], key
    assert {"eval/pairwise_accuracy", "eval/pairwise_accuracy_se"} <= set(card["reward_model"])
    for key, v in card["alignment"].items():
        assert v == metrics["ppo"][key], key
    assert {"eval/win_rate/reward_model", "eval/win_rate/reward_model_se", "eval/kl", "eval/response_tokens",
            "eval/sft_response_tokens"} <= set(card["alignment"])
    for stage, counts in card["data"].items():
        assert counts == {k: metrics[stage][f"data/{k}"] for k in counts}, stage
    assert card["models"] == {} and "refusal" not in stdout, "a built-in world metric on the user's data"
    assert "win rate of aligned over SFT answers by the reward model" in stdout and "Bits per byte" in stdout


def test_bad_inputs_fail_before_any_stage_all_named_at_once(tmp_path: Path, data: Path) -> None:
    (data / "pairs.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (data / "empty.jsonl").write_text("")
    config = own_config(tmp_path, data,
                        sft={"dataset": str(data / "missing.jsonl"), "eval_dataset": str(data / "missing.jsonl")},
                        reward={"dataset": str(data / "pairs.jsonl")},
                        ppo={"dataset": str(data / "empty.jsonl")},
                        evaluate={"include_path": str(data / "no-tasks-here")})
    (data / "dup.jsonl").write_bytes((data / "sft.jsonl").read_bytes())
    dup = own_config(tmp_path, data, sft={"dataset": str(data / "sft.jsonl"), "eval_dataset": str(data / "dup.jsonl")})
    t0 = time.monotonic()
    r = cli(tmp_path, "run", "--config", str(config), ok=False)
    took = time.monotonic() - t0
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    for expected in ("sft.dataset", "missing.jsonl does not exist", "reward.dataset", "(has ['answer', 'question'])",
                     "ppo.dataset", "empty.jsonl is empty", "evaluate.include_path"):
        assert expected in r.stderr, f"{expected!r} not in {r.stderr[-3000:]}"
    r2 = cli(tmp_path, "run", "--config", str(dup), ok=False)
    assert r2.returncode == 2 and "sft.eval_dataset is the same data as sft.dataset" in r2.stderr, r2.stderr[-2000:]
    assert took < 30, f"the check took {took:.1f}s"
    assert not (tmp_path / "work" / "stages").exists(), "a stage output folder was made"
    if (tmp_path / "work" / "mlflow.db").exists():
        c, exp = store(tmp_path)
        assert exp is None or not c.search_runs([exp]), "an MLflow run was made"


def test_rl_prompts_that_cannot_fit_fail_right_after_the_tokenizer(tmp_path: Path, data: Path) -> None:
    long_prompts = data / "long.jsonl"
    words = " ".join(f"and then {i} more grams of rice" for i in range(150))
    long_prompts.write_text("".join(f'{{"prompt": "Add {i} {words}. How much rice?"}}\n' for i in range(40)))
    config = own_config(tmp_path, data, ppo={"dataset": str(long_prompts)})
    r = cli(tmp_path, "run", "--config", str(config), ok=False)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    assert "after the tokenizer stage, before pretraining" in r.stderr and "ppo.response_length" in r.stderr
    c, exp = store(tmp_path)
    stages = {run.data.tags.get("llm.stage") for run in c.search_runs([exp])}
    assert {"ingest", "tokenizer"} <= stages and "pretrain" not in stages, stages
