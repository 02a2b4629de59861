"""Data parallel training on CPU: torchrun launches 2 gloo processes (DDP, FSDP2) that match a 1-process run.

Run: .venv/bin/pytest tests/test_ddp.py -q   (slow: each case starts torchrun with two Python processes)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
VOCAB, SEQ, GLOBAL_BATCH, STEPS = 64, 16, 4, 8


def make_tokens(out: Path) -> Path:
    """A learnable token stream written as real shards (llm.data's format) with train and val splits."""
    from llm.data import ShardWriter, write_manifest

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(3, VOCAB, size=40)
    splits = {}
    shards = []
    for split, n in (("train", 12_000), ("val", 1_000)):
        toks = np.concatenate([np.roll(base, i % 5) for i in range(n // 40)])
        w = ShardWriter(out, split, np.dtype(np.uint16), max_tokens=5_000)
        w.add(toks)
        shards += w.close()
        splits[split] = {"tokens": int(toks.size), "documents": 1, "text_bytes": int(toks.size) * 2,
                         "bytes_per_token": 2.0}
    write_manifest(out, {"dtype": "uint16", "vocab_size": VOCAB, "eos_id": 1, "shards": shards, "splits": splits})
    return out


class CrashAfter:
    """Forwards a loader, then raises on every rank at the same batch: a whole-job crash."""

    def __init__(self, loader, n: int):
        self.loader, self.left = loader, n

    def next_batch(self):
        self.left -= 1
        if self.left < 0:
            raise SystemExit(3)
        return self.loader.next_batch()

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def worker(tokens: Path, out: Path, parallel: str, steps: int, crash_after: int) -> None:
    """Runs under torchrun (or alone): trains with the global batch split over the ranks, rank 0 saves results."""
    from safetensors.torch import save_file

    from llm import distributed as D
    from llm.config import get_config
    from llm.data import PretrainLoader, eval_batches
    from llm.model import build_model
    from llm.train import TrainConfig, train

    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    micro = GLOBAL_BATCH // info.world_size
    torch.manual_seed(0)  # identical initial weights on every rank
    model = build_model(get_config("tiny", vocab_size=VOCAB, max_seq_len=SEQ, n_layer=2, n_embd=32, n_heads=2))
    loader = PretrainLoader(tokens, batch_size=micro, max_seq_len=SEQ, seed=3, rank=info.rank,
                            world_size=info.world_size)
    data = CrashAfter(loader, crash_after) if crash_after else loader
    cfg = TrainConfig(max_steps=steps, micro_batch_size=micro, seq_len=SEQ, lr=1e-2, warmup_steps=2,
                      eval_interval=4, eval_batches=2, checkpoint_interval=4, progress=False, device="cpu",
                      parallel=parallel)
    evals = []
    res = train(model, cfg, data, out / "ck",
                val_batches=lambda: eval_batches(tokens, micro, SEQ, max_batches=2, rank=info.rank,
                                                 world_size=info.world_size),
                bytes_per_token=2.0, on_eval=lambda s, m: evals.append((s, m["val/loss"])))
    if info.is_main:
        (out / "result.json").write_text(json.dumps({"losses": res.losses, "evals": evals,
                                                     "resumed_from": res.resumed_from}))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(out / "final.safetensors"))
    D.exit_worker()


def run_torchrun(tokens: Path, out: Path, parallel: str, nproc: int, crash_after: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(HERE),
           str(tokens), str(out), parallel, str(STEPS), str(crash_after)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if crash_after:
        assert p.returncode != 0
        return {}
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads((out / "result.json").read_text())


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tokens = make_tokens(root / "tokens")
    return tokens, run_torchrun(tokens, root / "one", "ddp", 1), root


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(single, parallel):
    tokens, one, root = single
    out = root / f"two-{parallel}"
    two = run_torchrun(tokens, out, parallel, 2)
    assert [s for s, _ in two["losses"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([x for _, x in two["losses"]], [x for _, x in one["losses"]], rtol=2e-5)
    np.testing.assert_allclose([x for _, x in two["evals"]], [x for _, x in one["evals"]], rtol=2e-5)
    assert one["losses"][-1][1] < one["losses"][0][1] - 0.5  # it did learn
    a, b = final_weights(out), final_weights(root / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ck = out / "ck" / f"step_{STEPS:08d}"
    assert {"rank0.json", "rank1.json", "rng_rank0.safetensors", "rng_rank1.safetensors"} <= {
        p.name for p in ck.iterdir()}


@pytest.mark.slow
def test_resume_on_a_different_world_size(single, tmp_path):
    """A checkpoint written by 2 ranks resumes on 1: same global batch, so the data order carries on exactly."""
    tokens, one, root = single
    out = tmp_path / "elastic"
    run_torchrun(tokens, out, "ddp", 2, crash_after=5)  # dies in step 5, after the step-4 checkpoint
    cont = run_torchrun(tokens, out, "ddp", 1)
    assert cont["resumed_from"] == 4
    np.testing.assert_allclose([x for _, x in cont["losses"]], [x for _, x in one["losses"][4:]], rtol=2e-5)


if __name__ == "__main__":
    tokens_dir, out_dir, mode, n_steps, crash = sys.argv[1:6]
    worker(Path(tokens_dir), Path(out_dir), mode, int(n_steps), int(crash))
