"""The pretraining loop (llm/train/, llm/loss.py, llm/optim.py): schedule, decay groups, accumulation, checkpoints, exact resume.

Run: .venv/bin/pytest tests/test_train.py -q
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from llm.optim import lr_at, param_groups
from llm.train import (
    CheckpointError,
    ResumeMismatch,
    TrainConfig,
    evaluate,
    list_checkpoints,
    train,
    verify_checkpoint,
)

VOCAB, SEQ = 48, 16


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: tiny models run fastest on one thread


# ---- small shared pieces (imported by the other training test files) -------------------------------------------


class TinyLM(nn.Module):
    """A one-block causal LM: enough moving parts (embeddings, norm, dropout, tied head) to exercise the loop."""

    def __init__(self, vocab: int = VOCAB, d: int = 32, dropout: float = 0.1, n_layer: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList(
            [nn.TransformerEncoderLayer(d, 2, 2 * d, dropout, batch_first=True) for _ in range(n_layer)]
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        for b in self.blocks:
            h = b(h, src_mask=mask, is_causal=True)
        logits = self.head(self.norm(h))
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss


def make_model(seed: int = 0, n_layer: int = 2) -> nn.Module:
    """The real `tiny` llama preset shrunk further when llm.model exists, else the stand-in above."""
    torch.manual_seed(seed)
    try:
        from llm.config import get_config
        from llm.model import build_model
    except ImportError:
        return TinyLM(n_layer=n_layer)
    # dropout on, so exact resume must also restore the RNG streams
    cfg = get_config("tiny", vocab_size=VOCAB, max_seq_len=SEQ, n_layer=n_layer, n_embd=32, n_heads=2, n_kv_heads=2,
                     dropout=0.1)
    return build_model(cfg)


class Stream:
    """A resumable token source: a fixed, learnable stream cut into windows, read in a seeded shuffled order.

    Rank r of w takes rows r, r+w, ... of every global batch, so 2 ranks x b rows see the same global batch as
    1 rank x 2b rows.
    """

    def __init__(self, batch: int, seq: int = SEQ, seed: int = 0, rank: int = 0, world: int = 1, n: int = 4096):
        rng = np.random.default_rng(1234)
        base = rng.integers(3, VOCAB, size=32)
        toks = np.concatenate([np.roll(base, i % 7) for i in range(n // 32 + 2)])
        noise = rng.random(toks.shape) < 0.1
        toks[noise] = rng.integers(3, VOCAB, size=int(noise.sum()))
        self.windows = np.lib.stride_tricks.sliding_window_view(toks, seq + 1)[::seq]
        self.order = np.random.default_rng(seed).permutation(len(self.windows))
        self.batch, self.rank, self.world, self.pos = batch, rank, world, 0

    def next_batch(self):
        g = self.batch * self.world
        idx = [self.order[(self.pos * g + self.rank + self.world * i) % len(self.order)] for i in range(self.batch)]
        self.pos += 1
        w = torch.from_numpy(self.windows[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = int(state["pos"])

    def val(self, n: int = 4):
        """A callable giving the same n held-out batches each time (what `train(val_batches=...)` wants)."""

        def batches():
            s = Stream(self.batch, seed=99)
            return (s.next_batch() for _ in range(n))

        return batches


def cfg(**kw) -> TrainConfig:
    base = dict(
        max_steps=12, micro_batch_size=4, seq_len=SEQ, lr=1e-2, warmup_steps=2, eval_interval=0,
        checkpoint_interval=4, keep_last=3, progress=False, device="cpu", seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---- tests ----------------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=True))
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine: midpoint of max and floor
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_weight_decay_groups_skip_norms_biases_embeddings():
    m = TinyLM()
    decay, no_decay = param_groups(m, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(m.tok.weight) not in decayed and id(m.pos.weight) not in decayed
    assert id(m.norm.weight) not in decayed and id(m.norm.bias) not in decayed
    assert id(m.blocks[0].linear1.weight) in decayed
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    n_all = len({id(p) for p in m.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_all  # tied head counted once
    with_emb = param_groups(m, 0.1, decay_embeddings=True)[0]
    assert id(m.tok.weight) in {id(p) for p in with_emb["params"]}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="tokens_per_step"):
        cfg(tokens_per_step=100).grad_accum_steps(1)
    assert cfg(tokens_per_step=4 * SEQ * 3).grad_accum_steps(1) == 3
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        cfg(lr=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        cfg(max_steps=0)


def test_training_learns_logs_and_checkpoints(tmp_path):
    model = make_model()
    logged, evals = [], []
    data = Stream(4)
    res = train(
        model, cfg(max_steps=40, eval_interval=20, checkpoint_interval=10, keep_last=2), data, tmp_path / "ck",
        val_batches=data.val(), bytes_per_token=2.0,
        on_step=lambda s, m: logged.append((s, m)), on_eval=lambda s, m: evals.append((s, m)),
    )
    assert res.step == 40 and len(res.losses) == 40
    first, last = np.mean([x for _, x in res.losses[:5]]), np.mean([x for _, x in res.losses[-5:]])
    assert last < first - 0.5, (first, last)
    assert [s for s, _ in logged] == list(range(1, 41))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= logged[-1][1].keys()
    assert [s for s, _ in evals] == [20, 40]
    v = evals[-1][1]
    assert v["val/bpb"] == pytest.approx(v["val/loss"] / math.log(2) / 2.0)
    assert v["val/ppl"] == pytest.approx(math.exp(v["val/loss"]))
    # keep_last=2: only the two newest complete checkpoints stay
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [40, 30]
    verify_checkpoint(res.checkpoint)
    names = {p.name for p in res.checkpoint.iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "rng_rank0.safetensors", "rank0.json",
            "trainer_state.json", "manifest.json"} <= names
    assert not [p for p in names if p.endswith((".pt", ".bin", ".pkl"))]
    state = json.loads((res.checkpoint / "trainer_state.json").read_text())
    assert state["loop"]["step"] == 40 and state["loop"]["tokens"] == 40 * 4 * SEQ


class Crash(Exception):
    pass


def test_resume_after_crash_is_bit_exact(tmp_path):
    ref_model = make_model()
    ref = train(ref_model, cfg(), Stream(4), tmp_path / "ref")

    def crash_at_6(step, _):
        if step == 6:
            raise Crash

    model = make_model()
    with pytest.raises(Crash):
        train(model, cfg(), Stream(4), tmp_path / "run", on_step=crash_at_6)
    model2 = make_model(seed=123)  # a different init: everything must come from the checkpoint
    res = train(model2, cfg(), Stream(4), tmp_path / "run")
    assert res.resumed_from == 4
    assert res.losses == ref.losses[4:]  # same floats, steps 5..12: no batch skipped or repeated
    assert_same_weights(weights(model2), weights(ref_model))


def test_grad_accumulation_matches_bigger_micro_batch(tmp_path):
    a = train(make_model(), cfg(max_steps=4, micro_batch_size=4, checkpoint_interval=0), Stream(4), None)
    b = train(
        make_model(),
        cfg(max_steps=4, micro_batch_size=2, tokens_per_step=4 * SEQ, checkpoint_interval=0),
        Stream(2, world=1),
        None,
    )
    # Stream(2) reads the same rows as Stream(4) in two halves; dropout masks differ, so only close
    a_l, b_l = [x for _, x in a.losses], [x for _, x in b.losses]
    assert a_l[0] == pytest.approx(b_l[0], rel=0.05)
    assert a.tokens == b.tokens == 4 * 4 * SEQ


def test_resume_refuses_changed_model_or_fingerprint(tmp_path):
    train(make_model(), cfg(max_steps=4), Stream(4), tmp_path / "ck", fingerprint={"tokenizer": "aaa", "data": "d1"})
    with pytest.raises(ResumeMismatch, match=r"fingerprint\.tokenizer: 'aaa' -> 'bbb'"):
        train(make_model(), cfg(max_steps=8), Stream(4), tmp_path / "ck", fingerprint={"tokenizer": "bbb", "data": "d1"})
    with pytest.raises(ResumeMismatch, match=r"fingerprint\.data"):
        train(make_model(), cfg(max_steps=8), Stream(4), tmp_path / "ck", fingerprint={"tokenizer": "aaa", "data": "d2"})
    with pytest.raises(ResumeMismatch, match=r"batch\.seq_len|batch\.tokens_per_step"):
        train(make_model(), cfg(max_steps=8, micro_batch_size=2), Stream(2), tmp_path / "ck",
              fingerprint={"tokenizer": "aaa", "data": "d1"})
    with pytest.raises(CheckpointError, match="resume is off"):
        train(make_model(), cfg(max_steps=8), Stream(4), tmp_path / "ck", resume=False)
    # a finished run resumed with a longer schedule simply continues
    res = train(make_model(), cfg(max_steps=6), Stream(4), tmp_path / "ck", fingerprint={"tokenizer": "aaa", "data": "d1"})
    assert res.resumed_from == 4 and res.step == 6


def test_evaluate_reports_bits_per_byte():
    model = make_model()
    data = Stream(4)
    out = evaluate(model, data.val()(), torch.device("cpu"), bytes_per_token=4.0)
    assert out["val/loss"] > 0 and out["val/bpb"] == pytest.approx(out["val/loss"] / math.log(2) / 4)
    assert model.training  # evaluate restores the mode it found


def test_fused_linear_cross_entropy_matches_plain_path():
    from llm.train import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(24, 16, requires_grad=True)  # 20 real rows + 4 padding rows
    t = torch.randint(0, 20, (37,))
    t[[3, 10]] = -100
    ref = nn.functional.cross_entropy((h @ w.t())[:, :20], t, ignore_index=-100)
    (ref * 3).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, t, vocab=20, chunk=8)  # several chunks, a ragged last one
    (out * 3).backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)
    assert w.grad[20:].abs().max() == 0  # padding rows never learn


def test_fused_loss_workspace_is_reused_and_never_leaks_between_calls():
    """On CPU the logits buffer lives in the caller's workspace across calls; calls of other sizes (a bigger one
    grows it, a smaller one uses its first rows) and large logits still give the plain path's values."""
    from llm.train import linear_cross_entropy

    torch.manual_seed(1)
    w = torch.randn(24, 16, requires_grad=True)
    ws: dict = {}
    ptrs = []
    for n, scale in ((37, 1.0), (50, 1.0), (20, 40.0), (50, 1.0)):  # scale 40: logits in the hundreds
        h = (torch.randn(n, 16) * scale).requires_grad_()
        t = torch.randint(0, 20, (n,))
        t[::5] = -100
        ref = nn.functional.cross_entropy((h @ w.t())[:, :20], t, ignore_index=-100)
        gh, gw = torch.autograd.grad(ref, (h, w))
        out = linear_cross_entropy(h, w, t, vocab=20, chunk=64, workspace=ws)
        oh, ow = torch.autograd.grad(out, (h, w))
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(oh, gh)
        torch.testing.assert_close(ow, gw)
        ptrs.append(ws["logits"].data_ptr())
    assert ws["logits"].shape == (50, 24)
    assert ptrs[1] == ptrs[2] == ptrs[3] != ptrs[0]  # grown once, then kept


def test_training_with_fused_loss_follows_the_plain_loss(tmp_path):
    a = train(make_model(), cfg(max_steps=5, checkpoint_interval=0, fused_loss=False), Stream(4), None)
    b = train(make_model(), cfg(max_steps=5, checkpoint_interval=0, fused_loss=True), Stream(4), None)
    np.testing.assert_allclose([x for _, x in a.losses], [x for _, x in b.losses], rtol=1e-4)
