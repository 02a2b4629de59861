"""Fake stage modules with the real stage contract, for testing the flow layer fast (used by test_flows*, test_faults_pipeline)."""

from __future__ import annotations

import hashlib
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from flows.specs import PipelineSection, StageSpec
from stages.common import StageError, StageResult, Tracker, TransientError, atomic_dir, sha256_tree

# Shared, mutable test controls: attempts per stage, per-step hooks (e.g. stop the MLflow server at step 3).
ATTEMPTS: dict[str, int] = {}
HOOKS: dict[str, Callable[[int], None]] = {}
CALLS: list[str] = []


class FakeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: int = Field(1, description="Changes the outputs (and so the cache key).")
    steps: int = Field(3, ge=1, description="Metric steps to log.")
    lr: float = Field(0.01, gt=0, description="Learning rate (must be positive).")
    transient_failures: int = Field(0, ge=0, description="Raise TransientError on this many first attempts.")
    fail: bool = Field(False, description="Raise a deterministic StageError (bad data).")
    step_sleep_s: float = Field(0.0, ge=0, description="Sleep per step (to let a test act mid-stage).")
    escape: bool = Field(False, description="Report an output outside out_dir (path traversal test).")


def _tiny_hf_model(out: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(out)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|eos|>": 0, **{chr(97 + i): i + 1 for i in range(26)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|eos|>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eos|>", pad_token="<|eos|>").save_pretrained(out)


def make_stage_module(name: str, outputs: tuple[str, ...], hf: bool = False) -> types.ModuleType:
    mod = types.ModuleType(f"fake_stages.{name}")

    def run(cfg: FakeConfig, inputs: dict[str, Path], out_dir: Path, tracker: Tracker) -> StageResult:
        CALLS.append(name)
        ATTEMPTS[name] = ATTEMPTS.get(name, 0) + 1
        if cfg.fail:
            raise StageError(f"fake {name}: bad data in input (config field {name}.fail)")
        if ATTEMPTS[name] <= cfg.transient_failures:
            raise TransientError(f"fake {name}: injected transient failure {ATTEMPTS[name]}")
        digest = hashlib.sha256(f"{name}:{cfg.value}".encode())
        for k in sorted(inputs):
            digest.update(k.encode() + sha256_tree(inputs[k]).encode())
        # A progress bar like the real stages' (their console progress is what the Prefect UI mirrors).
        with tqdm(total=cfg.steps, desc=name, unit="step", mininterval=0) as bar:
            for step in range(cfg.steps):
                if hook := HOOKS.get(name):
                    hook(step)
                tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/step_value": float(step)}, step=step)
                time.sleep(cfg.step_sleep_s)
                bar.update(1)
                bar.set_postfix(loss=f"{1.0 / (step + 1):.3f}", refresh=False)
        outs: dict[str, Path] = {}
        for o in outputs:
            target = out_dir / o
            with atomic_dir(target) as tmp:
                (tmp / "data.txt").write_text(f"{o}:{digest.hexdigest()}\n")
                if hf and o == "hf":
                    _tiny_hf_model(tmp)
            outs[o] = target
        if cfg.escape:
            outs["evil"] = out_dir / ".." / ".." / "escaped"
            outs["evil"].mkdir(parents=True, exist_ok=True)
        return StageResult(
            outputs=outs,
            metrics={"eval/score": float(cfg.value), "rows": float(len(inputs))},
            samples=[{"prompt": "1+1=", "response": "2", "stage": name}],
        )

    mod.Config = FakeConfig
    mod.run = run
    sys.modules[mod.__name__] = mod
    return mod


def fake_specs() -> tuple[StageSpec, ...]:
    """The real pipeline's shape (same stage/input/output names) over fake modules."""
    sys.modules.setdefault("fake_stages", types.ModuleType("fake_stages"))
    make_stage_module("ingest", ("corpus", "tasks"))
    make_stage_module("tokenizer", ("tokenizer", "tokens"))
    make_stage_module("pretrain", ("checkpoint", "hf"))
    make_stage_module("sft", ("hf",))
    make_stage_module("reward", ("hf",))
    make_stage_module("ppo", ("hf",), hf=True)
    return (
        StageSpec("ingest", "fake_stages.ingest"),
        StageSpec("tokenizer", "fake_stages.tokenizer", {"corpus": ("ingest", "corpus")}),
        StageSpec(
            "pretrain",
            "fake_stages.pretrain",
            {"tokenizer": ("tokenizer", "tokenizer"), "tokens": ("tokenizer", "tokens"), "tasks": ("ingest", "tasks")},
            optional=frozenset({"tasks"}),
        ),
        StageSpec("sft", "fake_stages.sft", {"model": ("pretrain", "hf"), "tasks": ("ingest", "tasks")}),
        StageSpec("reward", "fake_stages.reward", {"model": ("sft", "hf"), "tasks": ("ingest", "tasks")}),
        StageSpec(
            "ppo",
            "fake_stages.ppo",
            {"policy": ("sft", "hf"), "reward_model": ("reward", "hf"), "tasks": ("ingest", "tasks")},
        ),
    )


def reset() -> None:
    ATTEMPTS.clear()
    HOOKS.clear()
    CALLS.clear()


_HARNESS: list[object] = []


def prefect_harness() -> None:
    """One temporary Prefect server for the whole test session (starting one costs ~10-25 s on 2 cores)."""
    if _HARNESS:
        return
    import atexit
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    cm = prefect_test_harness(server_startup_timeout=180)
    cm.__enter__()

    def stop() -> None:
        import logging

        logging.raiseExceptions = False  # pytest has closed the streams Prefect's shutdown message goes to
        cm.__exit__(None, None, None)

    atexit.register(stop)
    _HARNESS.append(cm)


def section(work_dir: Path, **kw: object) -> PipelineSection:
    return PipelineSection(work_dir=str(work_dir), system_metrics=False, retry_delay_s=0.05, **kw)


_TEMPLATE_DB: list[Path] = []


def work_dir(tmp_path: Path) -> Path:
    """A fresh work dir holding an empty, already-migrated MLflow store (creating one costs ~10 s; copying, ms)."""
    import shutil
    import tempfile

    if not _TEMPLATE_DB:
        import mlflow

        root = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").search_experiments()
        _TEMPLATE_DB.append(root / "mlflow.db")
    wd = tmp_path / "wd"
    wd.mkdir(parents=True, exist_ok=True)
    shutil.copy(_TEMPLATE_DB[0], wd / "mlflow.db")
    return wd
