"""Where a training step's time goes: our step (forward, backward, clip, fused AdamW) timed, then profiled.

Prints tokens/s and MFU of the step, the share of the step the GPU is busy, GPU time by kernel kind (matmuls,
attention, compiler-generated fused kernels, optimizer, casts/copies, other) and the top kernels. Knobs are the
ones that move throughput: micro-batch, the fused loss's chunk size, torch.compile's mode.
  python -m bench.step_profile --device cuda                        # gpt2-124m, seq 1024, micro-batch 16, compiled
  python -m bench.step_profile --device cuda --batch 32 --chunk 16384 --mode max-autotune-no-cudagraphs
  python -m bench.step_profile --quick                              # CPU, tiny preset, eager (operators, not kernels)
`--json`: the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from bench.common import (
    add_common_args,
    add_loss_args,
    check_loss_args,
    device_name,
    emit,
    pick_device,
    sync,
    time_call,
)
from bench.pretrain import make_step
from llm import kernels as K
from llm.config import PRESETS, get_config
from llm.device import allow_tf32, autocast_for, peak_flops
from llm.loss import FusedLossLM
from llm.model import build_model
from llm.optim import build_adamw
from llm.train import TrainConfig
from llm.utils import FLAG_METAVAR, flops_per_token, parse_flag

# kernel kind by name, first match wins (cuBLAS/cuBLASLt GEMMs are sm90_xmma*, nvjet*, cutlass*, *gemm*)
KINDS = [
    ("attention", re.compile(r"flash|fmha|attention|cudnn", re.I)),
    ("matmul", re.compile(r"^triton_tem|gemm|xmma|nvjet|cutlass|cublas|wgmma|splitk|aten::(mm|addmm|bmm|linear)$", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|norm_kernel|lpnorm", re.I)),
    ("fused (compiler)", re.compile(r"^triton|^cpp_fused", re.I)),
    ("cast/copy", re.compile(r"copy|cast|to_copy|convert|memcpy|memset|fill", re.I)),
]


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if pat.search(name):
            return kind
    return "other"


def kernel_times(prof, on_cuda: bool) -> dict[str, tuple[int, float]]:
    """name -> (calls, total µs) of device kernels (CUDA) or operators' self time (CPU) in a profile."""
    out: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if on_cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue  # annotations (e.g. Optimizer.step) span kernels that are counted themselves
            us = e.time_range.elapsed_us()
        else:
            us = e.self_cpu_time_total  # self time: an operator's children are not counted twice
        rec = out[e.name]
        rec[0] += 1
        rec[1] += us
    return {k: (v[0], v[1]) for k, v in out.items()}


