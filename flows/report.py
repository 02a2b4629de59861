"""The report card of a pipeline run: what each stage cost and what it bought, from the MLflow runs themselves.

Every number comes from the stage's MLflow run (its latest metric values, its start and end times, its `device`
param), so the card agrees with MLflow by construction; `report.json` holds the same numbers for machines. Written
to the pipeline's MLflow run (`report/report.md`, `report/report.json`, `report/curves/*.png`), published as the
`report-card` Prefect artifact and printed at the end of `llm-pipeline run`."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.stage_runner import StageOutcome
from flows.tracking import Tracking, call_with_retry

log = logging.getLogger(__name__)

# (metric that counts the work, unit) and (throughput metric, unit) per stage, where the stage logs them.
WORK = {"ingest": ("rows", "documents"), "tokenizer": ("tokens/train", "tokens"), "pretrain": ("train/tokens", "tokens"),
        "sft": ("train/num_tokens", "tokens"), "reward": ("train/num_tokens", "tokens"), "ppo": ("train/episode", "episodes")}
RATE = {"tokenizer": "encode/tokens_per_s", "pretrain": "train/tokens_per_s", "sft": "train/train_samples_per_second",
        "reward": "train/train_samples_per_second"}
QUALITY = {
    "ingest": ("rows", "contamination/heldout/items"),
    "tokenizer": ("vocab_size", "val/bytes_per_token"),
    "pretrain": ("val/loss", "val/bpb"),
    "sft": ("eval/loss",),
    "reward": ("eval/pairwise_accuracy", "eval/pairwise_accuracy/harmful", "eval/reward_margin"),
    "ppo": ("eval/reward_gain", "eval/reward_gain_se", "eval/kl"),
}
# Metrics the base, SFT and aligned models share (held-out, greedy): the card shows what each step changed.
SHARED = ("eval/exact_match", "eval/refusal_rate/harmful", "eval/refusal_rate/benign")
MODELS = (("base", "pretrain"), ("SFT", "sft"), ("aligned", "ppo"))
CURVES = {"pretrain": ("train/loss", "val/loss"), "sft": ("train/loss",), "reward": ("train/loss",),
          "ppo": ("train/objective/rlhf_reward", "train/objective/kl")}


def _stage_entry(o: StageOutcome, run: Any, price: float) -> dict[str, Any]:
    m = run.data.metrics
    wall = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
    work_key, unit = WORK.get(o.stage, ("", ""))
    entry: dict[str, Any] = {
        "stage": o.stage, "run_id": o.run_id, "reused": o.reused, "link": o.link,
        "device": run.data.params.get("device", "cpu"), "wall_s": wall,
        "work": {work_key: m[work_key], "unit": unit} if work_key in m else None,
        "throughput": {RATE[o.stage]: m[RATE[o.stage]]} if o.stage in RATE and RATE[o.stage] in m else None,
        "mfu": m.get("train/mfu"),
        "cost": wall / 3600 * price if wall is not None and price > 0 else None,
        "metrics": {k: m[k] for k in QUALITY.get(o.stage, ()) if k in m},
    }
    return entry


def build_report(tracking: Tracking, outcomes: Sequence[StageOutcome], pipeline_run_id: str,
                 model: str | None, promotion: str | None, price_per_device_hour: float = 0.0) -> dict[str, Any]:
    """The card as data: one entry per stage, the base -> SFT -> aligned table, the registered model."""
    runs = {o.stage: call_with_retry(lambda o=o: tracking.client.get_run(o.run_id), f"read run {o.run_id}", 60)
            for o in outcomes}
    stages = [_stage_entry(o, runs[o.stage], price_per_device_hour) for o in outcomes]
    by = {st: run.data.metrics for st, run in runs.items()}
    deltas = {}
    for metric in SHARED:
        values = {label: by[st][metric] for label, st in MODELS if st in by and metric in by[st]}
        if len(values) >= 2:
            deltas[metric] = values
    return {"pipeline_run_id": pipeline_run_id, "registered_model": model, "promotion": promotion,
            "price_per_device_hour": price_per_device_hour, "stages": stages, "models": deltas,
            "lm_eval": _lm_eval_table(by.get("evaluate", {})), "contamination": contamination_table(by.get("ingest", {}))}


def contamination_table(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """The ingest stage's `contamination/<set>/items|rate` as {set: {"items": n, "rate": r}}."""
    table: dict[str, dict[str, float]] = {}
    for key, v in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "contamination" and parts[2] in ("items", "rate"):
            table.setdefault(parts[1], {})[parts[2]] = v
    return dict(sorted(table.items()))


