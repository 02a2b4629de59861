"""The pretraining loop: one CPU, one GPU, or many through torchrun (DDP / FSDP2), with exact resume.

    result = train(model, TrainConfig(max_steps=500, ...), train_data, ckpt_dir="run/checkpoints",
                   val_batches=lambda: val_loader.epoch(), fingerprint={"data": ..., "tokenizer": ...})

`train_data` is a resumable batch source: `next_batch() -> (inputs, targets)` (or `__next__`), `state_dict()` and
`load_state_dict(state)` (see llm/data.py). The model is any module with `model(idx, targets) -> (logits, loss)`.

Checkpoints (`ckpt_dir/step_00000100/`) hold everything needed to continue bit for bit: weights
(`model.safetensors`, plus `config.json` when the model has a config, so `llm.checkpoint.load_model` reads it),
optimizer moments (`optimizer.safetensors`), per-rank RNG states (`rng_rank{r}.safetensors`) and loader
positions (`rank{r}.json`), the step, schedule and fingerprints (`trainer_state.json`), and a sha256 manifest
written last. A checkpoint is built in `.step_N.tmp/` and renamed when complete, so a crash never leaves a
half-written folder under a final name; no pickle is ever written or read. Resume picks the newest checkpoint whose
files match the manifest (older ones are the fallback) and refuses one made for another model, tokenizer, data or
global batch.

Under torchrun (`torchrun --nproc-per-node=N ...`) the same call runs data parallel: DDP by default, FSDP2
(`parallel="fsdp"`) to shard parameters per block; rank 0 logs and writes the shared checkpoint files, every rank
writes its own RNG and loader state. On CUDA: bf16 autocast, TF32, torch.compile and fused AdamW. Everywhere: the
chunked LM-head + cross-entropy (`linear_cross_entropy`) that never materialises the full logits (on CUDA through
llm.kernels' Triton kernel; on CPU with every pass over the logits in place, in a buffer kept between steps).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from llm import distributed as D
from llm import kernels as K
from llm.checkpoint import replace_dir
from llm.optim import build_adamw, lr_at

log = logging.getLogger("llm.train")

Batch = tuple[torch.Tensor, torch.Tensor]

# Dense bf16 tensor-core peak per card, FLOP/s (vendor datasheets). First matching substring wins, so the more
# specific names come first.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


class TrainingError(Exception):
    """Base class of the loop's user-facing errors (the stage layer turns them into StageError)."""


class CheckpointError(TrainingError):
    """A checkpoint could not be written or no usable checkpoint could be read."""


class ResumeMismatch(TrainingError):
    """The checkpoint was made with a different model shape, tokenizer, data or batch geometry."""


