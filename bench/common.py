"""Small helpers every bench script shares: device choice, synchronized timing, and the --json last line."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from llm.device import resolve_device
from llm.utils import FLAG_METAVAR, parse_flag


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes: finishes in under a minute on 2 CPU cores")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results as the last line")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")


def add_repeat_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """--quick, --json and --repeats of the benches that time our stage against a baseline, best of N runs."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side; the best is kept")


def add_loss_args(parser: argparse.ArgumentParser) -> None:
    """--fused-loss and --loss-kernel, as the training benches share them."""
    parser.add_argument("--fused-loss", default="auto", type=parse_flag, metavar=FLAG_METAVAR,
                        help="our chunked LM head + cross-entropy (auto: on, as in llm.train)")
    parser.add_argument("--loss-kernel", default="auto", type=parse_flag, metavar=FLAG_METAVAR,
                        help="fused loss: llm.kernels' Triton softmax-gradient kernel (auto: where it can run, i.e. "
                        "CUDA with Triton)")


def check_loss_args(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device) -> bool:
    """Whether the fused loss is on; a usage error when --loss-kernel true names a device the kernel cannot run on."""
    from llm import kernels as K

    fused = args.fused_loss is not False
    if fused and args.loss_kernel is True and not K.available(device):
        parser.error(f"--loss-kernel true: the Triton kernel cannot run on {device} (needs CUDA + triton, or "
                     "TRITON_INTERPRET=1 on CPU); use --loss-kernel auto or false")
    return fused


def pick_device(name: str) -> torch.device:
    """--device as llm.device resolves it; a name that cannot be used here ends the bench with the reason."""
    try:
        return resolve_device(name, "--device")
    except ValueError as e:
        raise SystemExit(str(e)) from None


def alternate(fns: dict[str, Callable[[], Any]], repeats: int,
              after: Callable[[str], Any] | None = None) -> dict[str, float]:
    """Best wall time per function; the sides alternate so that load from other processes hits both alike.
    `after(name)` runs untimed after each call (e.g. to remove what it wrote)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if after is not None:
                after(name)
    return {k: min(v) for k, v in times.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of one call, with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per candidate, running them in turn (A B A B ...) so load drift hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(time_call(fn, device)[0])
    return {k: statistics.median(v) for k, v in times.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print the result; with --json the last line is one JSON object."""
    if as_json:
        print(json.dumps(result, sort_keys=True))