def _lm_eval_table(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """The evaluate stage's `lm_eval/<model>/<task>/<metric>` as {"<task>/<metric>": {"base": v, "SFT": v, ...}}."""
    labels = {"base": "base", "sft": "SFT", "aligned": "aligned"}
    table: dict[str, dict[str, float]] = {}
    for key, v in sorted(metrics.items()):
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "lm_eval" and parts[1] in labels and not key.endswith("_stderr"):
            table.setdefault(parts[2], {})[labels[parts[1]]] = v
    return table


def _num(v: float | None, fmt: str = ".4g") -> str:
    return "—" if v is None else format(v, fmt)


def _change(values: Mapping[str, float], a: str, b: str) -> str:
    return f"{values[b] - values[a]:+.3f}" if a in values and b in values else "—"


def render_markdown(card: Mapping[str, Any], curves: Sequence[str] = ()) -> str:
    lines = [f"## Report card: pipeline run `{card['pipeline_run_id']}`", ""]
    if card.get("registered_model"):
        lines += [f"Registered model `{card['registered_model']}`: {card.get('promotion') or 'no promotion gate'}.", ""]
    lines += ["| stage | run | wall s | work | throughput | MFU | device setting | est. cost | key metrics |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in card["stages"]:
        run = f"[{s['run_id'][:8]}]({s['link']})" if s.get("link") else f"`{s['run_id'][:8]}`"
        run += " (reused)" if s["reused"] else ""
        work = f"{s['work'][next(iter(s['work']))]:.4g} {s['work']['unit']}" if s["work"] else "—"
        rate = ", ".join(f"{v:.4g} {k.rsplit('/', 1)[-1]}" for k, v in (s["throughput"] or {}).items()) or "—"
        cost = _num(s["cost"], ".4f") if s["cost"] is not None else "—"
        key = ", ".join(f"{k}={v:.4g}" for k, v in s["metrics"].items()) or "—"
        lines.append(f"| {s['stage']} | {run} | {_num(s['wall_s'], '.1f')} | {work} | {rate} | {_num(s['mfu'], '.1%')} "
                     f"| {s['device']} | {cost} | {key} |")
    if card.get("contamination"):
        sets = ", ".join(f"{name} {v.get('items', 0):.0f} items ({v.get('rate', 0):.1%})"
                         for name, v in card["contamination"].items())
        lines += ["", f"Contamination (evaluation items sharing a word sequence with training text): {sets}."]
    if card["models"]:
        lines += ["", "What each stage bought (held-out, greedy):", "",
                  "| metric | base | SFT | aligned | SFT - base | aligned - SFT |", "|---|---|---|---|---|---|"]
        for metric, v in card["models"].items():
            lines.append(f"| {metric} | {_num(v.get('base'))} | {_num(v.get('SFT'))} | {_num(v.get('aligned'))} | "
                         f"{_change(v, 'base', 'SFT')} | {_change(v, 'SFT', 'aligned')} |")
    if card.get("lm_eval"):
        lines += ["", "Standard evaluation (lm-evaluation-harness, the evaluate stage):", "",
                  "| task / metric | base | SFT | aligned | SFT - base | aligned - SFT |", "|---|---|---|---|---|---|"]
        for metric, v in card["lm_eval"].items():
            lines.append(f"| {metric} | {_num(v.get('base'))} | {_num(v.get('SFT'))} | {_num(v.get('aligned'))} | "
                         f"{_change(v, 'base', 'SFT')} | {_change(v, 'SFT', 'aligned')} |")
    elif any(s["stage"] == "evaluate" for s in card["stages"]):
        lines += ["", "Standard evaluation: none, no lm-eval tasks named (set evaluate.tasks: lm-eval's own tasks, or "
                  "yours defined under evaluate.include_path)."]
    if curves:
        lines += ["", *[f"![{Path(c).stem}]({c})" for c in curves]]
    return "\n".join(lines) + "\n"


def _plot_curves(tracking: Tracking, card: Mapping[str, Any], folder: Path) -> list[str]:
    """One PNG per stage with its training curves, from the runs' metric histories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for s in card["stages"]:
        keys = CURVES.get(s["stage"], ())
        hist = {k: tracking.client.get_metric_history(s["run_id"], k) for k in keys}
        hist = {k: h for k, h in hist.items() if len(h) > 1}
        if not hist:
            continue
        fig, axes = plt.subplots(1, len(hist), figsize=(4.5 * len(hist), 3), squeeze=False)
        for ax, (k, h) in zip(axes[0], hist.items(), strict=True):
            ax.plot([p.step for p in h], [p.value for p in h])
            ax.set_title(f"{s['stage']}: {k}")
            ax.set_xlabel("step")
        fig.tight_layout()
        name = f"curves/{s['stage']}.png"
        fig.savefig(folder / name, dpi=80)
        plt.close(fig)
        made.append(name)
    return made


def publish_report(tracking: Tracking, outcomes: Sequence[StageOutcome], pipeline_run_id: str,
                   model: str | None, promotion: str | None, price_per_device_hour: float = 0.0) -> str:
    """Build the card, log it to the pipeline run, publish it to Prefect; returns its markdown."""
    card = build_report(tracking, outcomes, pipeline_run_id, model, promotion, price_per_device_hour)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "curves").mkdir()
        curves = _plot_curves(tracking, card, folder)
        text = render_markdown(card, curves)
        (folder / "report.md").write_text(text)
        (folder / "report.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        call_with_retry(lambda: tracking.client.log_artifacts(pipeline_run_id, tmp, "report"), "upload report", 120)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(render_markdown(card), key="report-card", description="What each stage bought")
    except Exception as e:  # a view; the card is in MLflow either way
        log.debug("no Prefect report card artifact: %s", e)
    return text
