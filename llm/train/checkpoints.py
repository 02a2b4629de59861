"""Training checkpoints: everything needed to continue a run bit for bit, written so a crash never leaves a
half-written folder under a final name, and verified against a sha256 manifest before it is read.

A checkpoint (`root/step_00000100/`) holds the weights (`model.safetensors`, plus `config.json` when the model has a
config, so it is also a model folder that `llm.checkpoint.load_model` reads), the optimizer moments
(`optimizer.safetensors`), per-rank RNG states (`rng_rank{r}.safetensors`) and loader positions (`rank{r}.json`), the
step, schedule and fingerprints (`trainer_state.json`), and the manifest, written last. No pickle is ever written or
read.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from llm import distributed as D
from llm.checkpoint import CONFIG, FORMAT, WEIGHTS, _aliases, _unique_tensors
from llm.files import fsync_dir, replace_dir, sha256_file
from llm.train import rng
from llm.train.config import CheckpointError, LoopState

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"


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
    for name in (STATE, WEIGHTS, OPTIMIZER):
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {name}")
    for name, digest in files.items():
        f = path / name
        if "/" in name or name.startswith(".") or not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(
                f"checkpoint file {f} does not match its sha256 in {MANIFEST} (corrupted or truncated)"
            )


def _safe_load(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only: a pickle (or anything else) under a checkpoint name is refused, never unpickled."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file ({e}); refusing to load it") from e


class Checkpointer:
    """Writes and reads the loop's checkpoints under one folder, rank-aware (rank 0 writes shared files)."""

    def __init__(self, root: str | Path, info: D.DistInfo, keep_last: int):
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last

    # -- writing ---------------------------------------------------------------------------------------------

    def save(self, raw_model: nn.Module, optimizer: torch.optim.Optimizer, data: Any, loop: LoopState,
             meta: dict[str, Any]) -> Path:
        """Write `step_N/` for the loop's step (every rank calls it); CheckpointError when the disk refuses."""
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
            _write_json(tmp / f"rank{info.rank}.json", {"data": data.state_dict(), **rng.host_state()})
            _write_file(tmp / f"rng_rank{info.rank}.safetensors", save(rng.torch_state()))
            if info.is_main:
                _write_shared(tmp, model_sd, optim_sd, {**meta, "loop": asdict(loop), "world_size": info.world_size})
            D.barrier(info)
            if info.is_main:
                self._publish(tmp, final, loop.step)
            D.barrier(info)
        except OSError as e:
            if info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if not info.is_main and not tmp.exists():
                raise CheckpointError(
                    f"could not write checkpoint {final}: rank {info.rank} does not see the folder rank 0 created "
                    f"({tmp}). With several machines, the output folder must be on storage every machine sees at "
                    "the same path (e.g. a shared file system); point the run's output folder there and rerun."
                ) from e
            raise self._write_error(final, loop.step, e) from e
        return final

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        """Seal the finished folder with its manifest and rename it into place; then drop the oldest ones."""
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / MANIFEST, {"step": step, "files": files})
        fsync_dir(tmp)
        replace_dir(tmp, final)  # re-reaching a step after a resume replaces the old copy once ours is whole
        for _, p in list_checkpoints(self.root)[self.keep_last :]:
            shutil.rmtree(p, ignore_errors=True)

    def _write_error(self, final: Path, step: int, e: OSError) -> CheckpointError:
        prev = next((p for s, p in list_checkpoints(self.root) if s != step), None)
        why = "the disk is full" if e.errno == errno.ENOSPC else str(e)
        return CheckpointError(
            f"could not write checkpoint {final}: {why}. Free space on {self.root} (or point the checkpoint "
            f"folder elsewhere) and rerun to resume; "
            + (f"the previous checkpoint {prev} is intact." if prev else "no earlier checkpoint exists.")
        )

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
    ) -> LoopState:
        """Restore weights, optimizer, RNG streams and the data position from `path`; return the loop counters."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_sd = _safe_load(path / WEIGHTS)
        for dup, src in state["aliases"].items():
            model_sd[dup] = model_sd[src]
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(raw_model, model_sd, options=opts)
        optim_sd = _read_optimizer(path, state["optimizer"])
        set_optimizer_state_dict(raw_model, optimizer, optim_sd, options=opts)
        loop = LoopState(**state["loop"])
        data.load_state_dict(self._restore_rank(path, state, loop.step)["data"])
        return loop

    def _restore_rank(self, path: Path, state: dict, step: int) -> dict[str, Any]:
        """This rank's RNG streams back in place; returns its saved state (with the loader position)."""
        rank = self.info.rank
        if (path / f"rank{rank}.json").is_file() and state.get("world_size") == self.info.world_size:
            rng.set_torch_state(_safe_load(path / f"rng_rank{rank}.safetensors"))
            rank_state = json.loads((path / f"rank{rank}.json").read_text())
            rng.set_host_state(rank_state)
            return rank_state
        # a different number of ranks: the data position is global (same global batch), so rank 0's loader
        # state serves every rank; dropout RNG streams are re-derived, so this resume is exact in data
        # order but not bit for bit
        log.warning("resuming %s on %d ranks (saved on %s): RNG streams re-seeded", path,
                    self.info.world_size, state.get("world_size"))
        rng.seed_everything(int(state["train_config"]["seed"]) + 1000 * step, rank)
        return json.loads((path / "rank0.json").read_text())


def _write_shared(tmp: Path, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any],
                  state: dict[str, Any]) -> None:
    """Rank 0's files: weights (shared tensors once), optimizer moments, model config and trainer state."""
    _write_file(tmp / WEIGHTS, save(_unique_tensors(model_sd)))
    opt_tensors, opt_extra = {}, {}
    for fqn, st in optim_sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                opt_tensors[f"{fqn}\x1f{k}"] = v.detach().contiguous().cpu()
            else:
                opt_extra.setdefault(fqn, {})[k] = v
    _write_file(tmp / OPTIMIZER, save(opt_tensors))
    if state.get("model_config") is not None:  # llm.checkpoint's layout, so load_model reads it
        _write_json(tmp / CONFIG, {"format": FORMAT, "model": state["model_config"]})
    _write_json(tmp / STATE, {
        **state,
        "aliases": _aliases(model_sd),
        "param_shapes": {k: list(v.shape) for k, v in model_sd.items()},
        "optimizer": {"param_groups": optim_sd["param_groups"], "extra_state": opt_extra},
        "saved_at": time.time(),
    })


def _read_optimizer(path: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state dict from its flat safetensors file plus the non-tensor state in trainer_state.json."""
    opt_state: dict[str, dict[str, Any]] = {}
    for key, t in _safe_load(path / OPTIMIZER).items():
        fqn, name = key.split("\x1f")
        opt_state.setdefault(fqn, {})[name] = t
    for fqn, extra in saved["extra_state"].items():
        opt_state.setdefault(fqn, {}).update(extra)
    groups = saved["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": opt_state, "param_groups": groups}
