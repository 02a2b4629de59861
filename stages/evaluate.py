"""Evaluate stage: the base, SFT and aligned models on EleutherAI's lm-evaluation-harness (`lm-eval`).

inputs:  base (the pretrain stage's hf folder), sft (the SFT stage's), aligned (the PPO stage's),
         tasks (built-in task folder; needed only by the built-in world tasks)
outputs: results (results.json: every task's lm-eval numbers per model, and tasks/: the local task definitions
         and data the run used)
metrics: lm_eval/<model>/<task>/<metric> (model: base, sft, aligned), e.g. lm_eval/sft/world_qa/exact_match,
         and <metric>_stderr beside each where lm-eval reports one.

Built-in local tasks (no download; written from the held-out questions of the tasks input, which the ingest
stage's contamination check covers):
  world_qa  generation: answer a held-out question about the built-in world; exact match (case and punctuation
            ignored), the first line of the answer.
  world_mc  multiple choice: the right answer among up to three wrong answers of the same kind (kinds with one
            answer for all, such as "The story does not say.", are left out); accuracy.
Any other name is an lm-eval task: a YAML definition under `include_path`, or one of lm-eval's own (hellaswag,
arc_easy, ...; those download their data from the Hugging Face hub).

The three models are scored the same way (the same prompts, rendered with each model's chat template when
`chat_template` is on), so the numbers compare base -> SFT -> aligned like for like.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llm.files import atomic_dir, write_json
from stages.common import NullTracker, StageError, StageResult, Tracker, require_path, stage_device
from stages.posttrain import heldout_eval

log = logging.getLogger("stages.evaluate")

MODELS = ("base", "sft", "aligned")  # input names, and the <model> part of the metric names
LOCAL_TASKS = ("world_qa", "world_mc")
RESULTS = "results"

# Both built-in tasks ask the held-out question as the user's turn and read the answer right after the
# assistant tag: no space before the answer, as in the SFT data.
_QA_YAML = """task: world_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n", "<|end|>"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""
_MC_YAML = """task: world_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


class Config(BaseModel):
    """Standard benchmark evaluation of the base, SFT and aligned models with lm-evaluation-harness."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] | None = Field(
        None,
        description="lm-eval task names: heldout_text (bits per byte on the corpus's held-out split), the built-in "
        "world_qa / world_mc (offline), tasks defined in include_path, or lm-eval's own (hellaswag, arc_easy, ...; "
        "downloaded from the hub). Empty = heldout_text, plus world_qa and world_mc when the built-in task data is "
        "in use.")
    heldout_docs: int = Field(200, ge=0, description="Documents of the corpus's held-out split scored for bits per "
                              "byte (heldout/text_bpb and the heldout_text task); 0 = off.")
    heldout_chats: int = Field(200, ge=0, description="Held-out SFT conversations whose answers are scored for bits "
                               "per byte (heldout/response_bpb); 0 = off.")
    models: list[Literal["base", "sft", "aligned"]] = Field(
        list(MODELS), min_length=1, description="Which of the pipeline's models to evaluate.")
    include_path: str | None = Field(
        None, description="A folder of extra lm-eval task definitions (YAML), for tasks of your own.",
        json_schema_extra={"external": True})
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many items per task; empty = all.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt; empty = each task's "
                                    "default (0 for the built-in tasks).")
    chat_template: bool = Field(
        True, description="Render prompts with the model's chat template (all three models alike). Turn off for "
        "hub tasks scored the classic way (plain text continuation).")
    batch_size: int = Field(32, ge=1, description="Requests per forward pass.")
    max_gen_toks: int = Field(24, ge=1, description="Longest answer generated for world_qa.")
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu' or 'cuda[:N]'.")
    seed: int = Field(0, description="Seed of lm-eval's sampling of few-shot examples and of the distractors.")
    n_samples: int = Field(8, ge=0, description="Rows in the sample table (a generation task's answers by model).")


