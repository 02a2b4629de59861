"""Every shipped config loads; bad configs fail naming the key (issue 7 item 10). Run: .venv/bin/pytest tests/test_configs.py"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.config import ConfigError, apply_overrides, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_three_named_configs_ship() -> None:
    assert {"tiny.yaml", "gpt2-124m.yaml", "llama-124m.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.pipeline.experiment and cfg.pipeline.registered_model
    for section in ("ingest", "tokenizer", "pretrain", "sft", "reward", "ppo", "evaluate"):
        assert getattr(cfg, section) is not None


def test_real_configs_point_at_hf_data_and_their_model() -> None:
    for name in ("gpt2-124m", "llama-124m"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.pretrain.model == name
        assert any(s.type == "hf" for s in cfg.ingest.sources)
        assert not any(s.type == "builtin" for s in cfg.ingest.sources), "the GPU configs use public data only"
        assert all(getattr(cfg, st).dataset and getattr(cfg, st).eval_dataset for st in ("sft", "reward", "ppo"))


def test_tiny_is_the_default_and_uses_stage_defaults() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert cfg.pretrain.model == "tiny"
    assert cfg.ingest.sources[0].type == "builtin"


def test_overrides_set_nested_values_with_yaml_types() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["pretrain.max_steps=7", "pretrain.lr=1e-3", "sft.method=lora"])
    assert cfg.pretrain.max_steps == 7 and cfg.pretrain.lr == pytest.approx(1e-3) and cfg.sft.method == "lora"
    assert apply_overrides({}, ["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("pretrain.bogus_key=1", ["unknown key", "pretrain.bogus_key"]),
        ("nosuchsection.x=1", ["unknown key", "nosuchsection"]),
        ("pretrain.max_steps=abc", ["pretrain.max_steps", "integer"]),
        ("pretrain.lr=-0.001", ["pretrain.lr", "greater than 0"]),
        ("sft.learning_rate=-1", ["sft.learning_rate"]),
        ("tokenizer.vocab_size=10", ["tokenizer.vocab_size"]),
        ("pipeline.retries=-1", ["pipeline.retries"]),
        ("pipeline.registered_model=../evil", ["pipeline.registered_model"]),
        # renamed settings point at their new name
        ("pretrain.max_seq_len=64", ["unknown key", "pretrain.max_seq_len", "did you mean 'pretrain.seq_len'"]),
        ("pretrain.keep_checkpoints=3", ["pretrain.keep_checkpoints", "did you mean 'pretrain.keep_last'"]),
    ],
)
def test_bad_values_fail_naming_the_field(override: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    for n in names:
        assert n in str(e.value)
    assert "tiny.yaml" in str(e.value)


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("pretrain:\n  max_stpes: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*pretrain\.max_stpes"):
        load_config(p)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "pretrain: [unclosed\n"])
def test_malformed_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)


def test_malformed_override_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no_equals_sign")
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_cli_bad_config_exits_nonzero_fast_before_any_write(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--set", "pretrain.lr=-1", "--set", f"pipeline.work_dir={tmp_path / 'wd'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert r.returncode == 2
    assert "pretrain.lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "wd").exists(), "nothing may be written before the config validates"
    assert time.monotonic() - t0 < 60
