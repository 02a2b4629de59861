"""Token shards and the resumable pretraining loader (llm/data.py): windows, shuffling, rank sharding, exact resume, eval batches. Run: .venv/bin/pytest tests/test_data.py"""

import numpy as np
import pytest
import torch

from llm import data


def make_tokens(path, n_train=5000, n_val=700, vocab=1000, shard_tokens=1500, seed=0):
    """A tokens folder whose ids are known (random), split across several shards."""
    rng = np.random.default_rng(seed)
    dtype = data.dtype_for_vocab(vocab)
    arrays = {"train": rng.integers(0, vocab, n_train), "val": rng.integers(0, vocab, n_val)}
    shards, splits = [], {}
    for split, arr in arrays.items():
        w = data.ShardWriter(path, split, dtype, max_tokens=shard_tokens)
        for chunk in np.array_split(arr, 7):  # uneven appends, independent of shard size
            w.add(chunk)
        shards += w.close()
        splits[split] = {"tokens": len(arr), "documents": 1, "text_bytes": 3 * len(arr), "bytes_per_token": 3.0}
    data.write_manifest(path, {"dtype": dtype.name, "vocab_size": vocab, "eos_id": 0, "shards": shards,
                               "splits": splits, "tokenizer_sha256": "x"})
    return arrays


@pytest.fixture
def tokens(tmp_path):
    arrays = make_tokens(tmp_path)
    return tmp_path, arrays


def test_shards_are_split_and_hashed(tokens):
    path, arrays = tokens
    m = data.read_manifest(path)
    train = [s for s in m["shards"] if s["split"] == "train"]
    assert [s["tokens"] for s in train] == [1500, 1500, 1500, 500]
    assert all(s["bytes"] == 2 * s["tokens"] for s in train)
    joined = np.concatenate([np.fromfile(path / s["file"], dtype=np.uint16) for s in train])
    assert (joined == arrays["train"]).all()
    data.verify_shards(path)


def test_dtype_switches_to_uint32_for_big_vocab():
    assert data.dtype_for_vocab(65536) == np.uint16
    assert data.dtype_for_vocab(65537) == np.uint32


def test_windows_are_shifted_and_cross_shards(tokens):
    path, arrays = tokens
    T = 64
    loader = data.PretrainLoader(path, batch_size=4, max_seq_len=T, shuffle=False)
    seen = 0
    for _ in range(loader.steps_per_epoch):
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (4, T) == y.shape
        for row in range(4):
            start = (seen + row) * T
            assert (x[row].numpy() == arrays["train"][start : start + T]).all()
            assert (y[row].numpy() == arrays["train"][start + 1 : start + T + 1]).all()
        seen += 4
    assert loader.n_windows == (5000 - T - 1) // T + 1


def test_stride(tokens):
    path, arrays = tokens
    loader = data.PretrainLoader(path, batch_size=2, max_seq_len=32, stride=8, shuffle=False)
    assert loader.n_windows == (5000 - 33) // 8 + 1
    x, _ = loader.next_batch()
    assert (x[1].numpy() == arrays["train"][8:40]).all()


def test_epoch_visits_every_window_once_in_seeded_order(tokens):
    path, _ = tokens
    T = 50
    loader = data.PretrainLoader(path, batch_size=3, max_seq_len=T, seed=7)
    firsts = [loader.next_batch()[0][:, 0].tolist() for _ in range(loader.steps_per_epoch)]
    again = data.PretrainLoader(path, batch_size=3, max_seq_len=T, seed=7)
    assert firsts == [again.next_batch()[0][:, 0].tolist() for _ in range(again.steps_per_epoch)]
    other = data.PretrainLoader(path, batch_size=3, max_seq_len=T, seed=8)
    assert firsts != [other.next_batch()[0][:, 0].tolist() for _ in range(other.steps_per_epoch)]
    # Window starts of one epoch: all distinct, the dropped tail is smaller than one batch.
    order = loader._epoch_order()
    assert sorted(order.tolist()) == list(range(loader.n_windows))
    assert loader.n_windows - 3 * loader.steps_per_epoch < 3
    # The next epoch is a different order.
    loader.next_batch()
    assert loader.epoch == 1 and not np.array_equal(loader._epoch_order(), order)


