"""End to end: `llm-pipeline run` on configs/smoke.yaml in the embedded default, checked in the MLflow store (slow). Run: .venv/bin/pytest tests/test_e2e.py"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# configs/smoke.yaml: a few steps per stage. This checks the orchestration and the store, not model quality (the
# stage tests do that).
SMOKE = ROOT / "configs" / "smoke.yaml"

# The metrics each stage's issue promises (docs/ARCHITECTURE.md, "key metrics").
EXPECTED_METRICS = {
    "ingest": {"rows", "bytes"},
    "contamination": {"contamination/heldout/items", "contamination/heldout_text/rate", "contamination/mb_per_s"},
    "tokenizer": {"vocab_size", "val/bytes_per_token"},
    "pretrain": {"train/loss", "val/loss", "val/bpb", "eval/exact_match"},
    "sft": {"eval/exact_match"},
    "reward": {"eval/pairwise_accuracy", "eval/reward_margin"},
    "ppo": {"eval/reward_mean", "eval/sft_reward_mean", "eval/kl", "eval/exact_match"},
    "evaluate": {f"lm_eval/{m}/{t}" for m in ("base", "sft", "aligned") for t in ("world_qa/exact_match", "world_mc/acc")},
}
MODEL = "smoke-assistant"
README = ROOT / "README.md"


def readme_commands(*subcommands: str) -> list[list[str]]:
    """The README's `llm-pipeline <subcommand> ...` lines (continuations joined, comments dropped), as argv lists."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    cmds = [shlex.split(line, comments=True) for line in lines]
    return [c for c in cmds if len(c) > 1 and c[0] == "llm-pipeline" and c[1] in subcommands]