def _world_rows(tasks_dir: Path, seed: int) -> tuple[list[dict], list[dict]]:
    """(world_qa rows, world_mc rows) from the benign held-out questions."""
    path = require_path(tasks_dir / "heldout.jsonl", "the tasks input's heldout.jsonl (from the ingest stage)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind") != "harmful" and r.get("answer")]
    if not rows:
        raise StageError(f"{path} holds no benign questions with answers; the built-in world tasks need them "
                         "(or set evaluate.tasks to other lm-eval tasks).")
    answers: dict[str, set[str]] = {}
    for r in rows:
        answers.setdefault(r.get("kind", ""), set()).add(r["answer"])
    qa, mc = [], []
    for i, r in enumerate(rows):
        qa.append({"question": r["prompt"], "answer": r["answer"], "kind": r.get("kind", "")})
        if len(answers[r.get("kind", "")]) < 2:  # one answer for the whole kind ("The story does not say."):
            continue  # no distractors of its own kind
        rng = random.Random(seed * 1_000_003 + i)  # the same distractors on every run of one seed
        wrong = sorted(answers[r.get("kind", "")] - {r["answer"]})
        rng.shuffle(wrong)
        choices = [r["answer"], *wrong[:3]]
        rng.shuffle(choices)
        mc.append({"question": r["prompt"], "choices": choices, "label": choices.index(r["answer"]),
                   "kind": r.get("kind", "")})
    return qa, mc


def task_names(cfg: Config, tasks_dir: Path | None, heldout_text: bool = False) -> list[str]:
    """The lm-eval tasks to run: the configured ones, or the built-in world's when its task data is in use, and
    `heldout_text` (bits per byte on the corpus's held-out split) whenever there is a corpus."""
    if cfg.tasks is not None:
        return list(cfg.tasks)
    return [*(LOCAL_TASKS if tasks_dir is not None else ()), *((heldout_eval.TASK,) if heldout_text else ())]


