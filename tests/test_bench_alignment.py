"""bench.alignment's --grpo rerun: the README's results table comes from it, so it must rerun the RL stage (not
whichever stage the registry lists last) with GRPO and the program-checked reward, on that seed's outputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from bench import alignment
from flows.specs import STAGES


def test_grpo_rerun_runs_the_rl_stage_with_grpo_on_the_seeds_outputs(tmp_path, monkeypatch):
    outputs = {(s.name, out): tmp_path / s.name / out for s in STAGES for out in ("hf", "tasks", "corpus", "results")}
    monkeypatch.setattr(alignment, "run_stages",
                        lambda cfg, root: ({s.name: 1.0 for s in STAGES}, {}, outputs))
    calls = []

    def fake_run(cfg, inputs, out_dir, tracker):
        calls.append((cfg, inputs, Path(out_dir)))
        return SimpleNamespace(metrics={"eval/exact_match_gain": 0.0})

    monkeypatch.setattr("stages.ppo.run", fake_run)
    result = alignment.run_seed(str(alignment.ROOT / "configs" / "tiny.yaml"), [], 2, tmp_path, grpo=True)
    (cfg, inputs, out_dir), = calls
    assert (cfg.algorithm, cfg.program_reward_weight, cfg.reward_model_weight, cfg.seed) == ("grpo", 1, 0, 2)
    assert inputs == {"policy": outputs[("sft", "hf")], "reward_model": outputs[("reward", "hf")],
                      "tasks": outputs[("ingest", "tasks")]}
    assert out_dir == tmp_path / "grpo" and result["metrics"]["grpo"] == {"eval/exact_match_gain": 0.0}
