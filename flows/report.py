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

from flows.report_render import render_markdown
from flows.stage_runner import TAG_DEVICE, TAG_DEVICES, StageOutcome
from flows.tracking import Tracking, call_with_retry

__all__ = ["build_report", "contamination_table", "publish_report", "render_markdown"]

log = logging.getLogger(__name__)

# (metric that counts the work, unit) and (throughput metric, unit) per stage, where the stage logs them.
WORK = {"ingest": ("rows", "documents"), "tokenizer": ("tokens/train", "tokens"), "pretrain": ("train/tokens", "tokens"),
        "sft": ("train/num_tokens", "tokens"), "reward": ("train/num_tokens", "tokens"), "ppo": ("train/episode", "episodes")}
RATE = {"tokenizer": ("encode/tokens_per_s", "tokens/s"), "pretrain": ("train/tokens_per_s", "tokens/s"),
        "sft": ("train/train_samples_per_second", "samples/s"), "reward": ("train/train_samples_per_second", "samples/s")}
QUALITY = {
    "ingest": ("rows",),
    "contamination": ("contamination/heldout/items", "contamination/mb_per_s"),
    "tokenizer": ("vocab_size", "val/bytes_per_token"),
    "pretrain": ("val/loss", "val/bpb"),
    "sft": ("eval/loss",),
    "reward": ("eval/pairwise_accuracy", "eval/pairwise_accuracy/harmful", "eval/reward_margin"),
    "ppo": ("eval/reward_gain", "eval/reward_gain_se", "eval/kl"),
}
# The built-in world's metrics the base, SFT and aligned models share (held-out, greedy): what each step changed.
SHARED = ("eval/exact_match", "eval/refusal_rate/harmful", "eval/refusal_rate/benign")
MODELS = (("base", "pretrain"), ("SFT", "sft"), ("aligned", "ppo"))
# Generic metrics of the three models, from the evaluate stage: `<metric>/<model>` and `<metric>_se/<model>`.
HELDOUT = ("heldout/text_bpb", "heldout/response_bpb")
EVAL_MODELS = (("base", "base"), ("SFT", "sft"), ("aligned", "aligned"))
REWARD_MODEL = ("eval/pairwise_accuracy", "eval/pairwise_accuracy_se", "eval/reward_margin", "eval/reward_margin_se",
                *(f"eval/pairwise_accuracy/margin_q{q}" for q in (1, 2, 3, 4)), "eval/judge/pairwise_accuracy",
                "eval/judge/pairwise_accuracy_se")
ALIGNMENT = ("eval/win_rate/reward_model", "eval/win_rate/reward_model_se", "eval/win_rate/judge",
             "eval/win_rate/judge_se", "eval/reward_gain", "eval/reward_gain_se", "eval/kl", "eval/kl_se",
             "eval/sft_response_tokens", "eval/response_tokens", "eval/sft_cut_off_rate", "eval/cut_off_rate",
             "eval/sft_distinct_2", "eval/distinct_2", "eval/sft_exact_match", "eval/exact_match")
CURVES = {"pretrain": ("train/loss", "val/loss"), "sft": ("train/loss",), "reward": ("train/loss",),
          "ppo": ("train/objective/rlhf_reward", "train/objective/kl")}


def _stage_entry(o: StageOutcome, run: Any, price: float) -> dict[str, Any]:
    m = run.data.metrics
    wall = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
    work_key, unit = WORK.get(o.stage, ("", ""))
    rate_key, rate_unit = RATE.get(o.stage, ("", ""))
    devices = int(float(run.data.tags.get(TAG_DEVICES, "1")))
    entry: dict[str, Any] = {
        "stage": o.stage, "run_id": o.run_id, "reused": o.reused, "link": o.link,
        # the device the stage ran on (the flow layer resolves `auto` where the stage runs), else its setting
        "device": run.data.tags.get(TAG_DEVICE) or run.data.params.get("device", "cpu"), "devices": devices,
        "wall_s": wall,
        "work": {work_key: m[work_key], "unit": unit} if work_key in m else None,
        "throughput": {rate_key: m[rate_key]} if rate_key in m else None, "throughput_unit": rate_unit,
        "mfu": m.get("train/mfu"), "peak_flops": m.get("train/peak_flops"),
        "cost": wall / 3600 * price * devices if wall is not None and price > 0 else None,
        "metrics": {k: m[k] for k in QUALITY.get(o.stage, ()) if k in m},
    }
    return entry