def _cli(tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    args = [sys.executable, "-m", "flows.cli", "run", "--config", str(SMOKE), "--set", f"pipeline.work_dir={tmp / 'work'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    t0 = time.monotonic()
    r = subprocess.run([*args, *extra], capture_output=True, text=True, cwd=tmp, env=env, timeout=1500)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r, wall


def _store(tmp: Path) -> tuple[Any, str]:
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{tmp / 'work' / 'mlflow.db'}")
    return c, c.get_experiment_by_name("llm-pipeline-smoke").experiment_id


def _pipelines(c: Any, exp: str) -> list[Any]:
    return c.search_runs([exp], "tags.`llm.pipeline` = 'true'", order_by=["attributes.start_time ASC"])


def _hashes(c: Any, run_ids: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    for rid in run_ids:
        tags = c.get_run(rid).data.tags
        out[tags["llm.stage"]] = {k: v for k, v in tags.items() if k.startswith("llm.output.") and k.endswith(".sha256")}
    return out


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_cached_then_forced(tmp_path: Path) -> None:
    r1, _ = _cli(tmp_path)
    c, exp = _store(tmp_path)
    (parent,) = _pipelines(c, exp)
    assert parent.info.status == "FINISHED"
    children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {r.data.tags["llm.stage"]: r for r in children}
    _check_report_card(c, parent.info.run_id, by_stage, r1.stdout, tmp_path)
    assert sorted(by_stage) == sorted(EXPECTED_METRICS) and len(children) == len(EXPECTED_METRICS)
    for stage, run in by_stage.items():
        assert run.info.status == "FINISHED", stage
        missing = EXPECTED_METRICS[stage] - set(run.data.metrics)
        assert not missing, f"{stage} run lacks metrics {missing}"
        assert run.data.params, f"{stage} run has no params"
    arts = {a.path for a in c.list_artifacts(by_stage["tokenizer"].info.run_id, "tokenizer")}
    assert "tokenizer/tokenizer.json" in arts
    assert any(a.path == "hf/config.json" for a in c.list_artifacts(by_stage["ppo"].info.run_id, "hf"))
    assert by_stage["sft"].data.tags["llm.upstream.pretrain"] == by_stage["pretrain"].info.run_id
    (v1,) = c.search_model_versions(f"name='{MODEL}'")
    assert v1.run_id == v1.tags["llm.stage_run"] == by_stage["ppo"].info.run_id  # logged from the PPO run
    first = _hashes(c, [r.info.run_id for r in children])

    # nothing changed: no stage executes, everything is reused, no new model version, and it is quick
    r2, wall = _cli(tmp_path)
    p1, p2 = _pipelines(c, exp)
    assert all(p2.data.tags[f"llm.reused.{s}"] == "true" for s in EXPECTED_METRICS), r2.stdout[-2000:]
    assert {p2.data.tags[f"llm.stage_run.{s}"] for s in EXPECTED_METRICS} == {r.info.run_id for r in children}
    assert len(c.search_model_versions(f"name='{MODEL}'")) == 1
    assert "reused" in r2.stdout
    assert wall < 30, f"fully cached rerun took {wall:.1f}s (target < 30 s)"

    # one stage started alone from the pipeline run: resolves the same upstream runs, so it is a cache hit
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "LLM_PIPELINE_WORK_DIR": str(tmp_path / "work")}
    base = [sys.executable, "-m", "flows.cli"]
    r = subprocess.run([*base, "stage", "sft", "--from-run", p1.info.run_id, "--config", str(SMOKE),
                        "--set", f"pipeline.work_dir={tmp_path / 'work'}"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0 and f"reused unchanged run {by_stage['sft'].info.run_id}" in r.stdout, r.stderr[-3000:]
    # every model folder a stage wrote carries a model card that huggingface_hub reads
    from huggingface_hub import ModelCard

    for stage, role in (("pretrain", "base model"), ("sft", "assistant"), ("reward", "reward model"),
                        ("ppo", "aligned assistant")):
        path = c.download_artifacts(by_stage[stage].info.run_id, "hf/README.md", str(tmp_path / f"card-{stage}"))
        card = ModelCard.load(path)
        assert stage in card.data.tags and role in card.text and "## Intended use" in card.text, card.text[:500]
        assert "## Evaluation (held-out)" in card.text, f"{stage}'s card lists no held-out metrics"
    _check_transformers_parity(c, by_stage, tmp_path)
    # the registered model carries the promotion gate's alias, and is usable by it
    (alias,) = c.get_model_version(MODEL, "1").aliases
    assert alias in ("champion", "candidate") and f"alias      {alias}" in r2.stdout
    r = subprocess.run([*base, "generate", "--model", f"models:/{MODEL}@{alias}", "--prompt", "What is 2 + 3?", "--chat",
                        "--max-new-tokens", "4"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import mlflow

    from flows.pipeline_runner import CHAT_EXAMPLE

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")  # the registry lives there too
    try:
        local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}@{alias}", dst_path=str(tmp_path / "registered"))
    finally:
        mlflow.set_tracking_uri(before)
    (answer,) = mlflow.pyfunc.load_model(local).predict(CHAT_EXAMPLE)  # what `mlflow models serve` answers
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    _run_readme_examples(base, tmp_path, env, by_stage["pretrain"].info.run_id, by_stage["ppo"].info.run_id)

    # issue 7 item 9: executing every stage again gives byte-identical artifacts and no duplicate model version
    _cli(tmp_path, "--force")
    p3 = _pipelines(c, exp)[-1]
    assert all(p3.data.tags[f"llm.reused.{s}"] == "false" for s in EXPECTED_METRICS)
    again = _hashes(c, [p3.data.tags[f"llm.stage_run.{s}"] for s in EXPECTED_METRICS])
    assert again == first
    assert len(c.search_model_versions(f"name='{MODEL}'")) == 1


def _check_report_card(c: Any, pid: str, by_stage: dict[str, Any], stdout: str, tmp: Path) -> None:
    """The report card is on the pipeline run and printed; each of its numbers is the MLflow metric it names."""
    import json

    folder = Path(c.download_artifacts(pid, "report", str(tmp / "report")))
    card = json.loads((folder / "report.json").read_text())
    assert (folder / "report.md").is_file() and list((folder / "curves").glob("*.png"))
    assert [s["stage"] for s in card["stages"]] == list(EXPECTED_METRICS)
    for s in card["stages"]:
        run = by_stage[s["stage"]]
        assert s["run_id"] == run.info.run_id and s["wall_s"] > 0
        for k, v in [*s["metrics"].items(), *(s["throughput"] or {}).items()]:
            assert v == run.data.metrics[k], (s["stage"], k)
    models = {"base": "pretrain", "SFT": "sft", "aligned": "ppo"}
    assert {"eval/exact_match", "eval/refusal_rate/harmful"} <= set(card["models"])
    for metric, values in card["models"].items():
        assert values == {m: by_stage[st].data.metrics[metric] for m, st in models.items()}, metric
    found = by_stage["contamination"].data.metrics
    assert card["contamination"]["heldout"] == {"items": found["contamination/heldout/items"],
                                                 "rate": found["contamination/heldout/rate"]}
    evaluate = by_stage["evaluate"].data.metrics
    assert {"world_qa/exact_match", "world_mc/acc"} <= set(card["lm_eval"])
    for metric, values in card["lm_eval"].items():
        assert values == {m: evaluate[f"lm_eval/{k}/{metric}"] for m, k in (("base", "base"), ("SFT", "sft"),
                                                                           ("aligned", "aligned"))}, metric
    assert "Report card" in stdout and "aligned - SFT" in stdout and "lm-evaluation-harness" in stdout


def _output(c: Any, run: Any, name: str, tmp: Path) -> Path:
    """A stage run's output where the pipeline stored it (under the artifact root), checked against its manifest."""
    from flows.lineage import run_output
    from flows.tracking import Tracking

    tracking = Tracking(f"sqlite:///{tmp / 'work' / 'mlflow.db'}", run.info.experiment_id, "", True, c)
    return run_output(tracking, run.info.run_id, name, tmp / "reader")


def _check_transformers_parity(c: Any, by_stage: dict[str, Any], tmp: Path) -> None:
    """Plain transformers on each exported model (base, SFT, aligned) gives the greedy tokens of
    `llm-pipeline generate` (llm.cli), on a plain-text prompt and on a chat prompt, each with one BOS."""
    import contextlib
    import io

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm import cli as llm_cli

    for stage in ("pretrain", "sft", "ppo"):
        folder = _output(c, by_stage[stage], "hf", tmp)
        tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
        stops = {tok.convert_tokens_to_ids(t) for t in ("<|eos|>", "<|end|>")}  # where llm-pipeline stops
        for prompt, chat in (("Sam has a", False), ("What is 2 + 3?", True)):
            if chat:
                enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              return_dict=True, return_tensors="pt")
            else:
                enc = tok(prompt, return_tensors="pt")
            assert enc["input_ids"][0].tolist().count(tok.bos_token_id) == 1, (stage, prompt)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                rc = llm_cli.main(["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "12",
                                   "--device", "cpu", *(["--chat"] if chat else [])])
            assert rc == 0, stderr.getvalue()[-2000:]
            assert f"[{len(new)} tokens in" in stderr.getvalue(), (stage, prompt, new, stderr.getvalue()[-500:])
            shown = "" if chat else prompt
            assert stdout.getvalue() == shown + tok.decode(new) + "\n", (stage, prompt, stdout.getvalue(), new)


def _run_readme_examples(base: list[str], tmp: Path, env: dict[str, str], pretrain_run: str, ppo_run: str) -> None:
    """Every `generate` / `export` example of the README, on this smoke pipeline's runs and registered model."""
    cmds = readme_commands("generate", "export")
    assert len(cmds) >= 3, "the README lost its generate/export examples"
    for argv in cmds:
        args = [a.replace("tiny-assistant", MODEL).replace("./my-model", str(tmp / "my-model")) for a in argv[1:]]
        run_id = ppo_run if "export" in args else pretrain_run
        args = [run_id if a == "<RUN_ID>" else a for a in args]
        if "generate" in args and "--max-new-tokens" not in args:
            args += ["--max-new-tokens", "8"]
        r = subprocess.run([*base, *args], capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
        assert r.returncode == 0, f"README example {shlex.join(argv)} failed: {r.stderr[-3000:]}"
        if "generate" in args:  # a smoke model's answer may be all whitespace, or end at once: the CLI says which
            made = re.search(r"\[(\d+) tokens in", r.stderr)
            assert r.stdout and made and (int(made.group(1)) > 0 or "ended by the model" in r.stderr), \
                f"README example {shlex.join(argv)} generated nothing: {r.stderr[-500:]}"
        else:
            assert r.stdout.strip(), f"README example {shlex.join(argv)} printed nothing"
    assert (tmp / "my-model" / "config.json").is_file(), "the README's export example wrote no model folder"
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp / "my-model" / "README.md")  # the exported aligned model keeps its card
    assert card.data.pipeline_tag == "text-generation" and "aligned assistant" in card.text
