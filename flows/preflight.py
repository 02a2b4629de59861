"""Fail before compute: every external input of a pipeline config checked when it loads, and the post-training data
checked against the tokenizer and the model's context right after the tokenizer stage, before pretraining.

Problems are collected from every stage and reported at once as one ConfigError (exit code 2, no traceback); the
checks themselves live with the stages (stages.data.input_checks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flows.config import ConfigError

log = logging.getLogger(__name__)

POST_TRAINING = ("sft", "reward", "ppo")
# configs checked in this process in the last minute: `run` checks, then its pipeline flow would again (a long-lived
# `serve` process checks every run it starts, since the files may have changed since)
_checked: dict[str, float] = {}
MEMO_S = 60.0


def builtin_tasks(cfg: Any) -> bool:
    """Whether the config's ingest writes the built-in world's task data."""
    from stages.data.readers import BuiltinSource

    return any(isinstance(s, BuiltinSource) and s.tasks for s in cfg.ingest.sources)


def _raise(problems: list[str], when: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{len(problems)} problem(s) with the pipeline's inputs, found {when}:\n{lines}")


def check_inputs(cfg: Any, stages: Iterable[str] | None = None) -> None:
    """Every source and dataset of the given stages (default: all) checked; one ConfigError lists every problem."""
    from stages.data.input_checks import check_evaluate, check_ingest, check_task_data

    wanted = set(stages) if stages is not None else None
    memo = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), sorted(wanted or [])]).encode()).hexdigest()
    if time.monotonic() - _checked.get(memo, -MEMO_S) < MEMO_S:
        return
    builtin = builtin_tasks(cfg)
    problems: list[str] = []
    if wanted is None or "ingest" in wanted:
        problems += check_ingest(cfg.ingest)
    for stage in POST_TRAINING:
        if wanted is None or stage in wanted:
            problems += check_task_data(stage, getattr(cfg, stage), builtin)
    if wanted is None or "evaluate" in wanted:
        problems += check_evaluate(cfg.evaluate, builtin)
    _raise(problems, "before any stage ran")
    _checked[memo] = time.monotonic()


def context_of(pretrain_cfg: Any, vocab_size: int) -> int:
    """The context of the model the pretrain config builds (what every later stage's model has)."""
    from stages.pretrain import build_model_config

    return build_model_config(pretrain_cfg, vocab_size).max_seq_len


def check_after_tokenizer(cfg: Any, tokenizer_dir: Path, tasks_dir: Path | None) -> dict[str, Any]:
    """The post-training data rendered by the new tokenizer's chat template against the model's context; returns
    {stage: Fit} (what the truncation policy will cut and drop), raises ConfigError when a stage would have too
    little left to train on."""
    from transformers import AutoTokenizer

    from stages.data.input_checks import check_fit

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ctx = context_of(cfg.pretrain, len(tok))
    problems, fits = check_fit({s: getattr(cfg, s) for s in POST_TRAINING}, tok, ctx, tasks_dir)
    _raise(problems, "after the tokenizer stage, before pretraining")
    for stage, fit in fits.items():
        if fit.truncated or fit.dropped:
            log.warning("%s: %d example(s) will be cut from the left and %d dropped to fit the context of %d tokens "
                        "(stages.data.truncation)", stage, fit.truncated, fit.dropped, ctx)
    return fits
