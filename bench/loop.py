"""The real training loop (llm.train.train) on one device: tokens/s and MFU as the loop itself logs them.

bench/pretrain.py times a bare step (forward, backward, clip, AdamW); this runs the whole loop (LR schedule,
non-finite checks, metrics, progress) on a few fixed random batches, so its tokens/s next to the bare step's shows
what the loop costs, and the loss falling on data it sees again shows the step really trains.
  python -m bench.loop --quick            # CPU, tiny preset
  python -m bench.loop --device cuda      # gpt2-124m, seq 1024, micro-batch 16, bf16, torch.compile
`--json`: the last line is one JSON object (median tokens/s and MFU over the steps after the first `--skip`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import add_common_args, device_name, emit, pick_device
from llm.config import PRESETS, get_config
from llm.model import build_model
from llm.train import TrainConfig, train
from llm.utils import FLAG_METAVAR, parse_flag


class FixedBatches:
    """Cycles through `n` random (x, y) batches, so the loss must fall if the step trains."""

    def __init__(self, vocab: int, batch: int, seq: int, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(n):
            t = torch.randint(0, vocab, (batch, seq + 1), generator=g)
            self.batches.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        self.i = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model preset (default tiny on CPU, gpt2-124m on CUDA)")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the medians (compile)")
    parser.add_argument("--compile", default="auto", type=parse_flag, metavar=FLAG_METAVAR)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("gpt2-124m" if cuda and not args.quick else "tiny")
    seq = args.seq or (1024 if cuda and not args.quick else 128)
    batch = args.batch or (16 if cuda and not args.quick else 8)
    steps = args.steps or (40 if cuda else 30)
    cfg = get_config(preset, max_seq_len=max(seq, get_config(preset).max_seq_len))
    torch.manual_seed(0)
    model = build_model(cfg)
    data = FixedBatches(cfg.vocab_size, batch, seq, n=4)
    tc = TrainConfig(max_steps=steps, micro_batch_size=batch, seq_len=seq, lr=1e-3, warmup_steps=5,
                     eval_interval=0, checkpoint_interval=0, device=str(device), progress=False,
                     compile=args.compile)
    rows: list[dict[str, float]] = []
    t0 = time.perf_counter()
    res = train(model, tc, data, on_step=lambda step, m: rows.append(m))
    wall = time.perf_counter() - t0
    timed = rows[args.skip:] or rows
    tps = statistics.median(r["train/tokens_per_s"] for r in timed)
    mfu = statistics.median(r["train/mfu"] for r in timed) if "train/mfu" in timed[0] else None
    first, last = res.losses[0][1], statistics.mean(v for _, v in res.losses[-4:])
    result = {"bench": "loop", "device": device_name(device), "torch": torch.__version__, "preset": preset,
              "seq": seq, "batch": batch, "steps": steps, "tokens_per_s": tps, "mfu": mfu,
              "step_ms": statistics.median(r["train/step_ms"] for r in timed), "wall_s": round(wall, 1),
              "first_loss": first, "last_loss": last, "skipped_steps": res.skipped_steps,
              "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    print(f"{preset} seq {seq} batch {batch}: loop {tps:,.0f} tok/s"
          + (f", MFU {mfu:.1%}" if mfu else "") + f"; loss {first:.3f} -> {last:.3f} over {steps} steps "
          f"({wall:.0f} s wall, compile included)")
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