class TrainingDiverged(TrainingError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainConfig:
    """Hyperparameters of the loop. Everything is per optimizer step unless it says micro batch."""

    max_steps: int = 1000  # optimizer steps in the whole run
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    seq_len: int = 256  # tokens per sequence (must match the batches the data source yields)
    tokens_per_step: int | None = None  # global tokens per optimizer step; None = one micro batch per rank
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 50  # linear warmup length
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases, embeddings)
    decay_embeddings: bool = False  # also decay embedding tables
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    eval_interval: int = 100  # evaluate every N steps (and at the end); 0 = only at the end
    eval_batches: int = 20  # validation batches per evaluation
    checkpoint_interval: int = 100  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept on disk
    max_bad_steps: int = 5  # consecutive non-finite steps tolerated before stopping
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 elsewhere) | "bf16" | "fp32"
    compile: str | bool = "auto"  # torch.compile: "auto" (on for CUDA) | True | False
    parallel: str = "ddp"  # under torchrun: "ddp" (replicate) or "fsdp" (FSDP2, shard per block)
    fused_loss: str | bool = "auto"  # chunked LM head + cross-entropy that never holds all logits: "auto" = on
    loss_chunk_tokens: int = 4096  # tokens per chunk of the fused loss
    loss_kernel: str | bool = "auto"  # fused loss's softmax gradient in llm.kernels' Triton kernel: "auto" (CUDA)
    seed: int = 1337
    log_interval: int = 1  # call on_step every N steps
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        positive = ["max_steps", "micro_batch_size", "seq_len", "keep_last", "max_bad_steps", "log_interval"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ["warmup_steps", "eval_interval", "checkpoint_interval", "eval_batches", "grad_clip"]:
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"TrainConfig.parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.fused_loss not in ("auto", True, False):
            raise ValueError(f"TrainConfig.fused_loss must be 'auto', true or false, got {self.fused_loss!r}")
        if self.loss_kernel not in ("auto", True, False):
            raise ValueError(f"TrainConfig.loss_kernel must be 'auto', true or false, got {self.loss_kernel!r}")
        if self.compile not in ("auto", True, False):
            raise ValueError(f"TrainConfig.compile must be 'auto', true or false, got {self.compile!r}")

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro batches per rank per optimizer step, so that the global batch hits tokens_per_step exactly."""
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


# ----------------------------------------------------------------------------------------------------------------
# device, precision, FLOPs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={name!r} but CUDA is not available; use 'auto' or 'cpu'")
    return dev


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 on CPU, where bf16 is slower."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (llm.utils' count for llm models; this generic estimate for any other module):: 6 x non-embedding params (fwd + bwd matmuls) + causal attention scores/values.

    The attention term is 12 x layers x d_model x seq_len for full attention (PaLM appendix B); counting it for the
    full square keeps the number comparable with nanoGPT/PaLM MFU figures.
    """
    from llm.config import ModelConfig

    if isinstance(getattr(model, "config", None), ModelConfig):
        from llm.utils import flops_per_token as llm_flops

        return float(llm_flops(model, seq_len))
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    n = sum(p.numel() for p in model.parameters()) - emb
    cfg = model_config(model)
    attn = 0.0
    if cfg is not None:
        n_layer, d = cfg.get("n_layer"), cfg.get("n_embd")
        if n_layer and d:
            attn = 12.0 * n_layer * d * seq_len
            # the LM head shares the embedding table when tied, but its matmul still costs 6 x V x d per token
            if cfg.get("tie_embeddings", False):
                n += cfg.get("padded_vocab_size", cfg.get("vocab_size", 0)) * d
    return 6.0 * n + attn


def model_config(model: nn.Module) -> dict | None:
    """The model's config as a dict (llm models carry `.config` / `.cfg` with `to_dict()`), else None."""
    for attr in ("config", "cfg"):
        cfg = getattr(model, attr, None)
        if cfg is None:
            continue
        if hasattr(cfg, "to_dict"):
            return dict(cfg.to_dict())
        with contextlib.suppress(TypeError):
            return asdict(cfg)
    return None


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

_STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
CKPT_FORMAT = "llm-pipeline/1"  # llm.checkpoint.FORMAT: a training checkpoint is also a model folder


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and fsync them. Every checkpoint byte goes through here (tests inject disk-full faults)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_file(path, (json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple | set):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint's JSON")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete-named checkpoint folders under `root`, newest first (temp folders are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def clean_partial(root: str | Path) -> list[Path]:
    """Remove checkpoint folders left half-written by a crash (`.step_N.tmp`, `.step_N.old-*`)."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and (p.name.endswith(".tmp") or ".old" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    for p in removed:
        log.warning("removed partial checkpoint %s (left by an interrupted write)", p)
    return removed


def verify_checkpoint(path: str | Path) -> None:
    """Check every file against the manifest (and that nothing is missing); raise CheckpointError naming the file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable ({e})") from e
    for name in (STATE, "model.safetensors", "optimizer.safetensors"):
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {name}")
    for name, digest in files.items():
        f = path / name
        if "/" in name or name.startswith(".") or not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(
                f"checkpoint file {f} does not match its sha256 in {MANIFEST} (corrupted or truncated)"
            )


def _safe_load(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only: a pickle (or anything else) under a checkpoint name is refused, never unpickled."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file ({e}); refusing to load it") from e


def _dedupe_shared(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied embeddings); safetensors stores each storage once."""
    out, aliases, seen = {}, {}, {}
    for k, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            out[k] = t.detach().contiguous().cpu()
    return out, aliases


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


@dataclass
class _LoopState:
    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    bad_streak: int = 0


class Checkpointer:
    """Writes and reads the loop's checkpoints under one folder, rank-aware (rank 0 writes shared files)."""

    def __init__(self, root: str | Path, info: D.DistInfo, keep_last: int):
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last

    # -- writing ---------------------------------------------------------------------------------------------

    def save(
        self,
        raw_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Any,
        loop: _LoopState,
        meta: dict[str, Any],
    ) -> Path:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # gathering is collective under FSDP: every rank calls it, rank 0 receives the full tensors
        model_sd = get_model_state_dict(raw_model, options=opts)
        optim_sd = get_optimizer_state_dict(raw_model, optimizer, options=opts)
        final = self.root / f"step_{loop.step:08d}"
        tmp = self.root / f".{final.name}.tmp"
        info = self.info
        try:
            if info.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            D.barrier(info)
            rank_state = {
                "data": data.state_dict(),
                "python_rng": _py_rng_state(),
                "numpy_rng": _np_rng_state(),
            }
            _write_json(tmp / f"rank{info.rank}.json", rank_state)
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                rng["cuda"] = torch.cuda.get_rng_state()
            _write_file(tmp / f"rng_rank{info.rank}.safetensors", save(rng))
            if info.is_main:
                tensors, aliases = _dedupe_shared(model_sd)
                _write_file(tmp / "model.safetensors", save(tensors))
                opt_tensors, opt_extra = {}, {}
                for fqn, st in optim_sd["state"].items():
                    for k, v in st.items():
                        if isinstance(v, torch.Tensor):
                            opt_tensors[f"{fqn}\x1f{k}"] = v.detach().contiguous().cpu()
                        else:
                            opt_extra.setdefault(fqn, {})[k] = v
                _write_file(tmp / "optimizer.safetensors", save(opt_tensors))
                if meta.get("model_config") is not None:  # llm.checkpoint's layout, so load_model reads it
                    _write_json(tmp / "config.json", {"format": CKPT_FORMAT, "model": meta["model_config"]})
                _write_json(
                    tmp / STATE,
                    {
                        **meta,
                        "loop": asdict(loop),
                        "aliases": aliases,
                        "param_shapes": {k: list(v.shape) for k, v in model_sd.items()},
                        "optimizer": {"param_groups": optim_sd["param_groups"], "extra_state": opt_extra},
                        "world_size": info.world_size,
                        "saved_at": time.time(),
                    },
                )
            D.barrier(info)
            if info.is_main:
                files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                _write_json(tmp / MANIFEST, {"step": loop.step, "files": files})
                _fsync_dir(tmp)
                replace_dir(tmp, final)  # re-reaching a step after a resume replaces the old copy once ours is whole
                _fsync_dir(self.root)
                self._prune()
            D.barrier(info)
        except OSError as e:
            if info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = next((p for s, p in list_checkpoints(self.root) if s != loop.step), None)
            why = "the disk is full" if e.errno == errno.ENOSPC else str(e)
            raise CheckpointError(
                f"could not write checkpoint {final}: {why}. Free space on {self.root} (or point the checkpoint "
                f"folder elsewhere) and rerun to resume; "
                + (f"the previous checkpoint {prev} is intact." if prev else "no earlier checkpoint exists.")
            ) from e
        return final

    def _prune(self) -> None:
        for _, p in list_checkpoints(self.root)[self.keep_last :]:
            shutil.rmtree(p, ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------------------------

    def latest_valid(self) -> Path | None:
        """Newest checkpoint whose files all match the manifest; corrupt ones are reported and skipped."""
        problems = []
        for _, path in list_checkpoints(self.root):
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                problems.append(str(e))
                log.warning("%s; falling back to an earlier checkpoint", e)
                continue
            return path
        if problems:
            raise CheckpointError(
                "no usable checkpoint to resume from: " + "; ".join(problems)
                + f". Delete {self.root} to start over."
            )
        return None

    def read_state(self, path: Path) -> dict[str, Any]:
        return json.loads((path / STATE).read_text())

    def load(
        self, path: Path, raw_model: nn.Module, optimizer: torch.optim.Optimizer, data: Any, state: dict
    ) -> _LoopState:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_sd = _safe_load(path / "model.safetensors")
        for dup, src in state["aliases"].items():
            model_sd[dup] = model_sd[src]
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(raw_model, model_sd, options=opts)

        flat = _safe_load(path / "optimizer.safetensors")
        opt_state: dict[str, dict[str, Any]] = {}
        for key, t in flat.items():
            fqn, name = key.split("\x1f")
            opt_state.setdefault(fqn, {})[name] = t
        for fqn, extra in state["optimizer"]["extra_state"].items():
            opt_state.setdefault(fqn, {}).update(extra)
        groups = state["optimizer"]["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        set_optimizer_state_dict(raw_model, optimizer, {"state": opt_state, "param_groups": groups}, options=opts)

        loop = _LoopState(**state["loop"])
        rank = self.info.rank
        if (path / f"rank{rank}.json").is_file() and state.get("world_size") == self.info.world_size:
            rng = _safe_load(path / f"rng_rank{rank}.safetensors")
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            rank_state = json.loads((path / f"rank{rank}.json").read_text())
            _set_py_rng_state(rank_state["python_rng"])
            _set_np_rng_state(rank_state["numpy_rng"])
        else:
            # a different number of ranks: the data position is global (same global batch), so rank 0's loader
            # state serves every rank; dropout RNG streams are re-derived, so this resume is exact in data
            # order but not bit for bit
            log.warning("resuming %s on %d ranks (saved on %s): RNG streams re-seeded", path,
                        self.info.world_size, state.get("world_size"))
            rank_state = json.loads((path / "rank0.json").read_text())
            _seed_everything(int(state["train_config"]["seed"]) + 1000 * loop.step, rank)
        data.load_state_dict(rank_state["data"])
        return loop


def _py_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_py_rng_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def _np_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_np_rng_state(s: list) -> None:
    np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4]))


# ----------------------------------------------------------------------------------------------------------------
# fused LM head + cross-entropy


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ w.T` computed chunk by chunk, with the gradients made in the same pass.

    The usual path keeps (tokens x vocab) logits in bf16, a float32 copy and the log-softmax for backward: for
    GPT-2 at 16k tokens per micro batch that is ~10 GB. Here each chunk's logits live only while its softmax
    gradient (softmax - one-hot) is turned into grad_h and grad_w, so the same three matmuls run with O(chunk x
    vocab) memory and no extra recompute. Rows of `w` past `vocab` (padding for fast matmuls) get -inf logits.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int, chunk: int,
                kernel: bool, workspace: dict | None):
        dev = h.device.type
        # matmuls in the autocast dtype when autocast is on (bf16 on CUDA), else in h's dtype; softmax in fp32
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1).float()
        scale = valid.float() / n_valid  # each valid token's share of the mean
        grad_h = torch.empty_like(h)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        in_place = cd == torch.float32 and h.dtype == torch.float32 and not torch.compiler.is_compiling()
        # in place, the first chunk's matmul writes grad_w (no zero-filled (V, C) buffer to add to)
        grad_w = None if in_place else torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        buf = None
        if in_place and not kernel and workspace is not None and dev == "cpu":
            # CPU: the logits go to a buffer kept across steps. A fresh one per step is a new mapping of 16+ MB
            # that the OS zero-fills page by page on first touch; that made the LM-head matmul a third slower.
            rows = min(chunk, h.shape[0])
            buf = workspace.get("logits")
            if buf is None or buf.shape[0] < rows or buf.shape[1] != w.shape[0]:
                buf = workspace["logits"] = torch.empty(rows, w.shape[0], dtype=torch.float32)
        with torch.autocast(dev, enabled=False):
            wc = w.to(cd)
            for s in range(0, h.shape[0], chunk):
                hc, tc, vc, sc = h[s : s + chunk].to(cd), targets[s : s + chunk], valid[s : s + chunk], scale[s : s + chunk]
                if kernel:  # Triton: two passes over the logits in their own dtype, no float32 copy
                    g, row_loss = K.ce_grad(hc @ wc.t(), tc, sc, vocab)
                    total += row_loss.sum()
                else:
                    # (n, V_padded) logits, then every pass over them in place: no other temporary of that size
                    # (on CPU a fresh 16 MB buffer costs more in page faults than the arithmetic on it)
                    logits = (hc @ wc.t()).float() if buf is None else torch.mm(hc, wc.t(), out=buf[: hc.shape[0]])
                    if w.shape[0] > vocab:
                        logits[:, vocab:] = float("-inf")
                    tgt = tc.clamp(min=0)[:, None]
                    row_max = logits.amax(1, keepdim=True)
                    z_tgt = logits.gather(1, tgt)
                    sum_exp = logits.sub_(row_max).exp_().sum(1, keepdim=True)
                    total += ((row_max + sum_exp.log() - z_tgt).squeeze(1) * vc).sum()  # lse - target logit
                    g = logits.mul_(sc[:, None] / sum_exp)  # softmax * each row's share of the mean
                    g = g.scatter_add_(1, tgt, -sc[:, None]).to(cd)  # - one-hot * share
                if in_place:  # fp32 eager: grad_h's rows written and grad_w accumulated by the matmuls themselves
                    torch.mm(g, wc, out=grad_h[s : s + chunk])
                    grad_w = torch.mm(g.t(), hc) if grad_w is None else grad_w.addmm_(g.t(), hc)
                else:
                    grad_h[s : s + chunk] = g @ wc
                    grad_w += (g.t() @ hc).float()
        if grad_w is None:  # no rows at all
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out).to(ctx.w_dtype), None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int | None = None, chunk: int = 4096,
    kernel: bool | str = "auto", workspace: dict | None = None,
) -> torch.Tensor:
    """cross_entropy((h @ w.T)[:, :vocab], targets, ignore_index=-100) without materialising all logits.

    h (N, C), w (V_padded, C), targets (N,). Same value and gradients as the plain path (up to rounding).
    kernel: the softmax gradient through llm.kernels' Triton kernel ("auto": where it can run, i.e. CUDA with
    Triton installed) or plain torch ops (False).
    workspace: a dict the caller keeps across calls; on CPU (fp32, eager) the logits buffer is kept in it instead of
    being allocated afresh each call.
    """
    ok = K.available(h.device)
    use = ok if kernel == "auto" else bool(kernel)
    if use and not ok:
        raise ValueError(f"the fused loss's Triton kernel (loss_kernel / kernel=True) cannot run on {h.device}: it "
                         "needs a CUDA tensor and Triton installed; use loss_kernel 'auto' or 'off'")
    return _LinearCrossEntropy.apply(h, w, targets, vocab or w.shape[0], chunk, use, workspace)


class FusedLossLM(nn.Module):
    """`model(idx, targets) -> (None, loss)` through the fused head + loss (for llm models: hidden_states + lm_head).

    It owns no parameters of its own, so DDP / torch.compile can wrap it while checkpoints keep the inner model's
    names. On CPU it keeps one chunk's logits buffer (chunk x padded vocab, fp32) between steps.
    """

    def __init__(self, model: nn.Module, chunk: int = 4096, kernel: bool | str = "auto"):
        super().__init__()
        self.model, self.chunk, self.kernel = model, chunk, kernel
        self._workspace: dict = {}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        h = self.model.hidden_states(idx)
        w = self.model.lm_head.weight
        ws = None if torch.compiler.is_compiling() else self._workspace  # the loss uses it on CPU only
        loss = linear_cross_entropy(h.flatten(0, 1), w, targets.flatten(), self.model.config.vocab_size, self.chunk,
                                    self.kernel, ws)
        return None, loss


def allow_tf32(device: torch.device) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (training sets it; the benches set it the same way)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def check_loss_kernel(cfg: TrainConfig, device: torch.device) -> None:
    """ValueError when loss_kernel is forced on where the Triton kernel cannot run (before anything is written)."""
    if cfg.loss_kernel is True and cfg.fused_loss is not False and not K.available(device):
        raise ValueError(f"TrainConfig.loss_kernel is on but the fused loss's Triton kernel cannot run on {device} "
                         "(it needs CUDA and Triton installed); set loss_kernel to 'auto' or 'off'")


def supports_fused_loss(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("hidden_states", "lm_head", "config"))


# ----------------------------------------------------------------------------------------------------------------
# the loop


def _next_batch(data: Any) -> Batch:
    return data.next_batch() if hasattr(data, "next_batch") else next(data)


def _seed_everything(seed: int, rank: int) -> None:
    # ranks draw different dropout masks; the data order comes from the data source's own seed
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


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
      train/tokens_per_s, train/mfu on CUDA; val/loss, val/ppl, val/bpb).
    sample_fn(model) -> rows: generations from fixed prompts at each evaluation (rank 0; RNG state is preserved
      around it, so sampling never changes the training trajectory).
    """
    device = resolve_device(cfg.device)
    check_loss_kernel(cfg, device)
    info = D.init_distributed(device.type)
    allow_tf32(device)
    accum = cfg.grad_accum_steps(info.world_size)
    tokens_per_step = cfg.micro_batch_size * cfg.seq_len * accum * info.world_size

    raw_model = model.to(device)
    raw_model.train()
    _seed_everything(cfg.seed, info.rank)
    model_cfg = model_config(raw_model)
    meta = {
        "fingerprint": dict(fingerprint or {}),
        "model_config": model_cfg,
        # the data position is global, so the world size may change on resume; the global batch may not
        "geometry": {"seq_len": cfg.seq_len, "tokens_per_step": tokens_per_step},
        "train_config": asdict(cfg),
    }

    ckpt = Checkpointer(ckpt_dir, info, cfg.keep_last) if ckpt_dir is not None else None
    resume_path: Path | None = None
    if ckpt is not None:
        if info.is_main:
            clean_partial(ckpt.root)
            if not resume and list_checkpoints(ckpt.root):
                raise CheckpointError(
                    f"{ckpt.root} already holds checkpoints of an earlier run and resume is off; delete the folder "
                    "or enable resume"
                )
            resume_path = ckpt.latest_valid() if resume else None
        resume_path = D.broadcast_object(resume_path, info)

    loop = _LoopState()
    if resume_path is not None:
        state = ckpt.read_state(resume_path)
        _check_resume(resume_path, state, meta, raw_model)

    # FSDP2 gathers parameters in the root module's forward, which the fused loss would bypass
    # "auto" is on everywhere: less memory on GPUs, and on CPU 10-20 % faster steps for the tiny presets
    fused = cfg.fused_loss in (True, "auto") and supports_fused_loss(raw_model)
    fused = fused and not (info.enabled and cfg.parallel == "fsdp")
    trained = FusedLossLM(raw_model, cfg.loss_chunk_tokens, cfg.loss_kernel) if fused else raw_model
    # data parallel wrapping before the optimizer, so FSDP2's sharded parameters are what AdamW updates
    model_dp = D.wrap_model(trained, info, cfg.parallel, device)
    optimizer = build_adamw(
        raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, cfg.decay_embeddings
    )
    if resume_path is not None:
        loop = ckpt.load(resume_path, raw_model, optimizer, train_data, state)
        if info.is_main:
            log.info("resumed from %s (step %d)", resume_path, loop.step)
    resumed_from = loop.step

    use_compile = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    fwd = torch.compile(model_dp) if use_compile else model_dp
    params = [p for p in raw_model.parameters() if p.requires_grad]
    peak = peak_flops(device)
    fpt = flops_per_token(raw_model, cfg.seq_len)
    amp = autocast_for(device, cfg.precision)

    losses: list[tuple[int, float]] = []
    val: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    last_ckpt = resume_path
    last_loss = float("nan")
    t_start = time.perf_counter()
    bar = None
    if cfg.progress and info.is_main and loop.step < cfg.max_steps:
        try:  # tqdm is optional for llm/: without it, log_interval lines on the logger show progress
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=loop.step, desc="pretrain", unit="step", dynamic_ncols=True)
        except ImportError:
            pass

    def run_eval(step: int) -> None:
        nonlocal val, samples
        with _preserved_rng(device):
            if val_batches is not None:
                val = evaluate(fwd if not fused else raw_model, val_batches(), device, cfg.precision, cfg.eval_batches, bytes_per_token, info)
            if sample_fn is not None and (info.is_main or cfg.parallel == "fsdp"):
                samples = sample_fn(raw_model)
        if info.is_main and on_eval is not None and val:
            on_eval(step, dict(val))

    try:
        while loop.step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(loop.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = _next_batch(train_data)
                if x.shape != (cfg.micro_batch_size, cfg.seq_len):
                    raise ValueError(
                        f"the data source yielded a batch of shape {tuple(x.shape)} but TrainConfig asks for "
                        f"micro_batch_size x seq_len = ({cfg.micro_batch_size}, {cfg.seq_len}); build the loader "
                        "with the same sizes"
                    )
                x = x.to(device, dtype=torch.long, non_blocking=True)
                y = y.to(device, dtype=torch.long, non_blocking=True)
                with _grad_sync(model_dp, info, cfg.parallel, last=micro == accum - 1):
                    with amp:
                        _, loss = fwd(x, y)
                    (loss / accum).backward()
                loss_sum += loss.detach().float()
            step_loss = D.all_reduce_mean(loss_sum / accum, info)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            finite = bool(torch.isfinite(step_loss).item() and torch.isfinite(grad_norm).item())
            if finite:
                optimizer.step()
                loop.bad_streak = 0
            else:
                loop.bad_streak += 1
                loop.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            loop.tokens += tokens_per_step
            last_loss = step_loss.item()
            losses.append((loop.step, last_loss))
            if not finite:
                msg = (
                    f"step {loop.step}: non-finite loss ({last_loss}) or grad norm ({grad_norm.item()}); "
                    f"update skipped ({loop.bad_streak} in a row, limit {cfg.max_bad_steps})"
                )
                if info.is_main:
                    log.warning(msg)
                if loop.bad_streak >= cfg.max_bad_steps:
                    raise TrainingDiverged(
                        f"stopped after {loop.bad_streak} consecutive non-finite steps (TrainConfig.max_bad_steps="
                        f"{cfg.max_bad_steps}); the weights were never updated with them. Last good checkpoint: "
                        f"{last_ckpt or 'none'}. Lower lr or check the data, then rerun to resume from it."
                    )

            dt = time.perf_counter() - t0
            if info.is_main:
                metrics = {
                    "train/loss": last_loss,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm.item(),
                    "train/tokens_per_s": tokens_per_step / dt,
                    "train/step_ms": dt * 1000,
                }
                if peak:
                    metrics["train/mfu"] = fpt * tokens_per_step / dt / info.world_size / peak
                if on_step is not None and (loop.step % cfg.log_interval == 0 or loop.step == cfg.max_steps):
                    on_step(loop.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                elif cfg.progress and loop.step % max(cfg.log_interval, 10) == 0:
                    log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", loop.step, cfg.max_steps, last_loss, lr,
                             tokens_per_step / dt)

            done = loop.step == cfg.max_steps
            if (cfg.eval_interval and loop.step % cfg.eval_interval == 0) or done:
                run_eval(loop.step)
            due = (cfg.checkpoint_interval and loop.step % cfg.checkpoint_interval == 0) or done
            # during a bad streak the weights are fine but the trajectory is suspect: keep the last good one
            if ckpt is not None and due and loop.bad_streak == 0:
                last_ckpt = ckpt.save(raw_model, optimizer, train_data, loop, meta)
    finally:
        if bar is not None:
            bar.close()

    if resumed_from >= cfg.max_steps and (val_batches is not None or sample_fn is not None):
        run_eval(loop.step)  # nothing left to train: still report the finished model
    return TrainResult(
        step=loop.step,
        train_loss=last_loss,
        val=val,
        losses=losses,
        skipped_steps=loop.skipped_steps,
        tokens=loop.tokens,
        seconds=time.perf_counter() - t_start,
        resumed_from=resumed_from,
        checkpoint=last_ckpt,
        samples=samples,
    )


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


@contextlib.contextmanager
def _preserved_rng(device: torch.device):
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield
    random.setstate(py)
    np.random.set_state(npy)


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
