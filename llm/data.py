"""Token shards and the resumable pretraining loader (numpy + torch only).

On disk (written by the tokenizer stage through `ShardWriter` + `write_manifest`), a `tokens/` folder holds
flat little-endian token-id files, one document after another with EOS after each document:

    tokens/train-00000.bin  tokens/train-00001.bin ...  tokens/val-00000.bin  manifest.json

`manifest.json`: {"format", "dtype" ("uint16" | "uint32"), "vocab_size", "eos_id", "tokenizer_sha256",
"shards": [{"file", "split", "tokens", "bytes", "sha256"}], "splits": {split: {"tokens", "documents",
"text_bytes", "bytes_per_token"}}}. `bytes_per_token` = UTF-8 bytes of the split's text / its tokens
(EOS included), so bits per byte = mean token loss (nats) / ln(2) / bytes_per_token.

Loader API (what the training loop uses):

    loader = PretrainLoader(tokens_dir, batch_size=8, max_seq_len=256, stride=None, seed=0,
                            rank=0, world_size=1, split="train", shuffle=True)
    x, y = loader.next_batch()          # int64 tensors [batch_size, max_seq_len]; y is x shifted by one
    for x, y in loader: ...             # the same, forever (epochs roll over with a new shuffle)
    state = loader.state_dict()         # small JSON-able dict; save it with the checkpoint
    loader.load_state_dict(state)       # the next batch is exactly the one that followed when state was taken
    loader.fingerprint                  # data fingerprint (sha256 of manifest.json); store it in checkpoints
    loader.bytes_per_token              # of this split, for bits per byte
    for x, y in eval_batches(tokens_dir, batch_size, max_seq_len, split="val", max_batches=20,
                             rank=0, world_size=1): ...   # one deterministic pass, no shuffle

Windows: a window starts every `stride` tokens (default `max_seq_len`: no overlap) and spans
`max_seq_len + 1` tokens of the concatenated split (it may cross document and shard boundaries; EOS marks
documents). Each epoch visits every window once in an order drawn from (seed, epoch). A step consumes
`batch_size * world_size` windows; rank r takes the r-th block of `batch_size`, so a single process with
`batch_size * world_size` sees exactly the union of the ranks' batches in the same order. The state is
(epoch, windows consumed in the epoch), so a run may resume on a different world size as long as the global
batch (batch_size * world_size) stays the same. An incomplete last global batch of an epoch is skipped.

Every shard is checked (size and sha256) against the manifest before first use; a mismatch raises
`DataError` naming the shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm.files import sha256_file

FORMAT = "llm-pipeline.tokens/1"
MANIFEST = "manifest.json"


class DataError(ValueError):
    """Missing, corrupt or mismatched token data; the message names the file and the fix."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends token arrays to `<split>-NNNNN.bin` files of at most `max_tokens` tokens each.

    Plain writes into a folder the caller builds under a temporary name and renames when complete
    (stages.common.atomic_dir), so no partial shard ever sits under a final folder.
    """

    def __init__(self, out_dir: str | Path, split: str, dtype: np.dtype, max_tokens: int = 1 << 27) -> None:
        self.out, self.split, self.dtype, self.max_tokens = Path(out_dir), split, np.dtype(dtype), max_tokens
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None
        self._h: Any = None
        self._n = 0

    def _open(self) -> None:
        self._path = self.out / f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self._path, "wb")
        self._h = hashlib.sha256()
        self._n = 0

    def add(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        while ids.size:
            if self._f is None:
                self._open()
            take = min(ids.size, self.max_tokens - self._n)
            block = ids[:take].tobytes()
            self._f.write(block)
            self._h.update(block)
            self._n += take
            ids = ids[take:]
            if self._n >= self.max_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self.shards.append({"file": self._path.name, "split": self.split, "tokens": self._n,
                            "bytes": self._n * self.dtype.itemsize, "sha256": self._h.hexdigest()})
        self._f = None

    def close(self) -> list[dict[str, Any]]:
        if self._f is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> None:
    m = {"format": FORMAT, **manifest}
    (Path(out_dir) / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------- reading


def read_manifest(tokens_dir: str | Path) -> dict[str, Any]:
    path = Path(tokens_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"{path} does not exist; pass the `tokens` output of the tokenizer stage.")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); rerun the tokenizer stage.") from e
    if m.get("format") != FORMAT:
        raise DataError(f"{path} is not a token manifest (format {m.get('format')!r}, expected {FORMAT}).")
    return m


def data_fingerprint(tokens_dir: str | Path) -> str:
    """A hash that changes whenever any shard (or the tokenizer behind it) changes: sha256 of the manifest."""
    path = Path(tokens_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"{path} does not exist; pass the `tokens` output of the tokenizer stage.")
    return sha256_file(path)


# Shards already hashed, keyed by identity: an eval loop re-opening the val split every few hundred steps should
# not re-read it each time, nor should the other ranks of a machine (at 10B tokens, ~20 GB of reading per rank).
# Any later write changes the file's mtime, so a shard damaged after its check is still caught.
_verified: set[tuple[str, int, int, str]] = set()


def _stamp_dir() -> Path:
    """Where this machine remembers verified shards (one empty file per shard identity), per user."""
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get("LLM_VERIFIED_SHARDS_DIR") or Path(tempfile.gettempdir()) / f"llm-verified-{uid}")


def _verify_once(p: Path, key: tuple[str, int, int, str], folder: Path) -> None:
    """Hash shard `p` unless a process of this machine already did for this identity; one hashes, others wait."""
    stamp = _stamp_dir() / hashlib.sha256(json.dumps(key).encode()).hexdigest()
    if stamp.exists():
        return
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with open(stamp.with_suffix(".lock"), "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        except ImportError:  # no advisory locks: every process hashes for itself
            pass
        if stamp.exists():
            return
        if sha256_file(p) != key[3]:
            raise DataError(f"token shard {p} is corrupt (sha256 differs from {folder / MANIFEST}); "
                            f"rerun the tokenizer stage.")
        if time.time_ns() - key[2] > 2_000_000_000:  # a rewrite within the same coarse mtime tick would keep
            stamp.touch()  # the key: only settled files are remembered


def verify_shards(tokens_dir: str | Path, manifest: dict | None = None, split: str | None = None) -> None:
    """Check every shard's size and sha256 against the manifest; raise DataError naming the first bad one.
    Each shard is hashed once per machine (and remembered per process), not once per rank."""
    folder = Path(tokens_dir)
    manifest = manifest or read_manifest(folder)
    for s in manifest["shards"]:
        if split is not None and s["split"] != split:
            continue
        p = folder / s["file"]
        if not p.exists():
            raise DataError(f"token shard {p} is missing; rerun the tokenizer stage.")
        st = p.stat()
        if st.st_size != s["bytes"]:
            raise DataError(f"token shard {p} is truncated or damaged ({st.st_size} bytes, manifest says "
                            f"{s['bytes']}); rerun the tokenizer stage.")
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns, s["sha256"])
        if key in _verified:
            continue
        _verify_once(p, key, folder)
        if time.time_ns() - st.st_mtime_ns > 2_000_000_000:
            _verified.add(key)


class TokenDataset:
    """One split's shards, memory-mapped and addressed as one flat token array."""

    def __init__(self, tokens_dir: str | Path, split: str = "train", verify: bool = True) -> None:
        self.dir = Path(tokens_dir)
        self.manifest = read_manifest(self.dir)
        self.split = split
        shards = [s for s in self.manifest["shards"] if s["split"] == split]
        if not shards:
            raise DataError(f"{self.dir / MANIFEST} has no shards for split {split!r}.")
        if verify:
            verify_shards(self.dir, self.manifest, split)
        dtype = np.dtype(self.manifest["dtype"])
        self._maps = [np.memmap(self.dir / s["file"], dtype=dtype, mode="r") for s in shards if s["tokens"]]
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])
        self.n_tokens = int(self._starts[-1])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.bytes_per_token = float(self.manifest["splits"][split]["bytes_per_token"])

    def __len__(self) -> int:
        return self.n_tokens

    def get(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated split, crossing shard boundaries."""
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            m = self._maps[i]
            lo = start + filled - int(self._starts[i])
            take = min(length - filled, len(m) - lo)
            out[filled : filled + take] = m[lo : lo + take]
            filled += take
            i += 1
        return out


def _n_windows(n_tokens: int, max_seq_len: int, stride: int) -> int:
    return 0 if n_tokens < max_seq_len + 1 else (n_tokens - max_seq_len - 1) // stride + 1


class PretrainLoader:
    """Shuffled (input, target) windows, sharded across ranks, with an exact-resume state. See the module doc."""

    def __init__(
        self,
        tokens_dir: str | Path,
        batch_size: int,
        max_seq_len: int,
        stride: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        shuffle: bool = True,
        verify: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_seq_len ({max_seq_len}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.data = TokenDataset(tokens_dir, split, verify=verify)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.stride = stride or max_seq_len
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.pin_memory = pin_memory
        self.fingerprint = data_fingerprint(tokens_dir)
        self.n_windows = _n_windows(self.data.n_tokens, max_seq_len, self.stride)
        self.global_batch = batch_size * world_size
        if self.n_windows < self.global_batch:
            raise DataError(
                f"split {split!r} of {tokens_dir} has {self.data.n_tokens} tokens: {self.n_windows} windows of "
                f"{max_seq_len + 1} tokens, fewer than one global batch ({self.global_batch}); use more data, a "
                f"shorter max_seq_len or a smaller batch."
            )
        self.epoch = 0
        self.offset = 0  # windows consumed (by all ranks) in the current epoch
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def bytes_per_token(self) -> float:
        return self.data.bytes_per_token

    @property
    def steps_per_epoch(self) -> int:
        return self.n_windows // self.global_batch

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.offset + self.global_batch > self.n_windows:
            self.epoch += 1
            self.offset = 0
        order = self._epoch_order()
        lo = self.offset + self.rank * self.batch_size
        idx = order[lo : lo + self.batch_size]
        self.offset += self.global_batch
        T = self.max_seq_len
        buf = np.stack([self.data.get(int(w) * self.stride, T + 1) for w in idx])
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "max_seq_len": self.max_seq_len,
                "stride": self.stride, "global_batch": self.global_batch, "split": self.data.split,
                "shuffle": self.shuffle, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("fingerprint", "seed", "max_seq_len", "stride", "global_batch", "split", "shuffle"):
            if key in state and state[key] != getattr(self, key if key != "split" else "_split"):
                raise DataError(
                    f"cannot resume the data loader: {key} was {state[key]!r} when the state was saved and is "
                    f"{getattr(self, key if key != 'split' else '_split')!r} now; resume with the same data "
                    f"and settings, or start a new run."
                )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    @property
    def _split(self) -> str:
        return self.data.split


def eval_batches(
    tokens_dir: str | Path,
    batch_size: int,
    max_seq_len: int,
    split: str = "val",
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    verify: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over non-overlapping windows in order (deterministic), this rank's share; last batch may be short.

    Raises DataError when the split is too small for one window per rank."""
    data = TokenDataset(tokens_dir, split, verify=verify)
    n = _n_windows(data.n_tokens, max_seq_len, max_seq_len)
    if n < world_size:
        raise DataError(f"split {split!r} of {tokens_dir} has {data.n_tokens} tokens, fewer than one window of "
                        f"{max_seq_len + 1}; use a shorter max_seq_len or more validation data.")
    # Every rank gets the same number of windows, so collectives in an eval loop stay in step.
    per_rank = n // world_size
    mine = list(range(rank, per_rank * world_size, world_size))
    for b, lo in enumerate(range(0, len(mine), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        buf = np.stack([data.get(w * max_seq_len, max_seq_len + 1) for w in mine[lo : lo + batch_size]])
        yield torch.from_numpy(np.ascontiguousarray(buf[:, :-1])), torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