def _not_computed(by: Mapping[str, Mapping[str, float]], stages: Sequence[dict[str, Any]]) -> list[str]:
    """One line per metric a run of this kind could have had and did not, with the reason."""
    lines = []
    pretrain = next((s for s in stages if s["stage"] == "pretrain"), None)
    if pretrain is not None and pretrain["mfu"] is None:
        lines.append("MFU: no peak FLOP/s known for the pretraining device; set pretrain.peak_flops.")
    reward, ppo, evaluate = by.get("reward"), by.get("ppo"), by.get("evaluate")
    if reward is not None and "eval/judge/pairwise_accuracy" not in reward:
        lines.append("A held-out judge: not trained, too few held-out preference pairs (reward.judge_min_pairs); the "
                     "win rate is judged by the reward model PPO trained against.")
    if ppo is not None and "eval/exact_match" not in ppo and "eval/kl" in ppo:
        lines.append("Exact match: the held-out prompts have no expected answers (an `answer` column).")
    if ppo is not None and "eval/kl" not in ppo:
        lines.append("Alignment metrics: no held-out prompts.")
    if evaluate is not None:
        for metric, why in (("heldout/text_bpb", "no corpus input"), ("heldout/response_bpb", "no held-out chat set")):
            if not any(k.startswith(metric + "/") for k in evaluate):
                lines.append(f"{metric}: not computed ({why}).")
    return lines


def _corpus_counts(ingest: Mapping[str, float] | None) -> dict[str, Any]:
    """What ingest read, kept and removed, by rule (length filters, exact and near duplicates, each quality rule)."""
    if not ingest or "records_read" not in ingest:
        return {}
    removed = {k.removeprefix("dropped/"): v for k, v in ingest.items() if k.startswith("dropped/") and v}
    nbytes = {k.removeprefix("dropped_bytes/"): v for k, v in ingest.items() if k.startswith("dropped_bytes/") and v}
    return {"read": ingest["records_read"], "kept": ingest.get("rows", 0), "removed": removed, "removed_bytes": nbytes}


def build_report(tracking: Tracking, outcomes: Sequence[StageOutcome], pipeline_run_id: str,
                 model: str | None, promotion: str | None, price_per_device_hour: float = 0.0) -> dict[str, Any]:
    """The card as data: one entry per stage, what each step bought (base -> SFT -> aligned), the reward model and
    the alignment on held-out data, the truncation counts, the registered model, and what could not be computed."""
    runs = {o.stage: call_with_retry(lambda o=o: tracking.client.get_run(o.run_id), f"read run {o.run_id}", 60)
            for o in outcomes}
    stages = [_stage_entry(o, runs[o.stage], price_per_device_hour) for o in outcomes]
    by = {st: run.data.metrics for st, run in runs.items()}
    deltas = {}
    for metric in SHARED:
        values = {label: by[st][metric] for label, st in MODELS if st in by and metric in by[st]}
        if len(values) >= 2:
            deltas[metric] = values
    evaluate = by.get("evaluate", {})
    heldout = {}
    for metric in HELDOUT:
        values = {label: evaluate[f"{metric}/{m}"] for label, m in EVAL_MODELS if f"{metric}/{m}" in evaluate}
        errors = {label: evaluate[f"{metric}_se/{m}"] for label, m in EVAL_MODELS if f"{metric}_se/{m}" in evaluate}
        if values:
            heldout[metric] = {"values": values, "se": errors}
    data = {st: {k: by[st][f"data/{k}"] for k in ("truncated", "dropped") if f"data/{k}" in by[st]}
            for st in ("sft", "reward", "ppo") if st in by and "data/truncated" in by[st]}
    return {"pipeline_run_id": pipeline_run_id, "registered_model": model, "promotion": promotion,
            "corpus": _corpus_counts(by.get("ingest")),
            "price_per_device_hour": price_per_device_hour, "stages": stages, "models": deltas, "heldout": heldout,
            "reward_model": {k: by["reward"][k] for k in REWARD_MODEL if k in by.get("reward", {})},
            "alignment": {k: by["ppo"][k] for k in ALIGNMENT if k in by.get("ppo", {})}, "data": data,
            "lm_eval": _lm_eval_table(evaluate), "contamination": contamination_table(by.get("contamination", {})),
            "not_computed": _not_computed(by, stages)}


def contamination_table(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """The contamination stage's `contamination/<set>/items|rate` as {set: {"items": n, "rate": r}}."""
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