def test_ranks_partition_the_global_batch(tokens):
    path, _ = tokens
    single = data.PretrainLoader(path, batch_size=6, max_seq_len=40, seed=1)
    ranks = [data.PretrainLoader(path, batch_size=2, max_seq_len=40, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(single.steps_per_epoch + 3):  # across an epoch boundary
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("k", [0, 1, 5, 23, 40])
def test_exact_resume(tokens, k):
    path, _ = tokens
    ref = data.PretrainLoader(path, batch_size=4, max_seq_len=48, seed=3)
    expected = [ref.next_batch() for _ in range(k + 10)]
    first = data.PretrainLoader(path, batch_size=4, max_seq_len=48, seed=3)
    for _ in range(k):
        first.next_batch()
    state = first.state_dict()
    import json

    state = json.loads(json.dumps(state))  # survives a JSON round trip (checkpoints store it that way)
    resumed = data.PretrainLoader(path, batch_size=4, max_seq_len=48, seed=3)
    resumed.load_state_dict(state)
    for want in expected[k:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_resume_on_a_different_world_size_with_the_same_global_batch(tokens):
    path, _ = tokens
    one = data.PretrainLoader(path, batch_size=4, max_seq_len=32, seed=5)
    for _ in range(9):
        one.next_batch()
    state = one.state_dict()
    expected = one.next_batch()[0]
    two = [data.PretrainLoader(path, batch_size=2, max_seq_len=32, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for loader in two:
        loader.load_state_dict(state)
    assert torch.equal(torch.cat([loader.next_batch()[0] for loader in two]), expected)


def test_resume_refuses_other_data_or_settings(tokens, tmp_path):
    path, _ = tokens
    state = data.PretrainLoader(path, batch_size=4, max_seq_len=32).state_dict()
    other = tmp_path / "other"
    other.mkdir()
    make_tokens(other, seed=1)
    with pytest.raises(data.DataError, match="fingerprint"):
        data.PretrainLoader(other, batch_size=4, max_seq_len=32).load_state_dict(state)
    with pytest.raises(data.DataError, match="max_seq_len"):
        data.PretrainLoader(path, batch_size=4, max_seq_len=16).load_state_dict(state)
    with pytest.raises(data.DataError, match="global_batch"):
        data.PretrainLoader(path, batch_size=8, max_seq_len=32).load_state_dict(state)


def test_fingerprint_tracks_content(tokens, tmp_path):
    path, _ = tokens
    fp = data.data_fingerprint(path)
    assert fp == data.PretrainLoader(path, batch_size=1, max_seq_len=8).fingerprint
    other = tmp_path / "other"
    other.mkdir()
    make_tokens(other, seed=2)
    assert data.data_fingerprint(other) != fp


def test_eval_batches(tokens):
    path, arrays = tokens
    batches = list(data.eval_batches(path, batch_size=4, max_seq_len=64))
    n = (700 - 65) // 64 + 1
    assert sum(len(x) for x, _ in batches) == n
    x0, y0 = batches[0]
    assert (x0[1].numpy() == arrays["val"][64:128]).all() and (y0[1].numpy() == arrays["val"][65:129]).all()
    assert len(list(data.eval_batches(path, 4, 64, max_batches=1))) == 1
    per_rank = [sum(len(x) for x, _ in data.eval_batches(path, 2, 64, rank=r, world_size=3)) for r in range(3)]
    assert per_rank == [n // 3] * 3


def test_too_little_data_is_a_clear_error(tokens):
    path, _ = tokens
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        data.PretrainLoader(path, batch_size=64, max_seq_len=512)
    with pytest.raises(data.DataError, match="split 'test'"):
        data.PretrainLoader(path, batch_size=1, max_seq_len=8, split="test")
    with pytest.raises(data.DataError, match="manifest.json does not exist"):
        data.PretrainLoader(path / "nope", batch_size=1, max_seq_len=8)


def test_verification_is_cached_but_still_catches_later_damage(tokens):
    import os
    import time

    path, _ = tokens
    shard = path / "train-00000.bin"
    old = time.time() - 60
    for f in path.glob("*.bin"):
        os.utime(f, (old, old))
    data.verify_shards(path)
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))  # a new mtime: the cached check no longer applies
    with pytest.raises(data.DataError, match="train-00000.bin is corrupt"):
        data.verify_shards(path)


def test_each_shard_is_hashed_once_per_machine_not_once_per_process(tokens, tmp_path, monkeypatch):
    import os
    import time

    path, _ = tokens
    monkeypatch.setenv("LLM_VERIFIED_SHARDS_DIR", str(tmp_path / "stamps"))
    old = time.time() - 60
    for f in path.glob("*.bin"):
        os.utime(f, (old, old))
    data.verify_shards(path)  # the first process of the machine (say LOCAL_RANK 0) reads every shard
    assert len(list((tmp_path / "stamps").iterdir())) >= len(list(path.glob("*.bin")))
    data._verified.clear()  # another process on the same machine: nothing remembered in memory

    def no_reading(p):
        raise AssertionError(f"{p} was hashed again")

    monkeypatch.setattr(data, "sha256_file", no_reading)
    data.verify_shards(path)
    monkeypatch.undo()
    monkeypatch.setenv("LLM_VERIFIED_SHARDS_DIR", str(tmp_path / "stamps"))
    shard = path / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))  # damaged later: a new identity, so it is read again and caught
    data._verified.clear()
    with pytest.raises(data.DataError, match="train-00000.bin is corrupt"):
        data.verify_shards(path)
