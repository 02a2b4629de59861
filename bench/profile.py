"""Where a training step's time goes: our step (forward, backward, clip, fused AdamW) timed, then profiled.

Prints tokens/s and MFU of the step, the share of the step the GPU is busy, GPU time by kernel kind (matmuls,
attention, compiler-generated fused kernels, optimizer, casts/copies, other) and the top kernels. Knobs are the
ones that move throughput: micro-batch, the fused loss's chunk size, torch.compile's mode.
  python bench/profile.py --device cuda                        # gpt2-124m, seq 1024, micro-batch 16, compiled
  python bench/profile.py --device cuda --batch 32 --chunk 16384 --mode max-autotune-no-cudagraphs
  python bench/profile.py --quick                              # CPU, tiny preset, eager (operators, not kernels)
`--json`: the last line is one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    add_common_args,
    add_loss_args,
    check_loss_args,
    device_name,
    emit,
    pick_device,
    sync,
    time_call,
)
from bench.pretrain import make_step  # noqa: E402
from llm import kernels as K  # noqa: E402
from llm.config import PRESETS, get_config  # noqa: E402
from llm.model import build_model  # noqa: E402
from llm.optim import build_adamw  # noqa: E402
from llm.train import FusedLossLM, TrainConfig, allow_tf32, autocast_for, peak_flops  # noqa: E402
from llm.utils import flops_per_token, on_off_auto  # noqa: E402

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model preset (default tiny with --quick or on CPU, gpt2-124m on CUDA)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 128 on CPU, 1024 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 8 on CPU, 16 on CUDA)")
    parser.add_argument("--chunk", type=int, default=None, help="fused loss: tokens per chunk (default: llm.train's)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    add_loss_args(parser)
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
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
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    allow_tf32(device)
    preset = args.preset or ("gpt2-124m" if cuda and not args.quick else "tiny")
    seq = args.seq or (1024 if cuda and not args.quick else 128)
    batch = args.batch or (16 if cuda and not args.quick else 8)
    steps = args.steps or (20 if cuda else 5)
    fused = check_loss_args(parser, args, device)
    compiled = args.compile == "on" or (args.compile == "auto" and cuda)

    cfg = get_config(preset, max_seq_len=max(seq, get_config(preset).max_seq_len))
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = build_adamw(model, 3e-4, 0.1, fused=True)
    kernel = on_off_auto(args.ce_kernel)
    trained = FusedLossLM(model, args.chunk or TrainConfig.loss_chunk_tokens, kernel) if fused else model
    chunk = getattr(trained, "chunk", None)
    run = torch.compile(trained, mode=args.mode) if compiled else trained
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    uses_kernel = fused and (K.available(device) if kernel == "auto" else bool(kernel))
    step = make_step(lambda: run(inp, tgt)[1], model, opt, lambda: autocast_for(device, "auto"), args.accum)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    secs = statistics.median(time_call(step, device)[0] for _ in range(steps))
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    tokens = batch * seq * args.accum
    tps = tokens / secs
    peak = peak_flops(device)
    mfu = flops_per_token(cfg, seq) * tps / peak if peak else None

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(args.profile_steps):
            step()
        sync(device)
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
    busy_ms = sum(ms for _, ms in per_step.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, (_, ms) in per_step.items():
        by_kind[kind_of(name)] += ms
    step_ms = secs * 1000

    print(f"{preset} seq {seq} micro-batch {batch} {'compiled' if compiled else 'eager'}"
          f"{' mode ' + args.mode if args.mode else ''}, accum {args.accum}, fused loss "
          f"{f'chunk {chunk}' + (' + Triton kernel' if uses_kernel else '') if fused else 'off'}: "
          f"{tps:,.0f} tok/s, {step_ms:.1f} ms/step" + (f", MFU {mfu:.1%}" if mfu else "")
          + (f", peak mem {peak_mem:.1f} GiB" if peak_mem else "") + f" (warm-up {warm_s:.0f} s)")
    what = "GPU kernels" if cuda else "CPU operators"
    print(f"{what}: {busy_ms:.1f} ms per step = {busy_ms / step_ms:.0%} of the step")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<18} {ms:8.2f} ms  {ms / step_ms:6.1%}")
    if gaps:
        print(f"GPU idle between kernels: {idle_us / args.profile_steps / 1000:.2f} ms per step; longest gaps:")
        for us, before, after in gaps[:8]:
            print(f"  {us / 1000:6.2f} ms after {before[:60]}  before {after[:60]}")
    print(f"top {args.top} {what} (calls and ms per step):")
    for name, (n, ms) in sorted(per_step.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"  {ms:8.2f} ms {n:6.0f}x  {kind_of(name):<16} {name[:110]}")
    result = {"bench": "profile", "device": device_name(device), "torch": torch.__version__, "preset": preset,
              "seq": seq, "batch": batch, "accum": args.accum, "compiled": compiled, "ce_kernel": uses_kernel, "mode": args.mode, "fused_loss": fused,
              "chunk": chunk, "tokens_per_s": tps, "step_ms": step_ms, "mfu": mfu, "peak_mem_gib": peak_mem,
              "busy_ms": busy_ms, "by_kind_ms": dict(by_kind),
              "idle_ms": idle_us / args.profile_steps / 1000 if cuda else None,
              "gaps_ms": [[round(us / 1000, 3), b, a] for us, b, a in gaps[:8]], "warmup_s": round(warm_s, 1)}
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
