"""Stage `tokenizer`: corpus shards -> a byte-level BPE tokenizer folder + the corpus encoded as token shards.

The tokenizer is trained on the train split, streamed from the Parquet shards (capped at `train_max_bytes`).
Then both splits are encoded in batches (the Rust side of `tokenizers` uses every core), EOS after each
document, into flat uint16/uint32 shards (llm/data.py documents the format and reads them). Each output folder
is built under a temporary name and renamed when complete; a rerun with the same corpus and config reuses them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from llm import data as token_data
from llm.tokenizer import SPECIAL_TOKENS, Tokenizer, save_dir, train_bpe
from stages.common import NullTracker, StageError, StageResult, Tracker, atomic_dir, require_path, sha256_tree
from stages.ingest import DISK_FULL_ERRNOS, disk_full_error, iter_texts, read_manifest


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(2048, ge=len(SPECIAL_TOKENS) + 256, description="Vocabulary size, special tokens and "
                            "the 256 byte tokens included (>= 263). Small for the tiny CPU model; ~32k-64k for real "
                            "corpora. Above 65536 the token shards switch from uint16 to uint32.")
    min_frequency: int = Field(2, ge=1, description="A merge must occur at least this often to be learned.")
    train_max_bytes: int = Field(1 << 30, ge=1, description="Train the tokenizer on at most this many bytes of "
                                 "the train split (the start of it, in shard order).")
    shard_max_tokens: int = Field(1 << 27, ge=1024, description="Tokens per token shard file.")
    encode_batch_docs: int = Field(2048, ge=1, description="Documents per encode_batch call (parallel inside).")


def _train_texts(corpus_dir: Path, manifest: dict, max_bytes: int) -> Iterator[list[str]]:
    """Batches of train texts, up to `max_bytes` characters in all.

    Batches, not single strings: `tokenizers` takes either, and a batch crosses into Rust in one call instead of
    one call per document, which keeps the streamed training as fast as training on an in-memory list.
    """
    used = 0
    for batch in iter_texts(corpus_dir, "train", manifest):
        take = []
        for text in batch:
            take.append(text)
            used += len(text)
            if used >= max_bytes:
                yield take
                return
        yield take


def _fingerprint(cfg: Config, corpus_dir: Path) -> str:
    h = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    h.update((corpus_dir / "manifest.json").read_bytes())
    h.update(token_data.FORMAT.encode())
    return h.hexdigest()


def _reusable(out_dir: Path, fingerprint: str) -> dict | None:
    tok_dir, tokens_dir = out_dir / "tokenizer", out_dir / "tokens"
    try:
        m = token_data.read_manifest(tokens_dir)
    except token_data.DataError:
        return None
    if m.get("input_fingerprint") != fingerprint or not tok_dir.exists():
        return None
    if sha256_tree(tok_dir) != m.get("tokenizer_sha256"):
        return None
    for s in m["shards"]:
        p = tokens_dir / s["file"]
        if not p.exists() or p.stat().st_size != s["bytes"]:
            return None
    return m


def _encode_split(tok: Tokenizer, corpus_dir: Path, manifest: dict, split: str, writer: token_data.ShardWriter,
                  cfg: Config, pbar: tqdm) -> dict[str, float]:
    """Encode one split; the next batch is read from Parquet while the current one is being encoded."""
    eos = np.array([tok.eos_id], dtype=writer.dtype)
    n_tokens = n_docs = n_bytes = 0
    batches = iter_texts(corpus_dir, split, manifest, batch_size=cfg.encode_batch_docs, arrow=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = None
        for arr in batches:
            nxt = pool.submit(tok.encode_batch, arr.to_pylist())  # releases the GIL inside tokenizers
            if future is not None:
                n_tokens += _write(future.result(), eos, writer)
            future = nxt
            n_docs += len(arr)
            n_bytes += pc.sum(pc.binary_length(arr)).as_py() or 0
            pbar.update(len(arr))
        if future is not None:
            n_tokens += _write(future.result(), eos, writer)
    return {"tokens": n_tokens, "documents": n_docs, "text_bytes": n_bytes,
            "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0}


def _write(encoded: list[list[int]], eos: np.ndarray, writer: token_data.ShardWriter) -> int:
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=writer.dtype)
    pos = 0
    for ids, n in zip(encoded, lengths, strict=True):
        flat[pos : pos + n - 1] = ids
        flat[pos + n - 1] = eos[0]
        pos += n
    writer.add(flat)
    return flat.size


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    """Train the tokenizer on `inputs["corpus"]` and encode the corpus; outputs `tokenizer` and `tokens`."""
    if "corpus" not in (inputs or {}):
        raise StageError("the tokenizer stage needs inputs['corpus'] (the ingest stage's output folder).")
    corpus_dir = require_path(inputs["corpus"], "corpus folder")
    manifest = read_manifest(corpus_dir, verify=True)
    if manifest["rows"].get("train", 0) == 0:
        raise StageError(f"the corpus at {corpus_dir} has no train documents; rerun ingest with more data.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "tokens"):  # leftovers of a killed run, never under a final name
        for stale in out_dir.glob(f".{name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    fingerprint = _fingerprint(cfg, corpus_dir)
    tok_dir, tokens_dir = out_dir / "tokenizer", out_dir / "tokens"

    tm = _reusable(out_dir, fingerprint)
    if tm is None:
        try:
            tm = _build(cfg, corpus_dir, manifest, tok_dir, tokens_dir, fingerprint, tracker)
        except OSError as e:
            if e.errno in DISK_FULL_ERRNOS:
                raise disk_full_error(e, out_dir) from e
            raise
    metrics = {k: float(v) for k, v in tm["metrics"].items()}
    tracker.log_metrics(metrics)
    return StageResult(outputs={"tokenizer": tok_dir, "tokens": tokens_dir}, metrics=metrics,
                       samples=tm.get("samples", []))


def _build(cfg: Config, corpus_dir: Path, manifest: dict, tok_dir: Path, tokens_dir: Path, fingerprint: str,
           tracker: Tracker) -> dict[str, Any]:
    t0 = time.perf_counter()
    train_bytes = manifest["text_bytes"]["train"]
    hf = train_bpe(_train_texts(corpus_dir, manifest, cfg.train_max_bytes), cfg.vocab_size, cfg.min_frequency,
                   length=manifest["rows"]["train"], show_progress=False)
    train_s = time.perf_counter() - t0
    tracker.log_metrics({"tokenizer/train_seconds": train_s}, step=0)
    # Both folders are swapped into place only when both are complete, so a failure (disk full, kill) never
    # leaves a new tokenizer next to old tokens.
    total_docs = sum(manifest["rows"].values())
    with (
        atomic_dir(tok_dir) as tok_tmp,
        atomic_dir(tokens_dir) as tmp,
        tqdm(total=total_docs, desc="encode", unit=" docs", mininterval=1.0) as pbar,
    ):
        save_dir(hf, tok_tmp)
        tok = Tokenizer.from_dir(tok_tmp)
        tok_sha = sha256_tree(tok_tmp)
        dtype = token_data.dtype_for_vocab(tok.vocab_size)
        t1 = time.perf_counter()
        splits: dict[str, dict[str, float]] = {}
        shards: list[dict] = []
        for split in ("train", "val"):
            writer = token_data.ShardWriter(tmp, split, dtype, cfg.shard_max_tokens)
            try:
                splits[split] = _encode_split(tok, corpus_dir, manifest, split, writer, cfg, pbar)
            except BaseException:
                writer.abort()
                raise
            shards += writer.close()
        encode_s = time.perf_counter() - t1
        n_tokens = sum(s["tokens"] for s in splits.values())
        metrics = {
            "vocab_size": tok.vocab_size,
            "val/bytes_per_token": splits["val"]["bytes_per_token"],
            "train/bytes_per_token": splits["train"]["bytes_per_token"],
            "tokens/train": splits["train"]["tokens"],
            "tokens/val": splits["val"]["tokens"],
            "tokenizer/train_mb": min(train_bytes, cfg.train_max_bytes) / 1e6,
        }
        # Timings stay out of the manifest so that reruns are byte-identical.
        timings = {"tokenizer/train_seconds": train_s, "encode/tokens_per_s": n_tokens / max(encode_s, 1e-9)}
        samples = _samples(tok, corpus_dir, manifest)
        token_data.write_manifest(tmp, {
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "pad_id": tok.pad_id,
            "tokenizer_sha256": tok_sha,
            "input_fingerprint": fingerprint,
            "shards": shards,
            "splits": splits,
            "metrics": metrics,
            "samples": samples,
        })
    manifest_out = token_data.read_manifest(tokens_dir)
    manifest_out["metrics"] = {**manifest_out["metrics"], **timings}
    return manifest_out


def _samples(tok: Tokenizer, corpus_dir: Path, manifest: dict, n: int = 5) -> list[dict[str, Any]]:
    rows = []
    for batch in iter_texts(corpus_dir, "val", manifest, batch_size=n):
        for text in batch[:n]:
            ids = tok.encode(text[:200])
            rows.append({"text": text[:200], "tokens": len(ids),
                         "pieces": " | ".join(tok.decode([i]) for i in ids[:40])})
        break
    return rows
