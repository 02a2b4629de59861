"""What each post-training stage adds, over several seeds of the whole tiny pipeline: base -> SFT -> PPO.

    .venv/bin/python -m bench.alignment [--seeds 0 1 2] [--config configs/tiny.yaml] [--set section.key=value ...]
                                        [--grpo] [--json] [--root DIR]

Seed S changes every seed of the pipeline: the built-in data (the builtin source's seed S), pretraining
(1337 + S, so seed 0 is exactly `make demo`), SFT, reward and PPO (S). Stages run directly (no Prefect, no MLflow)
in a folder per seed; `--root` reuses an earlier run's, so that changing only the last stage's settings reruns only
that stage. `--grpo` also reruns the RL stage per seed with GRPO and the program-checked reward (GRPO_SET below).
Prints one markdown row per seed and a mean +- standard deviation row; `--json` adds every metric as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.pipeline import ROOT, run_stages

GRPO_SET = ["ppo.algorithm=grpo", "ppo.program_reward_weight=1", "ppo.reward_model_weight=0"]

# (column, stage, metric); "a -> b -> c" columns join the stages' values of one metric
COLUMNS: list[tuple[str, list[tuple[str, str]]]] = [
    ("exact match (base -> SFT -> PPO)", [("pretrain", "eval/exact_match"), ("ppo", "eval/sft_exact_match"),
                                         ("ppo", "eval/exact_match")]),
    ("harmful refused", [("pretrain", "eval/refusal_rate/harmful"), ("ppo", "eval/sft_refusal_rate/harmful"),
                         ("ppo", "eval/refusal_rate/harmful")]),
    ("benign refused", [("pretrain", "eval/refusal_rate/benign"), ("ppo", "eval/sft_refusal_rate/benign"),
                        ("ppo", "eval/refusal_rate/benign")]),
    ("RM accuracy (all / harmful)", [("reward", "eval/pairwise_accuracy"), ("reward", "eval/pairwise_accuracy/harmful")]),
    ("reward of answers (SFT -> PPO)", [("ppo", "eval/sft_reward_mean"), ("ppo", "eval/reward_mean")]),
    ("reward gain (+- SE)", [("ppo", "eval/reward_gain"), ("ppo", "eval/reward_gain_se")]),
    ("KL", [("ppo", "eval/kl")]),
    ("GRPO exact match gain (+- SE)", [("grpo", "eval/exact_match_gain"), ("grpo", "eval/exact_match_gain_se")]),
    ("honest answers (SFT -> GRPO)", [("grpo", "eval/sft_exact_match/unknown"), ("grpo", "eval/exact_match/unknown")]),
]


def run_seed(config: str, overrides: list[str], seed: int, root: Path, grpo: bool) -> dict[str, Any]:
    """Every stage's `run` in order for one seed; returns {stage: metrics} and the wall time per stage."""
    from flows.config import load_config
    from flows.specs import STAGES
    from stages.common import NullTracker

    seeds = [f"pretrain.seed={1337 + seed}", f"sft.seed={seed}", f"reward.seed={seed}", f"ppo.seed={seed}"]

    def config_for(extra: list[str]) -> Any:
        cfg = load_config(config, [*seeds, *overrides, *extra])
        for src in cfg.ingest.sources:  # the data seed, keeping the config's sizes (--set cannot index a list)
            if src.type == "builtin":
                src.seed = seed
        return cfg

    wall, results, outputs = run_stages(config_for([]), root)
    metrics = {name: r.metrics for name, r in results.items()}
    if grpo:
        spec = next(s for s in STAGES if s.name == "ppo")
        grpo_cfg = config_for(GRPO_SET)
        inputs = {name: outputs[(stage, out)] for name, (stage, out) in spec.inputs.items() if (stage, out) in outputs}
        t = time.perf_counter()
        metrics["grpo"] = spec.load().run(grpo_cfg.ppo, inputs, root / "grpo", NullTracker()).metrics
        wall["grpo"] = time.perf_counter() - t
    return {"seed": seed, "metrics": metrics, "wall_s": wall}


def _cell(values: list[float | None], sep: str) -> str:
    if any(v is None for v in values):
        return "-"
    if sep == " +- ":
        return f"{values[0]:.3f} +- {values[1]:.3f}"
    return sep.join(f"{v:.3f}" if v < 10 else f"{v:.1f}" for v in values)


def _sep(name: str) -> str:
    return " +- " if "SE" in name else (" / " if " / " in name else " -> ")


def table(results: list[dict[str, Any]]) -> str:
    head = "| seed | " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    per_seed = []
    for r in results:
        row = [[r["metrics"].get(stage, {}).get(key) for stage, key in cols] for _, cols in COLUMNS]
        per_seed.append(row)
        cells = [_cell(v, _sep(n)) for v, (n, _) in zip(row, COLUMNS, strict=True)]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        cells = []
        for c, (name, cols) in enumerate(COLUMNS):
            vals = [row[c] for row in per_seed]
            if any(v is None for row in vals for v in row):
                cells.append("-")
                continue
            means = [statistics.mean(row[i] for row in vals) for i in range(len(cols))]
            sds = [statistics.stdev(row[i] for row in vals) for i in range(len(cols))]
            if "SE" in name:  # the gain's spread over seeds, not the mean standard error
                cells.append(f"{means[0]:.3f} (sd {sds[0]:.3f})")
            else:
                cells.append(_sep(name).join(f"{m:.3f} +- {s:.3f}" for m, s in zip(means, sds, strict=True)))
        lines.append("| mean +- sd | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--grpo", action="store_true", help="also run GRPO with the program-checked reward per seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every metric as the last line")
    parser.add_argument("--root", type=Path, help="folder of an earlier run: stages whose config and inputs are "
                        "unchanged are reused (their wall time is then the reuse check's); default: a fresh folder")
    args = parser.parse_args()

    from stages.common import StageError

    base = args.root or Path(tempfile.mkdtemp(prefix="bench-alignment-"))
    print(f"bench.alignment: stage outputs under {base}", flush=True)
    results = []
    for seed in args.seeds:
        try:
            r = run_seed(args.config, args.overrides, seed, base / f"seed{seed}", args.grpo)
        except StageError as e:  # a bad config or bad data: the message names the field and the fix
            raise SystemExit(f"bench.alignment: {e}") from None
        results.append(r)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["wall_s"].items()), flush=True)
    print(table(results))
    if args.json:
        print(json.dumps({"bench": "alignment", "config": Path(args.config).name, "overrides": args.overrides,
                          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "results": results},
                         sort_keys=True, default=str))


if __name__ == "__main__":
    main()
