"""Training throughput: our model + loop step vs transformers' GPT2LMHeadModel / LlamaForCausalLM, same process.

Each side trains the same weights (ours exported with llm.hf.export_hf, loaded by AutoModelForCausalLM) at the
same sequence length, micro-batch and precision, with fused AdamW; forward + backward + optimizer step, timed
interleaved (A B A B ...) so load drift hits both alike. Reports tokens/s, ms/step, peak memory and MFU (CUDA).
  python -m bench.pretrain --quick          # CPU, tiny presets, fp32, eager: < 1 minute on 2 cores
  python -m bench.pretrain --device cuda    # GPT-2 124M + llama-124m, seq 1024, bf16, eager and torch.compile
`--json`: the last line is one JSON object; `ratio` = the smallest ours/transformers tokens/s ratio over the
families, in the headline mode (compiled on CUDA, eager on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from bench.common import (
    add_common_args,
    add_loss_args,
    check_loss_args,
    device_name,
    emit,
    interleaved,
    pick_device,
    sync,
)
from llm.config import PRESETS, get_config
from llm.device import allow_tf32, autocast_for, peak_flops
from llm.hf import export_hf
from llm.loss import FusedLossLM
from llm.model import build_model
from llm.optim import build_adamw
from llm.utils import flops_per_token, parse_flag


def make_step(loss_fn: Callable[[], torch.Tensor], model: torch.nn.Module, opt: torch.optim.Optimizer,
              amp: Callable[[], contextlib.AbstractContextManager], accum: int = 1) -> Callable[[], float]:
    """One training step exactly as llm.train runs it (autocast forward and backward of `accum` micro-batches,
    clip, fused AdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        for _ in range(accum):
            with amp():
                loss = loss_fn()
            (loss / accum if accum > 1 else loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    return step


def peak_memory(step: Callable[[], float], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def build_pair(preset: str, device: torch.device, compile_: bool, fused: bool, vocab: int | None, seq: int,
               loss_kernel: bool | str = "auto"):
    """(ours, transformers) models with identical weights, each with its own fused AdamW."""
    from transformers import AutoModelForCausalLM

    overrides = {"max_seq_len": max(seq, get_config(preset).max_seq_len)}
    if vocab:
        overrides["vocab_size"] = vocab
    cfg = get_config(preset, **overrides)
    torch.manual_seed(0)
    ours = build_model(cfg)
    with tempfile.TemporaryDirectory() as d:
        export_hf(ours, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    ours.to(device).train()
    hf.to(device).train()
    hf.config.use_cache = False
    # the same optimizer on both sides: fused AdamW (one kernel over all parameters; CPU has one too)
    opt_ours = build_adamw(ours, 3e-4, 0.1, fused=True)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    trained = FusedLossLM(ours, kernel=loss_kernel) if fused else ours
    run_ours, run_hf = trained, hf
    if compile_:
        run_ours, run_hf = torch.compile(trained), torch.compile(hf)
    return cfg, (ours, run_ours, opt_ours), (hf, run_hf, opt_hf)


def bench_family(preset: str, device: torch.device, args, compile_: bool) -> dict:
    cuda = device.type == "cuda"
    seq, batch = args.seq, args.batch
    fused = args.fused_loss is not False
    cfg, (ours, run_ours, opt_ours), (hf, run_hf, opt_hf) = build_pair(preset, device, compile_, fused, args.vocab,
                                                                       seq, args.loss_kernel)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def amp():
        return autocast_for(device, "auto")

    accum = args.accum
    steps = {
        "ours": make_step(lambda: run_ours(inp, tgt)[1], ours, opt_ours, amp, accum),
        # labels are shifted inside transformers; the token count per step is the same within one position
        "transformers": make_step(lambda: run_hf(input_ids=x[:, :-1], labels=x[:, :-1]).loss, hf, opt_hf, amp,
                                  accum),
    }
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compile, autotune, allocator warm-up
        for fn in steps.values():
            fn()
    sync(device)
    warm_s = time.perf_counter() - t0
    mem = {k: peak_memory(fn, device) for k, fn in steps.items()}
    secs = interleaved(steps, device, args.repeats)
    tokens = batch * seq * accum
    fpt = flops_per_token(cfg, seq)
    peak = peak_flops(device)
    out = {"preset": preset, "compiled": compile_, "fused_loss": fused, "seq": seq, "batch": batch, "accum": accum,
           "warmup_s": round(warm_s, 1)}
    for k, s in secs.items():
        out[k] = {"ms_per_step": s * 1000, "tokens_per_s": tokens / s, "peak_mem_gib": mem[k],
                  "mfu": (fpt * tokens / s / peak) if peak else None}
    out["ratio"] = out["ours"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def _compile_modes(value: str) -> bool | str:
    return "both" if value == "both" else parse_flag(value)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--presets", default=None, help="comma-separated model presets (default: tiny,tiny-gpt2 "
                        "with --quick or on CPU, gpt2-124m,llama-124m on CUDA)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 128 on CPU, 1024 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 8 on CPU, 16 on CUDA)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient "
                        "accumulation, both sides; GPT-2's 0.5M-token steps are 32 micro-batches of 16 x 1024)")
    parser.add_argument("--vocab", type=int, default=None, help="override the presets' vocabulary size")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per side (median is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side first")
    parser.add_argument("--compile", default="auto", metavar="{true,false,auto,both}",
                        type=_compile_modes,
                        help="torch.compile both sides (auto: both eager and compiled on CUDA, eager on CPU; both: "
                        "eager and compiled everywhere)")
    add_loss_args(parser)
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    allow_tf32(device)
    presets = (args.presets or ("gpt2-124m,llama-124m" if cuda and not args.quick else "tiny,tiny-gpt2")).split(",")
    if args.accum < 1:
        parser.error("--accum must be >= 1")
    check_loss_args(parser, args, device)
    if unknown := [p for p in presets if p not in PRESETS]:
        parser.error(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(sorted(PRESETS))}")
    args.seq = args.seq or (1024 if cuda and not args.quick else 128)
    args.batch = args.batch or (16 if cuda and not args.quick else 8)
    args.repeats = args.repeats or (10 if cuda else 15)  # CPU steps vary by +-10 %: more pairs, steadier median
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    modes = {"auto": [False, True] if cuda else [False], True: [True], False: [False], "both": [False, True]}
    modes = modes[args.compile]
    headline = modes[-1]

    runs = []
    for preset in presets:
        for compile_ in modes:
            r = bench_family(preset, device, args, compile_)
            runs.append(r)
            o, h = r["ours"], r["transformers"]
            mfu = f"  MFU ours {o['mfu']:.1%} / transformers {h['mfu']:.1%}" if o["mfu"] else ""
            mem = f"  peak mem {o['peak_mem_gib']:.2f} / {h['peak_mem_gib']:.2f} GiB" if o["peak_mem_gib"] else ""
            print(f"{preset:>12} {'compiled' if compile_ else 'eager':>8}: ours {o['tokens_per_s']:>10,.0f} tok/s "
                  f"({o['ms_per_step']:.1f} ms/step)  transformers {h['tokens_per_s']:>10,.0f} tok/s "
                  f"({h['ms_per_step']:.1f} ms/step)  ratio {r['ratio']:.2f}x{mfu}{mem}", flush=True)
    head = [r for r in runs if r["compiled"] == headline]
    result = {
        "bench": "pretrain",
        "device": device_name(device),
        "torch": torch.__version__,
        "seq": args.seq,
        "batch": args.batch,
        "accum": args.accum,
        "precision": "bf16 autocast" if cuda else "fp32",
        "runs": runs,
        "ratio": min(r["ratio"] for r in head),
        "mfu": max((r["ours"]["mfu"] or 0.0) for r in head) or None,
    }
    print(f"ratio (smallest over {', '.join(presets)}, {'compiled' if headline else 'eager'}): {result['ratio']:.2f}x"
          + (f"; best MFU {result['mfu']:.1%}" if result["mfu"] else ""))
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
