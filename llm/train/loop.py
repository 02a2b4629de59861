"""The pretraining loop: one CPU, one GPU, or many through torchrun (DDP / FSDP2), with exact resume.

`train()` sets up the run (`_start`, `_build`), restores the newest valid checkpoint, then repeats one optimizer step
(`_step`), its report (`_report`) and the evaluations and checkpoints that fall due (`_after_step`). The mutable
pieces live in small dataclasses passed to those helpers: `_Run` (what setup built), `LoopState` (the counters a
checkpoint saves) and `_Record` (what the result reports).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm import distributed as D
from llm.device import allow_tf32, autocast_for, cpu_matmul_flops, peak_flops, resolve_device
from llm.loss import FusedLossLM, check_loss_kernel, supports_fused_loss
from llm.optim import build_adamw, lr_at
from llm.train import rng
from llm.train.checkpoints import Checkpointer, clean_partial, list_checkpoints
from llm.train.config import (
    CheckpointError,
    LoopState,
    ResumeMismatch,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
)
from llm.utils import flops_per_token, model_config

log = logging.getLogger("llm.train")

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Hooks:
    """The caller's callbacks and validation data (see `train`)."""

    val_batches: Callable[[], Iterable[Batch]] | None = None
    bytes_per_token: float | None = None
    on_step: Callable[[int, dict[str, float]], None] | None = None
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    sample_fn: Callable[[nn.Module], list[dict[str, Any]]] | None = None


@dataclass
class _Run:
    """What setup built: devices, the model in its wrappers, the optimizer and the checkpoint folder."""

    cfg: TrainConfig
    device: torch.device
    info: D.DistInfo
    accum: int  # micro batches per rank per optimizer step
    tokens_per_step: int  # global
    raw_model: nn.Module
    meta: dict[str, Any]  # what a checkpoint must agree with to be resumed
    ckpt: Checkpointer | None
    resume_path: Path | None = None
    fused: bool = False
    model_dp: nn.Module | None = None  # data-parallel wrapper (the model itself on one process)
    fwd: nn.Module | None = None  # what the step calls: model_dp, compiled when compile is on
    optimizer: torch.optim.Optimizer | None = None
    params: list[nn.Parameter] = field(default_factory=list)
    peak: float | None = None
    peak_logged: bool = False  # train/peak_flops goes out once, with the first metrics after a start or resume
    fpt: float = 0.0  # training FLOPs per token
    amp: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)


@dataclass
class _Record:
    """What the run reports at the end."""

    last_ckpt: Path | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    val: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    last_loss: float = float("nan")


