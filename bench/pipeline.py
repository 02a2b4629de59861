"""Orchestration overhead: the tiny pipeline through Prefect + MLflow vs the same stage functions called directly.

    .venv/bin/python -m bench.pipeline [--config configs/tiny.yaml] [--set section.key=value ...] [--quick] [--json]

Both sides run the same stage configs in fresh folders, in one process, after every module is imported. The
orchestrated side includes what a user pays: the Prefect ephemeral server start, MLflow runs, parameter/metric
logging, artifact upload and download, hashing, the model registration. Also reported: a fully cached rerun.
Target: overhead < 15% of the direct wall time on the default tiny pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]



def run_stages(cfg: Any, root: Path) -> tuple[dict[str, float], dict[str, Any], dict[tuple[str, str], Path]]:
    """Every stage's plain `run` in order, wiring outputs to inputs by the same registry the flows use.
    Returns the wall time and the StageResult of each stage, and every output by (stage, output name)."""
    from flows.config import STAGES
    from flows.specs import stage_config
    from stages.common import NullTracker

    outputs: dict[tuple[str, str], Path] = {}
    per_stage: dict[str, float] = {}
    results: dict[str, Any] = {}
    for spec in STAGES:
        inputs = {
            name: outputs[(stage, out)]
            for name, (stage, out) in spec.inputs.items()
            if (stage, out) in outputs or name not in spec.optional
        }
        t = time.perf_counter()
        results[spec.name] = spec.load().run(stage_config(cfg, spec.name), inputs, root / spec.name, NullTracker())
        per_stage[spec.name] = time.perf_counter() - t
        outputs.update({(spec.name, k): Path(v) for k, v in results[spec.name].outputs.items()})
    return per_stage, results, outputs


def run_direct(cfg: Any, root: Path) -> tuple[float, dict[str, float]]:
    """The stages called directly: (total wall time, wall time per stage)."""
    t0 = time.perf_counter()
    per_stage, _, _ = run_stages(cfg, root)
    return time.perf_counter() - t0, per_stage


def run_orchestrated(cfg: Any) -> tuple[float, dict[str, Any]]:
    from flows.pipeline import pipeline_flow

    t0 = time.perf_counter()
    res = pipeline_flow(config=cfg)
    return time.perf_counter() - t0, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--quick", action="store_true",
                        help="configs/smoke.yaml instead of --config: a few steps per stage (a minute or two on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results as the last line")
    parser.add_argument("--direct-only", action="store_true",
                        help="time the stage functions alone (to compare two commits' pipelines on one machine)")
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the embedded default, in a fresh folder
    from flows.config import load_config

    base = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    if args.quick:
        args.config = str(ROOT / "configs" / "smoke.yaml")
    overrides = [*args.overrides, f"pipeline.work_dir={base / 'work'}",
                 "pipeline.experiment=bench-pipeline"]
    cfg = load_config(args.config, overrides)
    # import everything both sides use before timing: the comparison is about work, not import time
    import mlflow  # noqa: F401
    import prefect  # noqa: F401

    from flows.pipeline import pipeline_flow  # noqa: F401

    direct_s, per_stage = run_direct(cfg, base / "direct")
    if args.direct_only:
        print(f"direct {direct_s:.1f}s | " + ", ".join(f"{k} {v:.1f}s" for k, v in per_stage.items()))
        if args.json:
            print(json.dumps({"bench": "pipeline", "direct_s": round(direct_s, 2),
                              "direct_stage_s": {k: round(v, 2) for k, v in per_stage.items()}}, sort_keys=True))
        return
    orch_s, res = run_orchestrated(cfg)
    cached_s, cached = run_orchestrated(cfg)
    stage_s = {s["stage"]: round(s["wall_s"], 2) for s in res["stages"]}
    result = {
        "bench": "pipeline",
        "config": Path(args.config).name + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "direct_s": round(direct_s, 2),
        "orchestrated_s": round(orch_s, 2),
        "overhead_s": round(orch_s - direct_s, 2),
        "overhead_ratio": round((orch_s - direct_s) / direct_s, 4),
        "target_ratio": 0.15,
        "cached_rerun_s": round(cached_s, 2),
        "cached_all_reused": all(s["reused"] for s in cached["stages"]),
        "direct_stage_s": {k: round(v, 2) for k, v in per_stage.items()},
        "orchestrated_stage_s": stage_s,
        "work_dir": str(base),
    }
    print(f"direct {direct_s:.1f}s | Prefect+MLflow {orch_s:.1f}s | overhead {result['overhead_ratio']:+.1%} "
          f"(target < 15%) | cached rerun {cached_s:.1f}s")
    for k in per_stage:
        print(f"  {k:<10} direct {per_stage[k]:7.1f}s   orchestrated {stage_s.get(k, float('nan')):7.1f}s")
    if args.json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
