"""The loop's settings (TrainConfig), its result (TrainResult) and its user-facing errors.

TrainConfig is the one declaration of every pretraining setting: each field carries its description and bounds in
`dataclasses.field(metadata=...)`, which `__post_init__` enforces here and which the pretrain stage hands to pydantic
(the metadata keys are pydantic `Field` arguments), so the stage config and the loop never disagree.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Flag = bool | Literal["auto"]  # on, off, or let the loop decide from the device


class TrainingError(Exception):
    """Base class of the loop's user-facing errors (the stage layer turns them into StageError)."""


class CheckpointError(TrainingError):
    """A checkpoint could not be written or no usable checkpoint could be read."""


class ResumeMismatch(TrainingError):
    """The checkpoint was made with a different model shape, tokenizer, data or batch geometry."""


class TrainingDiverged(TrainingError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def _setting(default: Any, description: str, **bounds: Any) -> Any:
    return field(default=default, metadata={"description": description, **bounds})


@dataclass
class TrainConfig:
    """Hyperparameters of the loop. Everything is per optimizer step unless it says micro batch."""

    max_steps: int = _setting(1000, "Optimizer steps to train (1000 x 2048 tokens: ~2.3 epochs of the built-in "
                              "corpus, ~3 minutes on 2 CPU cores).", ge=1)
    micro_batch_size: int = _setting(16, "Sequences per forward/backward pass on one device.", ge=1)
    seq_len: int | None = _setting(128, "Training sequence length in tokens (None: the model's context). Must not "
                                   "exceed the model's max_seq_len.", ge=8)
    tokens_per_step: int | None = _setting(None, "Global tokens per optimizer step; gradient accumulation makes up "
                                           "the difference. None: one micro batch per device.", ge=1)
    lr: float = _setting(3e-3, "Peak learning rate (AdamW).", gt=0, allow_inf_nan=False)
    min_lr_ratio: float = _setting(0.1, "The cosine decay ends at lr x this.", ge=0, le=1)
    warmup_steps: int = _setting(50, "Linear warmup steps.", ge=0)
    weight_decay: float = _setting(0.1, "AdamW weight decay on matrices (not norms, biases, embeddings).", ge=0)
    decay_embeddings: bool = _setting(False, "Also apply weight decay to the embedding tables.")
    beta1: float = _setting(0.9, "AdamW beta1.", gt=0, lt=1)
    beta2: float = _setting(0.95, "AdamW beta2.", gt=0, lt=1)
    eps: float = _setting(1e-8, "AdamW epsilon.", gt=0)
    grad_clip: float = _setting(1.0, "Clip the global gradient norm to this (0 = off).", ge=0)
    eval_interval: int = _setting(100, "Evaluate (val loss/ppl/bpb, sample generations) every N steps and at the "
                                  "end; 0 = only at the end.", ge=0)
    eval_batches: int = _setting(10, "Validation batches per evaluation.", ge=1)
    checkpoint_interval: int = _setting(100, "Save a resumable training checkpoint every N steps and at the end; "
                                        "0 = only at the end.", ge=0)
    keep_last: int = _setting(2, "Training checkpoints kept on disk (newest first).", ge=1)
    max_bad_steps: int = _setting(5, "Stop after this many consecutive steps with a non-finite loss or gradient "
                                  "(each one is skipped, never applied).", ge=1)
    seed: int = _setting(1337, "Seed for initialisation, data order and dropout.")
    device: str = _setting("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N.")
    precision: Literal["auto", "bf16", "fp32"] = _setting("auto", "auto: bf16 autocast on CUDA, fp32 on CPU.")
    compile: Flag = _setting("auto", "torch.compile the model (true / false / auto): auto = on for CUDA only "
                             "(compiling costs more than it saves on a small CPU run).")
    parallel: Literal["ddp", "fsdp"] = _setting("ddp", "Under torchrun: ddp replicates the model, fsdp (FSDP2) "
                                                "shards it per block for models that do not fit one card.")
    fused_loss: Flag = _setting("auto", "Chunked LM head + cross-entropy that never holds all logits (less memory; "
                                "faster on CUDA and CPU), true / false / auto: auto = on (off under FSDP).")
    loss_chunk_tokens: int = _setting(4096, "Tokens per chunk of the fused loss.", ge=1)
    loss_kernel: Flag = _setting("auto", "The fused loss's softmax gradient in one Triton kernel (llm/kernels.py) "
                                 "instead of torch ops, true / false / auto: auto = on where Triton runs (CUDA).")
    peak_flops: float | None = _setting(None, "Peak FLOP/s of one device, the denominator of MFU; empty = the "
                                        "card's dense bf16 datasheet figure on CUDA, a measured fp32 matmul rate "
                                        "on CPU.", gt=0)
    log_interval: int = _setting(1, "Report training metrics every N steps.", ge=1)
    progress: bool = _setting(True, "Show a progress bar (or log lines without tqdm) on rank 0.")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            problem = _violation(getattr(self, f.name), hints[f.name], f.metadata)
            if problem:
                raise ValueError(f"TrainConfig.{f.name} must be {problem}, got {getattr(self, f.name)!r}")

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro batches per rank per optimizer step, so that the global batch hits tokens_per_step exactly."""
        if self.seq_len is None:
            raise ValueError("TrainConfig.seq_len is None: resolve it from the model (see with_seq_len) first")
        per_micro = self.micro_batch_size * self.seq_len * world_size
        if self.tokens_per_step is None:
            return 1
        if self.tokens_per_step % per_micro:
            raise ValueError(
                f"TrainConfig.tokens_per_step={self.tokens_per_step} is not a multiple of micro_batch_size x "
                f"seq_len x world_size = {self.micro_batch_size} x {self.seq_len} x {world_size} = {per_micro}; "
                f"use a multiple such as {max(1, round(self.tokens_per_step / per_micro)) * per_micro}"
            )
        return self.tokens_per_step // per_micro

    def with_seq_len(self, context: int) -> TrainConfig:
        """This config with seq_len resolved: None means the model's whole context."""
        return self if self.seq_len is not None else dataclasses.replace(self, seq_len=context)


def _violation(value: Any, hint: Any, rules: typing.Mapping[str, Any]) -> str | None:
    """What `value` breaks among the field's allowed values (a Literal in its type) and bounds, or None."""
    choices = _choices(hint)
    if choices is not None and value not in choices:
        return " or ".join(repr(c) for c in choices)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if rules.get("allow_inf_nan") is False and not math.isfinite(value):
        return "a finite number"
    checks = {"ge": (value >= rules.get("ge", -math.inf), ">="), "gt": (value > rules.get("gt", -math.inf), ">"),
              "le": (value <= rules.get("le", math.inf), "<="), "lt": (value < rules.get("lt", math.inf), "<")}
    return next((f"{op} {rules[k]}" for k, (ok, op) in checks.items() if k in rules and not ok), None)


def _choices(hint: Any) -> tuple | None:
    """The values a Literal-typed field allows (bool | Literal[...] adds True and False), else None."""
    args = typing.get_args(hint) if typing.get_origin(hint) is not Literal else (hint,)
    literals = [a for a in args if typing.get_origin(a) is Literal]
    if not literals:
        return None
    values = tuple(v for lit in literals for v in typing.get_args(lit))
    return (*values, True, False) if bool in args else values


@dataclass
class TrainResult:
    step: int  # optimizer steps done (== max_steps when the run finished)
    train_loss: float  # mean loss of the last step
    val: dict[str, float]  # last evaluation: val/loss, val/ppl, val/bpb
    losses: list[tuple[int, float]]  # (step, loss) of every step this process ran
    skipped_steps: int  # steps dropped for a non-finite loss/grad (whole run, resumes included)
    tokens: int  # tokens trained on (whole run)
    seconds: float  # wall time of this process's loop
    resumed_from: int  # step of the checkpoint this run started from (0 = fresh)
    checkpoint: Path | None  # the last complete checkpoint
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint and restored on resume."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    bad_streak: int = 0