def train(
    model: nn.Module,
    cfg: TrainConfig,
    train_data: Any,
    ckpt_dir: str | Path | None = None,
    *,
    val_batches: Callable[[], Iterable[Batch]] | None = None,
    bytes_per_token: float | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    sample_fn: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train `model` for `cfg.max_steps` optimizer steps, resuming from the newest valid checkpoint in `ckpt_dir`.

    fingerprint: what the checkpoint must agree with to be resumed (e.g. {"tokenizer": sha, "data": sha}); the
      model's config and parameter shapes and the batch geometry are always checked. A mismatch raises
      ResumeMismatch naming the field, before anything is written.
    on_step(step, metrics) / on_eval(step, metrics): called on rank 0 (train/loss, train/lr, train/grad_norm,
      train/tokens_per_s, train/mfu (against TrainConfig.peak_flops, a CUDA card's datasheet peak or
      a CPU's measured matmul rate); val/loss, val/ppl, val/bpb).
    sample_fn(model) -> rows: generations from fixed prompts at each evaluation (rank 0; RNG state is preserved
      around it, so sampling never changes the training trajectory).
    """
    hooks = _Hooks(val_batches, bytes_per_token, on_step, on_eval, sample_fn)
    run = _start(model, cfg, ckpt_dir, fingerprint, resume)
    state = run.ckpt.read_state(run.resume_path) if run.resume_path is not None else None
    if state is not None:
        _check_resume(run.resume_path, state, run.meta, run.raw_model)
    _build(run)
    loop = LoopState()
    if state is not None:
        loop = run.ckpt.load(run.resume_path, run.raw_model, run.optimizer, train_data, state)
        if run.info.is_main:
            log.info("resumed from %s (step %d)", run.resume_path, loop.step)
    resumed_from = loop.step
    rec = _Record(last_ckpt=run.resume_path)
    cfg = run.cfg
    t_start = time.perf_counter()
    bar = _progress_bar(cfg, run.info, loop.step)
    try:
        while loop.step < cfg.max_steps:
            t0 = time.perf_counter()
            lr, grad_norm = _step(run, loop, rec, train_data)
            _report(run, loop, rec, hooks, bar, lr, grad_norm, time.perf_counter() - t0)
            _after_step(run, loop, rec, hooks, train_data)
    finally:
        if bar is not None:
            bar.close()
    if resumed_from >= cfg.max_steps and (val_batches is not None or sample_fn is not None):
        _run_eval(run, rec, hooks, loop.step)  # nothing left to train: still report the finished model
    return TrainResult(step=loop.step, train_loss=rec.last_loss, val=rec.val, losses=rec.losses,
                       skipped_steps=loop.skipped_steps, tokens=loop.tokens, seconds=time.perf_counter() - t_start,
                       resumed_from=resumed_from, checkpoint=rec.last_ckpt, samples=rec.samples)


# ---------------------------------------------------------------------------------------------------------- setup


def _start(model: nn.Module, cfg: TrainConfig, ckpt_dir: str | Path | None, fingerprint: Mapping[str, Any] | None,
           resume: bool) -> _Run:
    """Device, process group, seeds and the checkpoint to resume from; nothing is written but stale temp folders
    are removed."""
    model_cfg = model_config(model)
    if cfg.seq_len is None and not (model_cfg or {}).get("max_seq_len"):
        raise ValueError("TrainConfig.seq_len is None but the model has no max_seq_len to take it from")
    cfg = cfg.with_seq_len((model_cfg or {}).get("max_seq_len"))
    device = resolve_device(cfg.device, "TrainConfig.device")
    check_loss_kernel(cfg, device)
    info = D.init_distributed(device.type)
    allow_tf32(device)
    accum = cfg.grad_accum_steps(info.world_size)
    tokens_per_step = cfg.micro_batch_size * cfg.seq_len * accum * info.world_size
    raw_model = model.to(device)
    raw_model.train()
    rng.seed_everything(cfg.seed, info.rank)
    meta = {
        "fingerprint": dict(fingerprint or {}),
        "model_config": model_config(raw_model),
        # the data position is global, so the world size may change on resume; the global batch may not
        "geometry": {"seq_len": cfg.seq_len, "tokens_per_step": tokens_per_step},
        "train_config": asdict(cfg),
    }
    ckpt = Checkpointer(ckpt_dir, info, cfg.keep_last) if ckpt_dir is not None else None
    run = _Run(cfg, device, info, accum, tokens_per_step, raw_model, meta, ckpt)
    run.resume_path = _resume_point(ckpt, info, resume)
    return run


def _resume_point(ckpt: Checkpointer | None, info: D.DistInfo, resume: bool) -> Path | None:
    """The newest intact checkpoint (rank 0 looks, every rank gets the answer), or None for a fresh start."""
    if ckpt is None:
        return None
    path = None
    if info.is_main:
        clean_partial(ckpt.root)
        if not resume and list_checkpoints(ckpt.root):
            raise CheckpointError(
                f"{ckpt.root} already holds checkpoints of an earlier run and resume is off; delete the folder "
                "or enable resume"
            )
        path = ckpt.latest_valid() if resume else None
    return D.broadcast_object(path, info)


def _build(run: _Run) -> None:
    """Wrap the model (fused loss, data parallel, compile) and build the optimizer over its parameters."""
    cfg, raw_model = run.cfg, run.raw_model
    # FSDP2 gathers parameters in the root module's forward, which the fused loss would bypass
    # "auto" is on everywhere: less memory on GPUs, faster steps on CPU (docs/FINDINGS.md, "The CPU training step")
    fused = cfg.fused_loss in (True, "auto") and supports_fused_loss(raw_model)
    run.fused = fused and not (run.info.enabled and cfg.parallel == "fsdp")
    trained = FusedLossLM(raw_model, cfg.loss_chunk_tokens, cfg.loss_kernel) if run.fused else raw_model
    # data parallel wrapping before the optimizer, so FSDP2's sharded parameters are what AdamW updates
    run.model_dp = D.wrap_model(trained, run.info, cfg.parallel, run.device)
    run.optimizer = build_adamw(
        raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, cfg.decay_embeddings
    )
    use_compile = cfg.compile is True or (cfg.compile == "auto" and run.device.type == "cuda")
    run.fwd = torch.compile(run.model_dp) if use_compile else run.model_dp
    run.params = [p for p in raw_model.parameters() if p.requires_grad]
    run.peak = cfg.peak_flops or peak_flops(run.device) or (cpu_matmul_flops() if run.device.type == "cpu" else None)
    run.fpt = float(flops_per_token(raw_model, cfg.seq_len))
    run.amp = autocast_for(run.device, cfg.precision)


def _progress_bar(cfg: TrainConfig, info: D.DistInfo, step: int) -> Any:
    if not (cfg.progress and info.is_main and step < cfg.max_steps):
        return None
    try:  # tqdm is optional for llm/: without it, log_interval lines on the logger show progress
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)


def _check_resume(path: Path, state: dict, meta: dict, raw_model: nn.Module) -> None:
    """Refuse to continue a run whose model, tokenizer, data or batch geometry changed; name every field."""
    problems = _diff(state.get("fingerprint", {}), meta["fingerprint"], "fingerprint")
    problems += _diff(state.get("model_config"), meta["model_config"], "model")
    shapes = {k: list(v.shape) for k, v in raw_model.state_dict().items()}
    if not problems:  # a model without a config: its parameter shapes still must agree
        problems += _diff(state.get("param_shapes", {}), shapes, "parameter")
    problems += _diff(state.get("geometry", {}), meta["geometry"], "batch")
    if problems:
        raise ResumeMismatch(
            f"cannot resume from {path}: the run changed since this checkpoint ("
            + "; ".join(problems[:8])
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            + "). Restore the original settings, or train into a new output folder to start fresh."
        )


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


# ------------------------------------------------------------------------------------------------------ one step


def _step(run: _Run, loop: LoopState, rec: _Record, data: Any) -> tuple[float, torch.Tensor]:
    """One optimizer step over `accum` micro batches; a non-finite loss or gradient skips the update.

    Returns the learning rate and the gradient norm; the loss goes to `rec`, the counters to `loop`."""
    cfg = run.cfg
    lr = lr_at(loop.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(run.accum):
        x, y = _next_batch(data, cfg, run.device)
        with _grad_sync(run.model_dp, run.info, cfg.parallel, last=micro == run.accum - 1):
            with run.amp:
                _, loss = run.fwd(x, y)
            (loss / run.accum).backward()
        loss_sum += loss.detach().float()
    step_loss = D.all_reduce_mean(loss_sum / run.accum, run.info)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    finite = bool(torch.isfinite(step_loss).item() and torch.isfinite(grad_norm).item())
    if finite:
        run.optimizer.step()
        loop.bad_streak = 0
    else:
        loop.bad_streak += 1
        loop.skipped_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    loop.step += 1
    loop.tokens += run.tokens_per_step
    rec.last_loss = step_loss.item()
    rec.losses.append((loop.step, rec.last_loss))
    if not finite:
        _bad_step(run, loop, rec, grad_norm)
    return lr, grad_norm


def _next_batch(data: Any, cfg: TrainConfig, device: torch.device) -> Batch:
    x, y = data.next_batch() if hasattr(data, "next_batch") else next(data)
    if x.shape != (cfg.micro_batch_size, cfg.seq_len):
        raise ValueError(
            f"the data source yielded a batch of shape {tuple(x.shape)} but TrainConfig asks for "
            f"micro_batch_size x seq_len = ({cfg.micro_batch_size}, {cfg.seq_len}); build the loader "
            "with the same sizes"
        )
    return x.to(device, dtype=torch.long, non_blocking=True), y.to(device, dtype=torch.long, non_blocking=True)


def _bad_step(run: _Run, loop: LoopState, rec: _Record, grad_norm: torch.Tensor) -> None:
    """Warn about a skipped update; stop once max_bad_steps of them came in a row."""
    cfg = run.cfg
    msg = (
        f"step {loop.step}: non-finite loss ({rec.last_loss}) or grad norm ({grad_norm.item()}); "
        f"update skipped ({loop.bad_streak} in a row, limit {cfg.max_bad_steps})"
    )
    if run.info.is_main:
        log.warning(msg)
    if loop.bad_streak >= cfg.max_bad_steps:
        raise TrainingDiverged(
            f"stopped after {loop.bad_streak} consecutive non-finite steps (TrainConfig.max_bad_steps="
            f"{cfg.max_bad_steps}); the weights were never updated with them. Last good checkpoint: "
            f"{rec.last_ckpt or 'none'}. Lower lr or check the data, then rerun to resume from it."
        )


def _grad_sync(model_dp: nn.Module, info: D.DistInfo, parallel: str, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro batch of an accumulation (one sync per step)."""
    if not info.enabled or last:
        if info.enabled and parallel == "fsdp":
            model_dp.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if parallel == "fsdp":
        model_dp.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model_dp.no_sync()


def _report(run: _Run, loop: LoopState, rec: _Record, hooks: _Hooks, bar: Any, lr: float,
            grad_norm: torch.Tensor, dt: float) -> None:
    """Rank 0: metrics to on_step every log_interval steps, and the progress bar (or a log line)."""
    cfg = run.cfg
    if not run.info.is_main:
        return
    metrics = {
        "train/loss": rec.last_loss,
        "train/lr": lr,
        "train/grad_norm": grad_norm.item(),
        "train/tokens_per_s": run.tokens_per_step / dt,
        "train/step_ms": dt * 1000,
    }
    if run.peak:
        metrics["train/mfu"] = run.fpt * run.tokens_per_step / dt / run.info.world_size / run.peak
    if hooks.on_step is not None and (loop.step % cfg.log_interval == 0 or loop.step == cfg.max_steps):
        if run.peak and not run.peak_logged:  # what the MFU is measured against
            metrics["train/peak_flops"] = run.peak
            run.peak_logged = True
        hooks.on_step(loop.step, metrics)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec.last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    elif cfg.progress and loop.step % max(cfg.log_interval, 10) == 0:
        log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", loop.step, cfg.max_steps, rec.last_loss, lr,
                 run.tokens_per_step / dt)


def _after_step(run: _Run, loop: LoopState, rec: _Record, hooks: _Hooks, data: Any) -> None:
    """Evaluate and checkpoint when their interval (or the last step) comes."""
    cfg = run.cfg
    done = loop.step == cfg.max_steps
    if (cfg.eval_interval and loop.step % cfg.eval_interval == 0) or done:
        _run_eval(run, rec, hooks, loop.step)
    due = (cfg.checkpoint_interval and loop.step % cfg.checkpoint_interval == 0) or done
    # during a bad streak the weights are fine but the trajectory is suspect: keep the last good one
    if run.ckpt is not None and due and loop.bad_streak == 0:
        rec.last_ckpt = run.ckpt.save(run.raw_model, run.optimizer, data, loop, run.meta)


def _run_eval(run: _Run, rec: _Record, hooks: _Hooks, step: int) -> None:
    """Validation metrics and sample generations, without touching the training RNG streams."""
    cfg, info = run.cfg, run.info
    with rng.preserved(run.device):
        if hooks.val_batches is not None:
            model = run.raw_model if run.fused else run.fwd
            rec.val = evaluate(model, hooks.val_batches(), run.device, cfg.precision, cfg.eval_batches,
                               hooks.bytes_per_token, info)
        if hooks.sample_fn is not None and (info.is_main or cfg.parallel == "fsdp"):
            rec.samples = hooks.sample_fn(run.raw_model)
    if info.is_main and hooks.on_eval is not None and rec.val:
        hooks.on_eval(step, dict(rec.val))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    precision: str = "auto",
    max_batches: int | None = None,
    bytes_per_token: float | None = None,
    info: D.DistInfo | None = None,
) -> dict[str, float]:
    """Mean validation loss (nats/token), perplexity, and bits per byte when bytes/token of the split is known.

    Bits per byte = loss / ln 2 / bytes_per_token: it does not depend on the tokenizer, so models with different
    vocabularies compare fairly.
    """
    info = info or D.DistInfo()
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = x.to(device, dtype=torch.long, non_blocking=True)
            y = y.to(device, dtype=torch.long, non_blocking=True)
            with autocast_for(device, precision):
                _, loss = model(x, y)
            total += loss.double()
            count += 1
    finally:
        model.train(was_training)
    if info.enabled:
        stacked = torch.stack([total, count])
        torch.distributed.all_reduce(stacked)
        total, count = stacked[0], stacked[1]
    if count.item() == 0:
        return {}
    loss = (total / count).item()
    out = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
    if bytes_per_token:
        out["val/bpb"] = loss / math.log(2) / bytes_per_token
    return out
