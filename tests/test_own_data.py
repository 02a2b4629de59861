"""The pipeline on a user's own files alone (slow): no built-in source, every post-training dataset the user's, in the
shapes public datasets come in (examples/own-data: a gzip JSONL corpus beside plain text, Alpaca SFT data,
Human/Assistant transcripts as preference pairs, prompts with checkable answers). Also: files edited in place rerun
exactly the stages that read them, and bad inputs fail before any stage starts.
Run: .venv/bin/pytest tests/test_own_data.py"""

from __future__ import annotations

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
STAGES = ("ingest", "tokenizer", "pretrain", "sft", "reward", "ppo", "evaluate")

pytestmark = pytest.mark.slow


def own_config(tmp: Path, data: Path, **sections: dict[str, Any]) -> Path:
    """configs/own-data.yaml at configs/smoke.yaml's sizes, on the example files copied to `data`."""
    own = yaml.safe_load((ROOT / "configs" / "own-data.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg = {**smoke, "pipeline": {"experiment": "own", "work_dir": str(tmp / "work"), "registered_model": MODEL}}
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


@pytest.fixture
def data(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLES, tmp_path / "data", ignore=shutil.ignore_patterns("*.py"))
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
    assert not [k for k in runs["evaluate"].data.metrics if not k.startswith("system/")]
    assert "no lm-eval tasks named" in r.stdout, "the report card does not say why evaluate has no results"
    # every external file is fingerprinted into its stage's cache key, and recorded on the run
    assert {"llm.external.sources.0", "llm.external.sources.1"} <= set(runs["ingest"].data.tags)
    assert {"llm.external.dataset", "llm.external.eval_dataset"} <= set(runs["reward"].data.tags)

    # preference pairs edited in place (same name, same size): reward and what follows rerun, the rest is reused
    # (every pair about prices, so that the few smoke-size steps see some and the reward model changes)
    edit_in_place(data / "preferences.jsonl", b"euros.", b"Euros.")
    cli(tmp_path, "run", "--config", str(config))
    again = latest_pipeline(c, exp)
    reused = {s: again.data.tags[f"llm.reused.{s}"] == "true" for s in STAGES}
    assert reused == {"ingest": True, "tokenizer": True, "pretrain": True, "sft": True, "reward": False, "ppo": False,
                      "evaluate": False}, reused

    # a corpus file edited in place: ingest computes again
    edit_in_place(data / "corpus" / "kitchen-notes.txt", b"market", b"Market")
    r = cli(tmp_path, "stage", "ingest", "--config", str(config))
    assert "ran as run" in r.stdout and runs["ingest"].info.run_id not in r.stdout, r.stdout[-2000:]


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
