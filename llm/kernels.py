"""Triton kernels (CUDA; optional). Everything here has a plain-torch path next to it, used when Triton is absent.

`ce_grad(logits, targets, scale, vocab)`: the softmax-minus-one-hot gradient of cross-entropy and the per-row loss
from one chunk of LM-head logits, in two passes over each row (log-sum-exp, then the gradient) that read the
logits in their own dtype (bf16 under autocast) and never make a float32 copy. The fused loss of `llm.loss` calls
it per chunk; on the GPU the torch.compile'd chain of the same math was the slowest kernel of a GPT-2 124M step.

TRITON_INTERPRET=1 (set before this module is imported) runs the kernel on CPU tensors, for tests.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; the torch path is used
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether ce_grad can run on tensors of `device`."""
    return triton is not None and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


if triton is not None:

    @triton.jit
    def _ce_grad_rows(logits_ptr, grad_ptr, stride, targets_ptr, scale_ptr, loss_ptr, vocab, n_cols,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src = logits_ptr + row * stride
        dst = grad_ptr + row * n_cols
        # pass 1: log-sum-exp over the real vocabulary, one running (max, sum) per lane, merged at the end
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for off in range(0, vocab, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane that has seen only padding stays (-inf, 0)
            s = s * tl.exp(m - ref) + tl.exp(x - ref)
            m = m_new
        m_row = tl.max(m, 0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
        t = tl.load(targets_ptr + row)
        scale = tl.load(scale_ptr + row)  # 1 / (valid targets in the batch), 0 for an ignored target
        x_t = tl.load(src + tl.maximum(t, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(t >= 0, lse - x_t, 0.0))
        # pass 2: (softmax - one_hot) * scale; columns past the vocabulary (matmul padding) get 0
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse) * scale
            g = tl.where(cols == t, g - scale, g)
            tl.store(dst + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


def _ce_grad_impl(logits: Tensor, targets: Tensor, scale: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    n, n_cols = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad = torch.empty((n, n_cols), dtype=logits.dtype, device=logits.device)
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        block = min(4096, triton.next_power_of_2(max(vocab, 16)))
        _ce_grad_rows[(n,)](logits, grad, logits.stride(0), targets.contiguous(), scale.float().contiguous(), loss,
                            vocab, n_cols, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return grad, loss


@torch.library.custom_op("llm::ce_grad", mutates_args=())
def _ce_grad_op(logits: Tensor, targets: Tensor, scale: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    return _ce_grad_impl(logits, targets, scale, vocab)


@_ce_grad_op.register_fake
def _(logits: Tensor, targets: Tensor, scale: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    return logits.new_empty(logits.shape), logits.new_empty(logits.shape[0], dtype=torch.float32)


def ce_grad(logits: Tensor, targets: Tensor, scale: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """-> (grad (n, V_padded) in logits' dtype, loss (n,) float32) for logits (n, V_padded), targets (n,) with
    -100 = ignored, scale (n,): row r's gradient is (softmax(logits[r, :vocab]) - one_hot(targets[r])) * scale[r]
    and 0 past `vocab`; loss[r] = logsumexp(logits[r, :vocab]) - logits[r, targets[r]] (0 when ignored).

    A custom op, so torch.compile calls the kernel as it is instead of tracing into it.
    """
    if triton is None:
        raise RuntimeError("llm.kernels.ce_grad needs Triton (pip install triton); check llm.kernels.available(device)")
    return _ce_grad_op(logits, targets, scale, vocab)