def idle_gaps(kernels: list[tuple[float, float, str]], min_us: float = 20.0) -> tuple[float, list[tuple]]:
    """(total idle µs, gaps) between device kernels given as (start µs, end µs, name), overlaps merged; each gap
    is (µs, kernel before, kernel after), longest first, gaps under `min_us` left out of the list (not the total)."""
    gaps, idle = [], 0.0
    ks = sorted(kernels)
    if not ks:
        return 0.0, []
    end, last = ks[0][1], ks[0][2]
    for start, stop, name in ks[1:]:
        if start > end:
            idle += start - end
            if start - end >= min_us:
                gaps.append((start - end, last, name))
        if stop >= end:
            end, last = stop, name
    return idle, sorted(gaps, reverse=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model preset (default tiny with --quick or on CPU, gpt2-124m on CUDA)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 128 on CPU, 1024 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 8 on CPU, 16 on CUDA)")
    parser.add_argument("--chunk", type=int, default=None, help="fused loss: tokens per chunk (default: TrainConfig.loss_chunk_tokens)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    add_loss_args(parser)
    parser.add_argument("--compile", default="auto", type=parse_flag, metavar=FLAG_METAVAR,
                        help="torch.compile the model (auto: on CUDA)")
    parser.add_argument("--mode", default=None, help="torch.compile mode",
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotune)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler")
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    parser.add_argument("--trace", default=None, help="also write the profile as a Chrome trace (JSON) to this file")
    args = parser.parse_args(argv)
    if args.accum < 1:
        parser.error("--accum must be >= 1")
    if args.chunk is not None and args.chunk < 1:
        parser.error("--chunk must be >= 1")
    args.device = pick_device(args.device)
    args.fused = check_loss_args(parser, args, args.device)
    return args


def build_step(args: argparse.Namespace) -> dict[str, Any]:
    """The model, its optimizer and one training step on a fixed random batch, as the knobs ask."""
    device, fused = args.device, args.fused
    cuda = device.type == "cuda"
    allow_tf32(device)
    preset = args.preset or ("gpt2-124m" if cuda and not args.quick else "tiny")
    seq = args.seq or (1024 if cuda and not args.quick else 128)
    batch = args.batch or (16 if cuda and not args.quick else 8)
    compiled = args.compile is True or (args.compile == "auto" and cuda)
    cfg = get_config(preset, max_seq_len=max(seq, get_config(preset).max_seq_len))
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = build_adamw(model, 3e-4, 0.1, fused=True)
    kernel = args.loss_kernel
    trained = FusedLossLM(model, args.chunk or TrainConfig.loss_chunk_tokens, kernel) if fused else model
    run = torch.compile(trained, mode=args.mode) if compiled else trained
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    step = make_step(lambda: run(inp, tgt)[1], model, opt, lambda: autocast_for(device, "auto"), args.accum)
    return {"cfg": cfg, "preset": preset, "seq": seq, "batch": batch, "compiled": compiled, "step": step,
            "chunk": getattr(trained, "chunk", None),
            "loss_kernel": fused and (K.available(device) if kernel == "auto" else bool(kernel))}


def measure(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, then the median step time, tokens/s, MFU and peak memory."""
    device, step = args.device, run["step"]
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    secs = statistics.median(time_call(step, device)[0] for _ in range(args.steps or (20 if cuda else 5)))
    tps = run["batch"] * run["seq"] * args.accum / secs
    peak = peak_flops(device)
    return {"tokens_per_s": tps, "step_ms": secs * 1000,
            "mfu": flops_per_token(run["cfg"], run["seq"]) * tps / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "warmup_s": round(warm_s, 1)}


def profile_steps(args: argparse.Namespace, step: Callable[[], Any]) -> dict[str, Any]:
    """Kernel (CUDA) or operator (CPU) time per step, by kind, and the GPU's idle gaps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(args.device)
    with profile(activities=acts) as prof:
        for _ in range(args.profile_steps):
            step()
        sync(args.device)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    gaps: list[tuple] = []
    idle_us = 0.0
    if cuda:
        spans = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        idle_us, gaps = idle_gaps(spans)
    per_step = {k: (n / args.profile_steps, us / args.profile_steps / 1000) for k, (n, us) in
                kernel_times(prof, cuda).items()}
    by_kind: dict[str, float] = defaultdict(float)
    for name, (_, ms) in per_step.items():
        by_kind[kind_of(name)] += ms
    return {"per_step": per_step, "busy_ms": sum(ms for _, ms in per_step.values()), "by_kind_ms": dict(by_kind),
            "idle_ms": idle_us / args.profile_steps / 1000 if cuda else None, "gaps": gaps}


def print_report(args: argparse.Namespace, run: dict[str, Any], m: dict[str, Any], prof: dict[str, Any]) -> None:
    chunk, step_ms, busy_ms = run["chunk"], m["step_ms"], prof["busy_ms"]
    loss = f"chunk {chunk}" + (" + Triton kernel" if run["loss_kernel"] else "") if args.fused else "off"
    print(f"{run['preset']} seq {run['seq']} micro-batch {run['batch']} {'compiled' if run['compiled'] else 'eager'}"
          f"{' mode ' + args.mode if args.mode else ''}, accum {args.accum}, fused loss {loss}: "
          f"{m['tokens_per_s']:,.0f} tok/s, {step_ms:.1f} ms/step" + (f", MFU {m['mfu']:.1%}" if m["mfu"] else "")
          + (f", peak mem {m['peak_mem_gib']:.1f} GiB" if m["peak_mem_gib"] else "")
          + f" (warm-up {m['warmup_s']:.0f} s)")
    what = "GPU kernels" if args.device.type == "cuda" else "CPU operators"
    print(f"{what}: {busy_ms:.1f} ms per step = {busy_ms / step_ms:.0%} of the step")
    for kind, ms in sorted(prof["by_kind_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<18} {ms:8.2f} ms  {ms / step_ms:6.1%}")
    if prof["gaps"]:
        print(f"GPU idle between kernels: {prof['idle_ms']:.2f} ms per step; longest gaps:")
        for us, before, after in prof["gaps"][:8]:
            print(f"  {us / 1000:6.2f} ms after {before[:60]}  before {after[:60]}")
    print(f"top {args.top} {what} (calls and ms per step):")
    for name, (n, ms) in sorted(prof["per_step"].items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"  {ms:8.2f} ms {n:6.0f}x  {kind_of(name):<16} {name[:110]}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = build_step(args)
    m = measure(args, run)
    prof = profile_steps(args, run["step"])
    print_report(args, run, m, prof)
    result = {"bench": "profile", "device": device_name(args.device), "torch": torch.__version__,
              "preset": run["preset"], "seq": run["seq"], "batch": run["batch"], "accum": args.accum,
              "compiled": run["compiled"], "loss_kernel": run["loss_kernel"], "mode": args.mode,
              "fused_loss": args.fused, "chunk": run["chunk"], **m, "busy_ms": prof["busy_ms"],
              "by_kind_ms": prof["by_kind_ms"], "idle_ms": prof["idle_ms"],
              "gaps_ms": [[round(us / 1000, 3), b, a] for us, b, a in prof["gaps"][:8]]}
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
