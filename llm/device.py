"""Which device to run on, at which precision, and what it can do: one home for every layer's device choice."""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch

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


def resolve_device(name: str = "auto", setting: str = "device") -> torch.device:
    """"auto" picks this process's CUDA card (LOCAL_RANK under torchrun) when there is one, else the CPU.

    An explicit CUDA device on a machine without CUDA is a ValueError naming `setting`, the field the user set.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{setting}={name!r} is not a device name; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting}={name!r} but CUDA is not available; use 'auto' or 'cpu'")
    return dev


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 on CPU, where bf16 is slower."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak (for MFU), or None where it is not known (CPUs, unlisted cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


@functools.cache
def cpu_matmul_flops(n: int = 512, seconds: float = 0.3) -> float:
    """This CPU's fp32 matmul rate with torch's threads, best of a few tenths of a second: the practical peak that a
    CPU run's MFU is measured against (no datasheet figure holds for every CPU and thread count)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, caches
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def allow_tf32(device: torch.device) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (training sets it; the benches set it the same way)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
