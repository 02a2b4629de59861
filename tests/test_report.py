"""The report card's accounting (flows/report.py, flows/report_render.py): the device a stage ran on, its cost in
devices x hours, human units, and the lines for what was not computed. Run: .venv/bin/pytest tests/test_report.py"""

from __future__ import annotations

from types import SimpleNamespace

from flows.config import load_config
from flows.report import _not_computed, _stage_entry
from flows.report_render import human, render_markdown
from flows.stage_runner import TAG_DEVICE, TAG_DEVICES, StageOutcome, device_used


def _run(tags: dict[str, str], metrics: dict[str, float], wall_s: float) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(tags=tags, metrics=metrics, params={"device": "auto"}),
                           info=SimpleNamespace(start_time=0, end_time=int(wall_s * 1000)))


def test_a_pretraining_run_on_two_workers_is_costed_as_two_devices() -> None:
    cfg = load_config(None, ["pretrain.nproc_per_node=2", "pretrain.device=cpu"])
    assert device_used(cfg.pretrain) == ("2 x cpu", 2)
    assert device_used(cfg.sft.model_copy(update={"device": "cpu"})) == ("cpu", 1)
    assert device_used(cfg.ingest) == ("cpu", 1)  # no device setting: one CPU machine
    label, devices = device_used(cfg.pretrain)
    run = _run({TAG_DEVICE: label, TAG_DEVICES: str(devices)}, {"train/tokens_per_s": 910_000.0}, 3600.0)
    entry = _stage_entry(StageOutcome("pretrain", "r" * 32, False, "k"), run, price=2.0)
    assert entry["device"] == "2 x cpu" and entry["devices"] == 2 and entry["cost"] == 4.0  # 1 h x 2 devices x 2.0
    one = _stage_entry(StageOutcome("pretrain", "r" * 32, False, "k"), _run({}, {}, 3600.0), price=2.0)
    assert one["cost"] == 2.0 and one["device"] == "auto"  # a run from before the tag: its setting, one device


def test_numbers_in_human_units_and_what_was_not_computed() -> None:
    assert (human(12_000, "documents"), human(910_000, "tokens/s"), human(0.5)) == \
        ("12 k documents", "0.91 M tokens/s", "0.5")
    stages = [{"stage": "pretrain", "mfu": None}]
    lines = _not_computed({"reward": {"eval/pairwise_accuracy": 0.8}, "ppo": {"eval/kl": 0.1},
                           "evaluate": {"heldout/text_bpb/base": 1.0}}, stages)
    text = "\n".join(lines)
    assert "MFU" in text and "judge" in text and "Exact match" in text and "heldout/response_bpb" in text
    card = {"pipeline_run_id": "p", "stages": [], "models": {}, "not_computed": lines,
            "alignment": {"eval/win_rate/reward_model": 0.6, "eval/win_rate/reward_model_se": 0.05, "eval/kl": 0.1},
            "data": {"sft": {"truncated": 3.0, "dropped": 1.0}}}
    md = render_markdown(card)
    assert "0.600 ± 0.050" in md and "sft 3 cut, 1 dropped" in md and "Not computed:" in md
