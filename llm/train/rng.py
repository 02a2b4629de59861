"""Random number streams of one training process: seeding, saving and restoring them, and sampling without
disturbing them."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, rank: int) -> None:
    # ranks draw different dropout masks; the data order comes from the data source's own seed
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def host_state() -> dict[str, list]:
    """Python's and NumPy's generator states as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python_rng": [version, list(internal), gauss],
            "numpy_rng": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_host_state(state: dict[str, Any]) -> None:
    py, npy = state["python_rng"], state["numpy_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))


def torch_state() -> dict[str, torch.Tensor]:
    """torch's CPU generator state, and the current CUDA card's once CUDA is in use."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_torch_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def preserved(device: torch.device) -> Iterator[None]:
    """Run a block (evaluation, sampling) without changing any generator the training trajectory draws from."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield
    random.setstate(py)
    np.random.set_state(npy)
