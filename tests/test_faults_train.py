"""Training-side fault injection (issue 7): kill -9, torn/corrupt checkpoints, disk full, NaN/Inf, changed runs, pickles.

Run: .venv/bin/pytest tests/test_faults_train.py -q   (the kill -9 tests are marked slow; they run subprocesses)
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llm.train.checkpoints as T  # every checkpoint byte goes through T._write_file
from llm.train import (
    CheckpointError,
    ResumeMismatch,
    TrainingDiverged,
    list_checkpoints,
    train,
    verify_checkpoint,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_train import Stream, assert_same_weights, cfg, make_model, weights  # noqa: E402

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
KILL_CFG = dict(max_steps=30, checkpoint_interval=5, keep_last=3)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: tiny models run fastest on one thread


# ---- the worker a subprocess runs (python tests/test_faults_train.py DIR [--hang-in-ckpt STEP]) ---------------


def _worker(out: Path, hang_in_ckpt: int | None) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # identical reductions in every process
    if hang_in_ckpt is not None:
        real_write = T._write_file

        def write_then_hang(path: Path, data: bytes) -> None:
            if path.parent.name == f".step_{hang_in_ckpt:08d}.tmp" and path.name == "optimizer.safetensors":
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                (out / "hanging").write_text("in the middle of a checkpoint write")
                time.sleep(600)
            real_write(path, data)

        T._write_file = write_then_hang
    log = open(out / "losses.jsonl", "a")

    def on_step(step, m):
        log.write(json.dumps({"step": step, "loss": m["train/loss"]}) + "\n")
        log.flush()
        time.sleep(0.03)  # give the killer a window inside the run

    model = make_model()
    res = train(model, cfg(**KILL_CFG), Stream(4), out / "ck", on_step=on_step)
    log.write(json.dumps({"resumed_from": res.resumed_from, "done": True}) + "\n")
    log.close()
    save_file(weights(model), str(out / "final.safetensors"))


def _spawn(out: Path, *extra: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(HERE), str(out), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen) -> str:
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 0, text
    return text


def _records(out: Path) -> list[dict]:
    path = out / "losses.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _final(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    _finish(_spawn(out))
    return out


def _steps(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "step" in r}


# ---- 1. kill -9 at a random step after a checkpoint -------------------------------------------------------------


@pytest.mark.slow
def test_kill9_then_resume_is_bit_exact(tmp_path, reference):
    kill_at = random.Random().randint(6, 27)  # somewhere after the first checkpoint (step 5), before the end
    out = tmp_path / "run"
    p = _spawn(out)
    deadline = time.time() + 120
    while time.time() < deadline and not any(r.get("step", 0) >= kill_at for r in _records(out)):
        assert p.poll() is None, p.communicate()[0]
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_after = max(r["step"] for r in _records(out))
    assert killed_after < KILL_CFG["max_steps"], "the run finished before the kill landed"
    # the kill may land before or after the write of a checkpoint due at killed_after: either is fine
    resume_point = max(s for s, _ in list_checkpoints(out / "ck"))
    assert 5 <= resume_point <= killed_after and killed_after - resume_point <= 5

    (out / "losses.jsonl").rename(out / "before_kill.jsonl")
    _finish(_spawn(out))
    after = _records(out)
    assert after[-1] == {"resumed_from": resume_point, "done": True}, f"kill_at={kill_at}"
    ref = _steps(_records(reference))
    resumed = _steps(after)
    assert list(resumed) == list(range(resume_point + 1, 31)), "a batch was skipped or repeated"
    assert resumed == {s: ref[s] for s in resumed}, f"losses differ after resume (kill_at={kill_at})"
    assert_same_weights(_final(out), _final(reference))


# ---- 2. kill -9 in the middle of a checkpoint write -------------------------------------------------------------


@pytest.mark.slow
def test_kill9_during_checkpoint_write_uses_previous_and_cleans_up(tmp_path, reference):
    out = tmp_path / "run"
    p = _spawn(out, "--hang-in-ckpt", "15")
    deadline = time.time() + 120
    while not (out / "hanging").exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()[0]
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = out / "ck" / ".step_00000015.tmp"
    assert partial.is_dir() and not (out / "ck" / "step_00000015").exists()
    assert [s for s, _ in list_checkpoints(out / "ck")] == [10, 5]

    text = _finish(_spawn(out))
    assert "removed partial checkpoint" in text and ".step_00000015.tmp" in text
    assert not partial.exists()
    assert _records(out)[-1] == {"resumed_from": 10, "done": True}
    assert_same_weights(_final(out), _final(reference))


# ---- 3. flipped byte / truncated file -----------------------------------------------------------------------------


def _three_checkpoints(tmp_path) -> Path:
    train(make_model(), cfg(max_steps=12, checkpoint_interval=4, keep_last=3), Stream(4), tmp_path / "ck")
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [12, 8, 4]
    return tmp_path / "ck"


def test_corrupt_checkpoint_is_detected_and_resume_falls_back(tmp_path, caplog):
    ck = _three_checkpoints(tmp_path)
    flipped = ck / "step_00000012" / "model.safetensors"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(bytes(raw))
    truncated = ck / "step_00000008" / "optimizer.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])

    with pytest.raises(CheckpointError, match=str(flipped)):
        verify_checkpoint(flipped.parent)
    with pytest.raises(CheckpointError, match=str(truncated)):
        verify_checkpoint(truncated.parent)

    with caplog.at_level("WARNING", logger="llm.train"):
        res = train(make_model(), cfg(max_steps=14, checkpoint_interval=4, keep_last=3), Stream(4), ck)
    assert res.resumed_from == 4  # both newer ones were refused
    assert str(flipped) in caplog.text and str(truncated) in caplog.text
    verify_checkpoint(ck / "step_00000012")  # rewritten whole by the resumed run


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path):
    ck = _three_checkpoints(tmp_path)
    for _, p in list_checkpoints(ck):
        (p / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*trainer_state.json"):
        train(make_model(), cfg(max_steps=14), Stream(4), ck)


# ---- 4. disk full while writing a checkpoint ----------------------------------------------------------------------


def test_disk_full_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    real = T._write_file

    def enospc_at_step_8(path: Path, data: bytes) -> None:
        if path.parent.name == ".step_00000008.tmp" and path.name == "model.safetensors":
            with open(path, "wb") as f:
                f.write(data[:1000])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(T, "_write_file", enospc_at_step_8)
    ck = tmp_path / "ck"
    with pytest.raises(CheckpointError, match=r"disk is full.*step_00000004 is intact"):
        train(make_model(), cfg(max_steps=12, checkpoint_interval=4), Stream(4), ck)
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000004"]  # no partial file under any name
    verify_checkpoint(ck / "step_00000004")

    monkeypatch.setattr(T, "_write_file", real)
    res = train(make_model(), cfg(max_steps=12, checkpoint_interval=4), Stream(4), ck)
    assert res.resumed_from == 4 and res.step == 12


# ---- 6. NaN / Inf in the loss or the gradients --------------------------------------------------------------------


class Poisoned(torch.nn.Module):
    """Wraps a model; on chosen optimizer steps makes the loss NaN or a gradient Inf."""

    def __init__(self, inner, nan_loss=(), inf_grad=()):
        super().__init__()
        self.inner, self.nan_loss, self.inf_grad, self.calls = inner, set(nan_loss), set(inf_grad), 0
        for attr in ("config", "cfg"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    def forward(self, idx, targets=None):
        logits, loss = self.inner(idx, targets)
        if self.training:
            self.calls += 1  # one micro batch per step in these tests: calls == the step being computed
            if self.calls in self.nan_loss:
                loss = loss * float("nan")
            if self.calls in self.inf_grad:
                loss = loss + 0 * logits.sum()
                logits.register_hook(lambda g: g * float("inf"))
        return logits, loss


def test_nonfinite_loss_or_grad_never_reaches_weights(tmp_path):
    model = Poisoned(make_model(), nan_loss={3}, inf_grad={5})
    snaps = {}
    res = train(model, cfg(max_steps=8, checkpoint_interval=0), Stream(4), tmp_path / "ck",
                on_step=lambda s, m: snaps.__setitem__(s, (weights(model), m["train/grad_norm"])))
    assert res.skipped_steps == 2 and res.step == 8
    assert_same_weights(snaps[3][0], snaps[2][0])  # step 3 (NaN loss) changed nothing
    assert_same_weights(snaps[5][0], snaps[4][0])  # step 5 (Inf grad) changed nothing
    assert any(not torch.equal(snaps[4][0][k], snaps[3][0][k]) for k in snaps[4][0])  # step 4 did train
    assert all(torch.isfinite(v).all() for v in weights(model).values())
    state = json.loads((res.checkpoint / "trainer_state.json").read_text())
    assert state["loop"]["skipped_steps"] == 2
    from safetensors.torch import load_file

    steps = {k: v for k, v in load_file(str(res.checkpoint / "optimizer.safetensors")).items() if k.endswith("step")}
    assert all(v.item() == 6 for v in steps.values())  # AdamW took 6 real steps, not 8


def test_repeated_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path):
    model = Poisoned(make_model(), nan_loss=set(range(7, 100)))
    ck = tmp_path / "ck"
    with pytest.raises(TrainingDiverged, match=r"3 consecutive.*max_bad_steps=3.*step_00000004"):
        train(model, cfg(max_steps=20, checkpoint_interval=4, max_bad_steps=3), Stream(4), ck)
    assert [s for s, _ in list_checkpoints(ck)] == [4]  # step 8 fell inside the bad streak: not written
    verify_checkpoint(ck / "step_00000004")
    assert all(torch.isfinite(v).all() for v in weights(model).values())


# ---- 10. resuming a changed run -------------------------------------------------------------------------------------


def test_resume_with_changed_model_shape_fails_fast_before_writing(tmp_path):
    ck = tmp_path / "ck"
    train(make_model(), cfg(max_steps=4), Stream(4), ck)
    before = {p: p.stat().st_mtime_ns for p in ck.rglob("*")}
    bigger = make_model(n_layer=3)
    t0 = time.perf_counter()
    with pytest.raises(ResumeMismatch, match=r"n_layer: 2 -> 3|blocks\.2"):
        train(bigger, cfg(max_steps=8), Stream(4), ck)
    assert time.perf_counter() - t0 < 5
    assert {p: p.stat().st_mtime_ns for p in ck.rglob("*")} == before


# ---- security: a pickle where a checkpoint file is expected -------------------------------------------------------


class _Evil:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("victim", ["optimizer.safetensors", "model.safetensors", "rng_rank0.safetensors"])
def test_pickle_in_checkpoint_is_refused_not_executed(tmp_path, victim):
    ck = tmp_path / "ck"
    train(make_model(), cfg(max_steps=4), Stream(4), ck)
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    target = ck / "step_00000004" / victim
    target.write_bytes(pickle.dumps(evil))
    manifest = json.loads((target.parent / "manifest.json").read_text())
    from stages.common import sha256_file

    manifest["files"][victim] = sha256_file(target)  # an attacker who also fixes the checksum
    (target.parent / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"{victim} is not a valid safetensors file"):
        train(make_model(), cfg(max_steps=8), Stream(4), ck)
    assert not evil.marker.exists()


def test_training_code_never_unpickles():
    names = ["llm/optim.py", "llm/distributed.py", "llm/checkpoint.py", "llm/loss.py", "stages/pretrain.py"]
    for path in [*(ROOT / n for n in names), *sorted((ROOT / "llm" / "train").glob("*.py"))]:
        if path.exists():
            src = path.read_text()
            assert "import pickle" not in src and "pickle.load" not in src
            assert "torch.load(" not in src or "weights_only=True" in src


if __name__ == "__main__":
    args = sys.argv[1:]
    hang = int(args[args.index("--hang-in-ckpt") + 1]) if "--hang-in-ckpt" in args else None
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    _worker(Path(args[0]), hang)
