"""Generation speed: llm.generate vs transformers' generate() on the same (exported) weights.

Greedy, same prompts, batch 1 and 8, 128 new tokens (no early EOS). Prints tokens/s of both and the ratio.
  python -m bench.generate --quick              # CPU, tiny model, < 1 minute on 2 cores
  python -m bench.generate                      # CPU, gpt2-124m
  python -m bench.generate --device cuda        # bf16, compiled static cache (CUDA graphs) vs HF generate()
`--json`: the last line is one JSON object; `ratio` is the smallest ratio over the batch sizes.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import warnings
from pathlib import Path

import torch

from bench.common import add_common_args, device_name, emit, interleaved, pick_device, sync
from llm.config import PRESETS, get_config
from llm.device import allow_tf32
from llm.generate import generate
from llm.hf import export_hf
from llm.model import build_model
from llm.utils import FLAG_METAVAR, parse_flag


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model preset (default: tiny with --quick, else gpt2-124m)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (median is reported)")
    parser.add_argument("--compile", default="auto", type=parse_flag, metavar=FLAG_METAVAR,
                        help="our static cache + torch.compile (auto: on CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--hf-static", action="store_true",
                        help="also time transformers with cache_implementation='static' (its own compiled path)")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    preset = args.preset or ("tiny" if args.quick else "gpt2-124m")
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = args.repeats or (2 if args.quick else 3)
    compile_flag = args.compile
    allow_tf32(device)

    torch.manual_seed(0)
    cfg = get_config(preset)
    ours = build_model(cfg).to(device=device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # both sides generate exactly new_tokens tokens

    results: dict = {"bench": "generate", "preset": preset, "device": device_name(device), "dtype": str(dtype),
                     "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "batches": {}}
    print(f"{preset} on {results['device']} ({dtype}), prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    g = torch.Generator().manual_seed(1)
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g)
        plist = prompts.tolist()
        ids, mask = prompts.to(device), torch.ones_like(prompts, device=device)

        def run_ours(plist: list[list[int]] = plist) -> list[list[int]]:
            return generate(ours, plist, args.new_tokens, compile=compile_flag)

        def run_hf(ids: torch.Tensor = ids, mask: torch.Tensor = mask, **kw) -> torch.Tensor:
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **kw)

        fns = {"ours": run_ours, "transformers": run_hf}
        if args.hf_static:
            fns["transformers_static"] = functools.partial(run_hf, cache_implementation="static")
        # warm up: kernels, allocator, and (CUDA) compilation + CUDA-graph capture
        for _ in range(3 if cuda else 1):
            for fn in fns.values():
                fn()
        sync(device)
        same = run_ours() == run_hf()[:, args.prompt_len:].tolist()
        secs = interleaved(fns, device, repeats)
        tps = {k: B * args.new_tokens / s for k, s in secs.items()}
        row = {"ours_tok_s": tps["ours"], "hf_tok_s": tps["transformers"], "ratio": tps["ours"] / tps["transformers"],
               "same_tokens": same}
        if args.hf_static:
            row["hf_static_tok_s"] = tps["transformers_static"]
        results["batches"][str(B)] = row
        extra = f", hf static {row['hf_static_tok_s']:.0f} tok/s" if args.hf_static else ""
        print(f"batch {B}: ours {tps['ours']:.0f} tok/s, transformers {tps['transformers']:.0f} tok/s, "
              f"ratio {row['ratio']:.2f}x, identical tokens: {same}{extra}")
    results["ratio"] = min(r["ratio"] for r in results["batches"].values())
    emit(results, args.json)
    return results


if __name__ == "__main__":
    main()
