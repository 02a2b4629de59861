"""The report card as markdown (flows.report builds it as data): numbers in human units, every mean with its standard
error where the run measured one, and a line for each metric that could not be computed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LABELS = ("base", "SFT", "aligned")


def human(v: float | None, unit: str = "") -> str:
    """12 k documents, 0.91 M tokens/s: three significant digits and a k / M / G prefix."""
    if v is None:
        return "—"
    a = abs(v)
    text = (f"{v / 1e9:.3g} G" if a >= 1e9 else f"{v / 1e6:.3g} M" if a >= 1e5 else f"{v / 1e3:.3g} k" if a >= 1e3
            else f"{v:.3g}")
    return f"{text} {unit}".strip() if unit else text.strip()


def _num(v: float | None, fmt: str = ".4g") -> str:
    return "—" if v is None else format(v, fmt)


def _pm(values: Mapping[str, float], key: str, fmt: str = ".3f") -> str:
    """`value +- se` of a metric whose standard error is `<key>_se`."""
    if key not in values:
        return "—"
    se = values.get(f"{key}_se")
    return f"{values[key]:{fmt}}" + (f" ± {se:{fmt}}" if se is not None else "")


def _change(values: Mapping[str, float], a: str, b: str) -> str:
    return f"{values[b] - values[a]:+.3f}" if a in values and b in values else "—"


def _stage_rows(card: Mapping[str, Any]) -> list[str]:
    lines = ["| stage | run | wall s | work | throughput | MFU | device | est. cost | key metrics |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in card["stages"]:
        run = f"[{s['run_id'][:8]}]({s['link']})" if s.get("link") else f"`{s['run_id'][:8]}`"
        run += " (reused)" if s["reused"] else ""
        work = human(s["work"][next(iter(s["work"]))], s["work"]["unit"]) if s["work"] else "—"
        tp = s.get("throughput") or {}
        rate = human(next(iter(tp.values())), s.get("throughput_unit", "")) if tp else "—"
        cost = _num(s["cost"], ".4f") if s["cost"] is not None else "—"
        key = ", ".join(f"{k}={v:.4g}" for k, v in s["metrics"].items()) or "—"
        lines.append(f"| {s['stage']} | {run} | {_num(s['wall_s'], '.1f')} | {work} | {rate} | {_num(s['mfu'], '.1%')} "
                     f"| {s['device']} | {cost} | {key} |")
    return lines


def _three_models(title: str, table: Mapping[str, Mapping[str, float]], errors: Mapping[str, Any] | None = None,
                  ) -> list[str]:
    lines = ["", title, "", "| metric | base | SFT | aligned | SFT - base | aligned - SFT |", "|---|---|---|---|---|---|"]
    for metric, v in table.items():
        se = (errors or {}).get(metric, {})
        cells = [_num(v.get(m)) + (f" ± {se[m]:.3f}" if m in se else "") for m in LABELS]
        lines.append(f"| {metric} | {' | '.join(cells)} | {_change(v, 'base', 'SFT')} | {_change(v, 'SFT', 'aligned')} |")
    return lines


def _reward_and_alignment(card: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    rm = card.get("reward_model") or {}
    if rm:
        quartiles = [rm[k] for k in (f"eval/pairwise_accuracy/margin_q{q}" for q in (1, 2, 3, 4)) if k in rm]
        text = (f"Reward model on held-out pairs: accuracy {_pm(rm, 'eval/pairwise_accuracy')}, margin "
                f"{_pm(rm, 'eval/reward_margin')}")
        if len(quartiles) == 4:
            text += f"; accuracy by quartile of margin (smallest first) {', '.join(f'{q:.2f}' for q in quartiles)}"
        if "eval/judge/pairwise_accuracy" in rm:
            text += f"; the held-out judge's accuracy {_pm(rm, 'eval/judge/pairwise_accuracy')}"
        lines += ["", text + "."]
    al = card.get("alignment") or {}
    if al:
        judge = (f", by the held-out judge {_pm(al, 'eval/win_rate/judge')}" if "eval/win_rate/judge" in al else "")
        lines += ["", f"Alignment on held-out prompts: win rate of aligned over SFT answers by the reward model "
                  f"{_pm(al, 'eval/win_rate/reward_model')}{judge}; reward gain {_pm(al, 'eval/reward_gain')}; KL to "
                  f"the SFT policy {_pm(al, 'eval/kl')}.", "",
                  "| answers | SFT | aligned |", "|---|---|---|"]
        for name, key in (("length (tokens)", "response_tokens"), ("cut off by the token limit", "cut_off_rate"),
                          ("distinct-2", "distinct_2"), ("exact match (expected answers)", "exact_match")):
            if f"eval/{key}" not in al:
                continue
            lines.append(f"| {name} | {_num(al.get(f'eval/sft_{key}'), '.3g')} | {_num(al.get(f'eval/{key}'), '.3g')} |")
    return lines


def _corpus_line(c: Mapping[str, Any]) -> str:
    """Ingest's counts in one line, the rules that removed most first, with the text they removed where counted."""
    parts = []
    for rule, n in sorted(c["removed"].items(), key=lambda kv: (-kv[1], kv[0])):
        size = c.get("removed_bytes", {}).get(rule)
        parts.append(f"{rule} {n:.0f}" + (f" ({size / 1e6:.3g} MB)" if size else ""))
    removed = "; removed: " + ", ".join(parts) if parts else ""
    return f"Corpus: {c['read']:.0f} records read, {c['kept']:.0f} documents kept{removed}."


def render_markdown(card: Mapping[str, Any], curves: Sequence[str] = ()) -> str:
    lines = [f"## Report card: pipeline run `{card['pipeline_run_id']}`", ""]
    if card.get("registered_model"):
        lines += [f"Registered model `{card['registered_model']}`: {card.get('promotion') or 'no promotion gate'}.", ""]
    lines += _stage_rows(card)
    if card.get("corpus"):
        lines += ["", _corpus_line(card["corpus"])]
    if card.get("data"):
        parts = [f"{st} {v.get('truncated', 0):.0f} cut, {v.get('dropped', 0):.0f} dropped" for st, v in card["data"].items()]
        lines += ["", f"Examples longer than the context (prompt cut from the left, answer kept): {'; '.join(parts)}."]
    if card.get("contamination"):
        sets = ", ".join(f"{name} {v.get('items', 0):.0f} items ({v.get('rate', 0):.1%})"
                         for name, v in card["contamination"].items())
        lines += ["", f"Contamination (evaluation items sharing a word sequence with training text): {sets}."]
    if card.get("heldout"):
        table = {m: v["values"] for m, v in card["heldout"].items()}
        lines += _three_models("Bits per byte on held-out data (lower is better; ± standard error):", table,
                               {m: v["se"] for m, v in card["heldout"].items()})
    if card.get("models"):
        lines += _three_models("What each stage bought on the built-in world's held-out questions (greedy):",
                               card["models"])
    lines += _reward_and_alignment(card)
    if card.get("lm_eval"):
        lines += _three_models("Standard evaluation (lm-evaluation-harness, the evaluate stage):", card["lm_eval"])
    elif any(s["stage"] == "evaluate" for s in card["stages"]):
        lines += ["", "Standard evaluation: none, no lm-eval tasks named (set evaluate.tasks: lm-eval's own tasks, or "
                  "yours defined under evaluate.include_path)."]
    if card.get("not_computed"):
        lines += ["", "Not computed:", *[f"- {line}" for line in card["not_computed"]]]
    if curves:
        lines += ["", *[f"![{Path(c).stem}]({c})" for c in curves]]
    return "\n".join(lines) + "\n"
