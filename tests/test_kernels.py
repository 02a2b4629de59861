"""llm.kernels' Triton kernel, run on CPU by Triton's interpreter (TRITON_INTERPRET=1, in a child process: the
variable must be set before the kernel is defined). On a GPU the same kernel is compiled instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton", reason="the test extra installs triton (pip install -e '.[test]')")


def run_interpreted(code: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ce_grad_kernel_matches_torch_cross_entropy():
    """Loss and gradients of the fused loss with the kernel equal the plain torch ones: a vocabulary that spans
    two of the kernel's blocks and is not a multiple of one, padded rows in the head, ignored targets, chunks."""
    out = run_interpreted("""
        import json, torch
        import torch.nn.functional as F
        from llm import kernels as K
        from llm.train import linear_cross_entropy
        torch.manual_seed(0)
        n, C, Vp, V = 24, 8, 5056, 5003
        h = torch.randn(n, C, dtype=torch.float64).float().requires_grad_()
        w = torch.randn(Vp, C).requires_grad_()
        t = torch.randint(0, V, (n,))
        t[[2, 9, 10]] = -100
        t[5] = V - 1  # the last real column
        res = {"available": K.available(h.device)}
        loss = linear_cross_entropy(h, w, t, V, chunk=10, kernel=True)
        loss.backward()
        gh, gw = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        ref = F.cross_entropy((h @ w.t())[:, :V], t, ignore_index=-100)
        ref.backward()
        res["loss"], res["ref"] = loss.item(), ref.item()
        res["dh"] = (gh - h.grad).abs().max().item() / h.grad.abs().max().item()
        res["dw"] = (gw - w.grad).abs().max().item() / w.grad.abs().max().item()
        res["pad_grad"] = gw[V:].abs().max().item()
        g, rows = K.ce_grad((h @ w.t()).detach(), t, torch.full((n,), 0.5), V)
        res["rows_ignored"] = rows[[2, 9, 10]].abs().max().item()
        res["row_sums"] = g[t != -100, :V].sum(-1).abs().max().item()  # softmax - one-hot sums to 0 on a kept row
        print(json.dumps(res))
    """)
    assert out["available"]
    assert abs(out["loss"] - out["ref"]) < 1e-4 * abs(out["ref"])
    assert out["dh"] < 1e-4 and out["dw"] < 1e-4
    assert out["pad_grad"] == 0.0  # the matmul-padding rows of the head never learn
    assert out["rows_ignored"] == 0.0
    assert out["row_sums"] < 1e-5


def test_fused_loss_with_the_kernel_traces_under_torch_compile():
    """torch.compile sees the kernel as one custom op (llm::ce_grad) with a shape-only fake: a tiny model compiled
    (aot_eager, which runs dynamo and AOT autograd like inductor does) gives the eager loss and gradients."""
    out = run_interpreted("""
        import json, torch
        from llm.config import get_config
        from llm.model import build_model
        from llm.train import FusedLossLM
        torch.manual_seed(0)
        model = build_model(get_config("tiny", vocab_size=300))  # padded to a multiple of 64 in the head
        x = torch.randint(0, 300, (2, 17))
        res = {}
        for name, fn in (("eager", FusedLossLM(model, chunk=8, kernel=True)),
                         ("compiled", torch.compile(FusedLossLM(model, chunk=8, kernel=True), backend="aot_eager",
                                                    fullgraph=True))):
            model.zero_grad(set_to_none=True)
            loss = fn(x[:, :-1], x[:, 1:])[1]
            loss.backward()
            res[name] = [loss.item(), model.lm_head.weight.grad.norm().item(), model.tok_emb.weight.grad.norm().item()]
        print(json.dumps(res))
    """)
    for a, b in zip(out["eager"], out["compiled"], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))


def test_training_loop_with_the_loss_kernel_follows_the_torch_loss():
    """TrainConfig.loss_kernel reaches the fused loss: five steps of a tiny llama with the kernel give the same
    per-step losses as with torch ops."""
    out = run_interpreted("""
        import json, torch
        from llm import kernels as K
        from llm.config import get_config
        from llm.model import build_model
        from llm.train import TrainConfig, train

        calls = []
        impl = K._ce_grad_impl
        K._ce_grad_impl = lambda *a: calls.append(1) or impl(*a)  # count the kernel's launches

        def batches():
            g = torch.Generator().manual_seed(0)
            while True:
                t = torch.randint(0, 256, (2, 17), generator=g)
                yield t[:, :-1], t[:, 1:]

        losses = {}
        for kernel in (False, True):
            torch.manual_seed(0)
            model = build_model(get_config("tiny", vocab_size=256))
            tc = TrainConfig(max_steps=5, micro_batch_size=2, seq_len=16, lr=3e-3, warmup_steps=0,
                             eval_interval=0, checkpoint_interval=0, device="cpu", progress=False,
                             fused_loss=True, loss_kernel=kernel)
            losses[str(kernel)] = [v for _, v in train(model, tc, batches(), None).losses]
            losses[f"calls {kernel}"] = len(calls)
        print(json.dumps(losses))
    """)
    assert len(out["True"]) == 5
    assert out["calls False"] == 0 and out["calls True"] == 5  # one chunk per step
    for a, b in zip(out["False"], out["True"], strict=True):
        assert abs(a - b) <= 1e-4 * a


def test_loss_kernel_setting_is_checked(tmp_path):
    """A bad value, and `on` where the kernel cannot run (CPU without the interpreter), fail before anything is
    written."""
    import torch

    from llm.config import get_config
    from llm.model import build_model
    from llm.train import TrainConfig, train

    with pytest.raises(ValueError, match="loss_kernel"):
        TrainConfig(loss_kernel="yes")
    tc = TrainConfig(max_steps=1, micro_batch_size=1, seq_len=8, device="cpu", fused_loss=True, loss_kernel=True,
                     progress=False)
    batches = iter([(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))])
    with pytest.raises(ValueError, match="loss_kernel to 'auto' or 'off'"):
        train(build_model(get_config("tiny")), tc, batches, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_forcing_the_kernel_where_it_cannot_run_is_a_clear_error():
    import torch

    from llm.train import linear_cross_entropy

    h, w, t = torch.randn(4, 8), torch.randn(16, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="loss_kernel 'auto' or 'off'"):
        linear_cross_entropy(h, w, t, kernel=True)  # CPU tensors, no TRITON_INTERPRET in this process
