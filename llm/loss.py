"""The fused LM head + cross-entropy: the loss over `h @ w.T` computed chunk by chunk, never holding all logits.

On CUDA the softmax gradient runs in llm.kernels' Triton kernel; on CPU every pass over a chunk's logits is in
place, in a buffer kept between steps. `FusedLossLM` wraps an llm model so the training loop calls it like the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from llm import kernels as K

if TYPE_CHECKING:
    from llm.train.config import TrainConfig


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ w.T` computed chunk by chunk, with the gradients made in the same pass.

    The usual path keeps (tokens x vocab) logits in bf16, a float32 copy and the log-softmax for backward: for
    GPT-2 at 16k tokens per micro batch that is ~10 GB. Here each chunk's logits live only while its softmax
    gradient (softmax - one-hot) is turned into grad_h and grad_w, so the same three matmuls run with O(chunk x
    vocab) memory and no extra recompute. Rows of `w` past `vocab` (padding for fast matmuls) get -inf logits.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int, chunk: int,
                kernel: bool, workspace: dict | None):
        dev = h.device.type
        # matmuls in the autocast dtype when autocast is on (bf16 on CUDA), else in h's dtype; softmax in fp32
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1).float()
        scale = valid.float() / n_valid  # each valid token's share of the mean
        grad_h = torch.empty_like(h)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        in_place = cd == torch.float32 and h.dtype == torch.float32 and not torch.compiler.is_compiling()
        # in place, the first chunk's matmul writes grad_w (no zero-filled (V, C) buffer to add to)
        grad_w = None if in_place else torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        buf = None
        if in_place and not kernel and workspace is not None and dev == "cpu":
            # CPU: the logits go to a buffer kept across steps. A fresh one per step is a new mapping of 16+ MB
            # that the OS zero-fills page by page on first touch, which slows the LM-head matmul (docs/FINDINGS.md,
            # "The CPU training step").
            rows = min(chunk, h.shape[0])
            buf = workspace.get("logits")
            if buf is None or buf.shape[0] < rows or buf.shape[1] != w.shape[0]:
                buf = workspace["logits"] = torch.empty(rows, w.shape[0], dtype=torch.float32)
        with torch.autocast(dev, enabled=False):
            wc = w.to(cd)
            for s in range(0, h.shape[0], chunk):
                hc, tc, vc, sc = h[s : s + chunk].to(cd), targets[s : s + chunk], valid[s : s + chunk], scale[s : s + chunk]
                if kernel:  # Triton: two passes over the logits in their own dtype, no float32 copy
                    g, row_loss = K.ce_grad(hc @ wc.t(), tc, sc, vocab)
                    total += row_loss.sum()
                else:
                    # (n, V_padded) logits, then every pass over them in place: no other temporary of that size
                    # (on CPU a fresh 16 MB buffer costs more in page faults than the arithmetic on it)
                    logits = (hc @ wc.t()).float() if buf is None else torch.mm(hc, wc.t(), out=buf[: hc.shape[0]])
                    if w.shape[0] > vocab:
                        logits[:, vocab:] = float("-inf")
                    tgt = tc.clamp(min=0)[:, None]
                    row_max = logits.amax(1, keepdim=True)
                    z_tgt = logits.gather(1, tgt)
                    sum_exp = logits.sub_(row_max).exp_().sum(1, keepdim=True)
                    total += ((row_max + sum_exp.log() - z_tgt).squeeze(1) * vc).sum()  # lse - target logit
                    g = logits.mul_(sc[:, None] / sum_exp)  # softmax * each row's share of the mean
                    g = g.scatter_add_(1, tgt, -sc[:, None]).to(cd)  # - one-hot * share
                if in_place:  # fp32 eager: grad_h's rows written and grad_w accumulated by the matmuls themselves
                    torch.mm(g, wc, out=grad_h[s : s + chunk])
                    grad_w = torch.mm(g.t(), hc) if grad_w is None else grad_w.addmm_(g.t(), hc)
                else:
                    grad_h[s : s + chunk] = g @ wc
                    grad_w += (g.t() @ hc).float()
        if grad_w is None:  # no rows at all
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out).to(ctx.w_dtype), None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int | None = None, chunk: int = 4096,
    kernel: bool | str = "auto", workspace: dict | None = None,
) -> torch.Tensor:
    """cross_entropy((h @ w.T)[:, :vocab], targets, ignore_index=-100) without materialising all logits.

    h (N, C), w (V_padded, C), targets (N,). Same value and gradients as the plain path (up to rounding).
    kernel: the softmax gradient through llm.kernels' Triton kernel ("auto": where it can run, i.e. CUDA with
    Triton installed) or plain torch ops (False).
    workspace: a dict the caller keeps across calls; on CPU (fp32, eager) the logits buffer is kept in it instead of
    being allocated afresh each call.
    """
    ok = K.available(h.device)
    use = ok if kernel == "auto" else bool(kernel)
    if use and not ok:
        raise ValueError(f"the fused loss's Triton kernel (loss_kernel / kernel=True) cannot run on {h.device}: it "
                         "needs a CUDA tensor and Triton installed; use loss_kernel 'auto' or 'off'")
    return _LinearCrossEntropy.apply(h, w, targets, vocab or w.shape[0], chunk, use, workspace)


class FusedLossLM(nn.Module):
    """`model(idx, targets) -> (None, loss)` through the fused head + loss (for llm models: hidden_states + lm_head).

    It owns no parameters of its own, so DDP / torch.compile can wrap it while checkpoints keep the inner model's
    names. On CPU it keeps one chunk's logits buffer (chunk x padded vocab, fp32) between steps.
    """

    def __init__(self, model: nn.Module, chunk: int = 4096, kernel: bool | str = "auto"):
        super().__init__()
        self.model, self.chunk, self.kernel = model, chunk, kernel
        self._workspace: dict = {}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        h = self.model.hidden_states(idx)
        w = self.model.lm_head.weight
        ws = None if torch.compiler.is_compiling() else self._workspace  # the loss uses it on CPU only
        loss = linear_cross_entropy(h.flatten(0, 1), w, targets.flatten(), self.model.config.vocab_size, self.chunk,
                                    self.kernel, ws)
        return None, loss


def check_loss_kernel(cfg: TrainConfig, device: torch.device) -> None:
    """ValueError when loss_kernel is forced on where the Triton kernel cannot run (before anything is written)."""
    if cfg.loss_kernel is True and cfg.fused_loss is not False and not K.available(device):
        raise ValueError(f"TrainConfig.loss_kernel is on but the fused loss's Triton kernel cannot run on {device} "
                         "(it needs CUDA and Triton installed); set loss_kernel to 'auto' or 'off'")


def supports_fused_loss(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("hidden_states", "lm_head", "config"))