def write_local_tasks(folder: Path, tasks_dir: Path | None, cfg: Config, relative: bool = False) -> None:
    """The built-in world tasks that `cfg.tasks` names, as lm-eval YAML plus JSONL data under `folder`; with
    `relative`, the YAML names its data file relative to the folder (a portable record: run lm-eval from there)."""
    wanted = [t for t in LOCAL_TASKS if t in task_names(cfg, tasks_dir)]
    if not wanted:
        return
    if tasks_dir is None:
        raise StageError(f"evaluate.tasks names {', '.join(wanted)}, built from the held-out questions of the "
                         "tasks input, but there is none; run the ingest stage with the built-in source or drop "
                         "them from evaluate.tasks.")
    qa, mc = _world_rows(tasks_dir, cfg.seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows, template in (("world_qa", qa, _QA_YAML), ("world_mc", mc, _MC_YAML)):
        if name in wanted:
            data = folder / f"{name}.jsonl"
            data.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
            (folder / f"{name}.yaml").write_text(
                template.format(data=json.dumps(data.name if relative else str(data.resolve())),
                                max_gen_toks=cfg.max_gen_toks))


@contextmanager
def _offline(on: bool) -> Iterator[None]:
    """With only local tasks nothing may reach the network: the stage then runs the same without one."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    if on:
        os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metric_name(key: str) -> str | None:
    """lm-eval's "acc,none" -> "acc"; "exact_match,strict-match" -> "exact_match/strict-match"; else None."""
    if "," not in key:
        return None
    metric, _, filt = key.partition(",")
    name = metric if filt in ("", "none") else f"{metric}/{filt}"
    return re.sub(r"[^A-Za-z0-9_./ -]", "_", name)


def flatten(model: str, results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's results block -> {"lm_eval/<model>/<task>/<metric>": value} (numbers only, N/A left out)."""
    out: dict[str, float] = {}
    for task, values in results.items():
        for key, v in values.items():
            name = _metric_name(key)
            if name is not None and isinstance(v, int | float) and not isinstance(v, bool) and v == v:
                out[f"lm_eval/{model}/{task}/{name}"] = float(v)
    return out


def _evaluate(model_dir: Path, cfg: Config, tasks: list[str], task_manager: Any, device: str) -> dict[str, Any]:
    """lm-eval on one model; `heldout_text` runs alone, as plain text scored from one BOS token (no chat template,
    none of the tokenizer's own special tokens), as stages.posttrain.heldout_metrics scores it, so the two figures compare."""
    from lm_eval import simple_evaluate

    plain = tasks == [heldout_eval.TASK]
    dtype = "float32" if device == "cpu" else "auto"
    model_args: dict[str, Any] = {"pretrained": str(model_dir), "dtype": dtype}
    if plain:
        model_args["add_bos_token"] = False
    try:
        out = simple_evaluate(
            model="hf", model_args=model_args, device=device,
            tasks=tasks, task_manager=task_manager, batch_size=cfg.batch_size, limit=cfg.limit,
            num_fewshot=cfg.num_fewshot, apply_chat_template=cfg.chat_template and not plain,
            log_samples=cfg.n_samples > 0,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed)
    except (KeyError, ValueError) as e:
        if "not found" in str(e).lower() or "task" in str(e).lower():
            raise StageError(f"evaluate.tasks {tasks}: {e}. Use the built-in {', '.join(LOCAL_TASKS)}, a task "
                             "defined under evaluate.include_path, or an lm-eval task name (`lm-eval ls tasks`).") from e
        raise
    if out is None:
        raise StageError("lm-eval returned no results (it evaluates on the main process only)")
    return out


def _sample_rows(samples: dict[str, dict[str, list[dict]]], n: int) -> list[dict[str, Any]]:
    """Per question of the first generation task: the expected answer and each model's answer."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for model, by_task in samples.items():
        for task, items in by_task.items():
            for s in items[:n]:
                resp = (s.get("filtered_resps") or [None])[0]
                if not isinstance(resp, str):  # multiple choice: log-likelihoods, not text
                    continue
                row = rows.setdefault((task, int(s.get("doc_id", 0))), {
                    "task": task, "question": str(s.get("doc", {}).get("question", ""))[:200],
                    "expected": str(s.get("target", ""))})
                row[model] = resp
    first = next(iter(sorted({t for t, _ in rows})), None)
    return [r for (t, _), r in sorted(rows.items()) if t == first][:n]


def _plot(metrics: dict[str, float], models: list[str], path: Path) -> Path | None:
    """Grouped bars: one group per task metric, one bar per model."""
    names = sorted({k.split("/", 2)[2] for k in metrics if not k.endswith("_stderr")})
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names)), 3.6))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        ys = [metrics.get(f"lm_eval/{model}/{n}", 0.0) for n in names]
        errs = [metrics.get(f"lm_eval/{model}/{n}_stderr", 0.0) for n in names]
        ax.bar([j + i * width for j in range(len(names))], ys, width, yerr=errs, label=model, capsize=2)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(names))], names, rotation=15)
    ax.set_ylabel("score")
    ax.set_title("lm-eval: base -> SFT -> aligned")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


NO_TASKS = ("no lm-eval tasks named: set evaluate.tasks (tasks defined under evaluate.include_path, or lm-eval's "
            "own) to score the base, SFT and aligned models")


def _nothing_to_run(out_dir: Path) -> StageResult:
    """A run with no task to evaluate: said in one line and in results.json (the report card shows it)."""
    log.warning("evaluate: %s", NO_TASKS)
    with atomic_dir(out_dir / RESULTS) as tmp:
        write_json(tmp / "results.json", {"tasks": [], "note": NO_TASKS})
    return StageResult(outputs={RESULTS: out_dir / RESULTS}, metrics={})


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    from lm_eval.tasks import TaskManager

    models = {m: require_path(inputs.get(m, ""), f"input `{m}` (a transformers-native model folder)")
              for m in cfg.models}
    tasks_dir = Path(inputs["tasks"]) if inputs.get("tasks") else None
    corpus, chat_dir = inputs.get("corpus"), inputs.get("chat_heldout")
    include = Path(cfg.include_path).expanduser() if cfg.include_path else None
    if include is not None and not include.is_dir():
        raise StageError(f"evaluate.include_path: {include} is not a folder of lm-eval task YAML files.")
    out_dir = Path(out_dir)
    plot_path = out_dir / "lm_eval.png"

    docs = heldout_eval.val_docs(Path(corpus), cfg.heldout_docs) if corpus and cfg.heldout_docs else []
    chats = heldout_eval.read_chats(chat_dir, cfg.heldout_chats)
    tasks = task_names(cfg, tasks_dir, bool(docs))
    if not tasks and not docs and not chats:
        return _nothing_to_run(out_dir)
    device = stage_device(cfg.device, "evaluate.device")
    t0 = time.monotonic()
    metrics: dict[str, float] = heldout_eval.canonical(models, docs, chats, device)
    metrics["time/heldout_bpb_s"] = time.monotonic() - t0
    tracker.log_metrics(metrics)
    report: dict[str, Any] = {"tasks": tasks, "limit": cfg.limit, "chat_template": cfg.chat_template,
                              "heldout": {k: v for k, v in metrics.items() if k.startswith("heldout/")}}
    samples: dict[str, Any] = {}
    with atomic_dir(out_dir / RESULTS) as tmp, tempfile.TemporaryDirectory() as runtime:
        write_local_tasks(tmp / "tasks", tasks_dir, cfg, relative=True)  # no machine paths: reruns are identical
        write_local_tasks(Path(runtime), tasks_dir, cfg)
        if heldout_eval.TASK in tasks:
            heldout_eval.write_task(tmp / "tasks", docs, relative=True)
            heldout_eval.write_task(Path(runtime), docs)
        paths = [str(p) for p in (Path(runtime), include) if p is not None and p.is_dir()]
        manager = TaskManager(include_path=paths or None)
        own = (*LOCAL_TASKS, heldout_eval.TASK)
        only_local = all(t in own or (include and any(include.rglob(f"{t}.y*ml"))) for t in tasks)
        groups = [g for g in ([t for t in tasks if t != heldout_eval.TASK], [heldout_eval.TASK] if heldout_eval.TASK
                              in tasks else []) if g]
        with _offline(only_local):
            for model, folder in models.items():
                for group in groups:
                    log.info("lm-eval on the %s model (%s): %s", model, folder, ", ".join(group))
                    t0 = time.monotonic()
                    out = _evaluate(folder, cfg, group, manager, device.type if device.index is None else str(device))
                    if group == [heldout_eval.TASK]:  # what the yardstick costs (bench/README.md)
                        metrics["time/heldout_text_s"] = metrics.get("time/heldout_text_s", 0.0) + time.monotonic() - t0
                    scores = flatten(model, out["results"])
                    tracker.log_metrics(scores)
                    metrics |= scores
                    entry = report.setdefault(model, {"results": {}, "versions": {}})
                    entry["results"].update(out["results"])
                    entry["versions"].update(out.get("versions", {}))
                    samples.setdefault(model, {}).update(out.get("samples", {}))
        write_json(tmp / "results.json", report)
    lm_eval = {k: v for k, v in metrics.items() if k.startswith("lm_eval/")}
    plots = {"lm_eval": p} if (p := _plot(lm_eval, list(cfg.models), plot_path)) else {}
    return StageResult(outputs={RESULTS: out_dir / RESULTS}, metrics=metrics,
                       samples=_sample_rows(samples, cfg.n_samples), plots=plots)
