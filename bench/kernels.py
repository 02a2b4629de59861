"""llm/kernels.py's loss kernel on its own: checked against torch's cross-entropy, then timed against the same
math as torch ops compiled by torch.compile (what the fused loss ran before the kernel), on one chunk of logits.
  python -m bench.kernels --device cuda            # GPT-2 head: 4096 rows x 50304 (50257 real) bf16 logits
  TRITON_INTERPRET=1 python -m bench.kernels --quick   # CPU, small sizes, correctness only (the interpreter is slow)
`--json`: the last line is one JSON object with `ratio` (torch.compile'd ops time / kernel time).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from bench.common import add_common_args, device_name, emit, pick_device, time_call
from llm import kernels as K
from llm.loss import linear_cross_entropy


def torch_ce_grad(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, vocab: int):
    """The kernel's contract written as torch ops (float32 softmax, result in the logits' dtype)."""
    x = logits.float()
    x[:, vocab:] = float("-inf")
    lse = torch.logsumexp(x, dim=-1)
    tgt = targets.clamp(min=0)
    loss = (lse - x.gather(1, tgt[:, None]).squeeze(1)) * (targets != -100)
    g = torch.exp(x - lse[:, None])
    g[torch.arange(g.shape[0], device=g.device), tgt] -= 1.0
    return (g * scale[:, None]).to(logits.dtype), loss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--rows", type=int, default=None, help="tokens in the chunk (default 4096; 48 --quick)")
    parser.add_argument("--vocab", type=int, default=None, help="real vocabulary (default 50257; 5003 --quick)")
    parser.add_argument("--padded", type=int, default=None, help="head rows (default: vocab rounded up to 64)")
    parser.add_argument("--dim", type=int, default=None, help="hidden size for the correctness check (768; 32)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    for name in ("rows", "vocab", "padded", "dim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    device = pick_device(args.device)
    rows = args.rows or (48 if args.quick else 4096)
    vocab = args.vocab or (5003 if args.quick else 50257)
    padded = args.padded or -(-vocab // 64) * 64
    dim = args.dim or (32 if args.quick else 768)
    if padded < vocab:
        parser.error(f"--padded {padded} is smaller than --vocab {vocab}")
    if not K.available(device):
        raise SystemExit("bench/kernels.py: the Triton kernel cannot run here (needs CUDA + triton, or "
                         "TRITON_INTERPRET=1 on CPU)")
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(rows, dim, generator=g).to(device).requires_grad_()
    w = (torch.randn(padded, dim, generator=g) * dim**-0.5).to(device).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::7] = -100
    t = t.to(device)

    # correctness: the fused loss with the kernel (bf16 matmuls under autocast on CUDA) vs fp32 cross-entropy
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with amp:
        loss = linear_cross_entropy(h, w, t, vocab, chunk=rows, kernel=True)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.t())[:, :vocab].float(), t, ignore_index=-100)
    ref.backward()
    check = {
        "loss": loss.item(), "ref_loss": ref.item(),
        "loss_rel": abs(loss.item() - ref.item()) / abs(ref.item()),
        "grad_h_rel": ((gh - h.grad).norm() / h.grad.norm()).item(),
        "grad_w_rel": ((gw - w.grad).norm() / w.grad.norm()).item(),
        "pad_grad_max": gw[vocab:].abs().max().item() if padded > vocab else 0.0,
    }
    tol = 2e-2 if device.type == "cuda" else 1e-4  # bf16 logits and gradients on CUDA
    ok = check["loss_rel"] < tol and check["grad_h_rel"] < tol and check["grad_w_rel"] < tol \
        and check["pad_grad_max"] == 0.0
    print(f"correctness ({'bf16' if device.type == 'cuda' else 'fp32'}): loss {check['loss']:.5f} vs "
          f"{check['ref_loss']:.5f}, relative error loss {check['loss_rel']:.1e}, grad_h {check['grad_h_rel']:.1e}, "
          f"grad_w {check['grad_w_rel']:.1e}, padded rows' grad {check['pad_grad_max']}: {'ok' if ok else 'FAILED'}")
    result = {"bench": "kernels", "device": device_name(device), "torch": torch.__version__, "rows": rows,
              "vocab": vocab, "padded": padded, "check": check, "ok": ok}

    if device.type == "cuda" and not args.quick:
        logits = (torch.randn(rows, padded, device=device) * 2).to(torch.bfloat16)
        scale = (t != -100).float() / (t != -100).sum()
        compiled = torch.compile(torch_ce_grad)
        fns = {"kernel": lambda: K.ce_grad(logits, t, scale, vocab), "compiled torch ops": lambda: compiled(
            logits, t, scale, vocab)}
        (gk, lk), (gc, lc) = fns["kernel"](), fns["compiled torch ops"]()
        same = ((gk.float() - gc.float()).abs().max().item(), (lk - lc).abs().max().item())
        ms = {}
        for k, fn in fns.items():
            for _ in range(3):
                fn()
            ms[k] = statistics.median(time_call(fn, device)[0] for _ in range(args.repeats)) * 1000
        traffic = 3 * rows * padded * logits.element_size()  # two reads and one write of the chunk
        result.update({"kernel_ms": ms["kernel"], "compiled_ms": ms["compiled torch ops"],
                       "ratio": ms["compiled torch ops"] / ms["kernel"],
                       "kernel_tb_per_s": traffic / ms["kernel"] / 1e9, "max_diff_vs_compiled": same})
        print(f"{rows} x {padded} bf16 logits: kernel {ms['kernel']:.3f} ms ({result['kernel_tb_per_s']:.2f} TB/s "
              f"for two reads + one write), compiled torch ops {ms['compiled torch ops']:.3f} ms: "
              f"{result['ratio']:.2f}x; max difference grad {same[0]:.1e}, loss {same[1]:.1e}")
    emit(result, args.json)
    if not ok:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
