"""Stage `tokenizer`: corpus shards -> a byte-level BPE tokenizer folder + the corpus encoded as token shards.

The tokenizer is trained on the train split, streamed from the Parquet shards (capped at `train_max_bytes`).
Then both splits are encoded in batches (the Rust side of `tokenizers` uses every core), EOS after each
document, into flat uint16/uint32 shards (llm/data.py documents the format and reads them). With `workers` > 1 (or
`dask_address`) each Parquet row group of the corpus is encoded on a Dask worker process (`stages.runtime.fanout`, as ingest
fans out) and the results are written here in corpus order, so the token shards are the same bytes as with one. Each output folder
is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from llm import data as token_data
from llm.tokenizer import SPECIAL_TOKENS, Tokenizer, save_dir, train_bpe
from stages import common
from stages.common import NullTracker, StageError, StageResult, Tracker, atomic_dir, require_path, sha256_tree
from stages.data.corpus_reader import MANIFEST, iter_texts, read_manifest
from stages.runtime import fanout


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
    workers: int = Field(1, ge=1, description="Processes that encode the corpus, a Parquet row group each at a time, "
                         "on a local Dask cluster (under Prefect: its Dask task runner); the shards are written here "
                         "in order, so they are byte-identical to 1, which encodes in this process without Dask. "
                         "encode_batch already uses every core of one machine.")
    dask_address: str | None = Field(None, description="Scheduler of an existing Dask cluster (tcp://HOST:PORT) to "
                                     "encode on; its workers need this project installed and the corpus and the "
                                     "new tokenizer at the same paths (a shared file system).")


# How the work is spread, not what it computes: kept out of the cache key (tests/test_execution_fields.py).
EXECUTION_FIELDS = {"workers", "dask_address"}


def train_texts(corpus_dir: Path, manifest: dict, max_bytes: int) -> Iterator[list[str]]:
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


def encode_split(tok: Tokenizer, corpus_dir: Path, manifest: dict, split: str, writer: token_data.ShardWriter,
                  cfg: Config, pbar: tqdm) -> dict[str, float]:
    """Encode one split in this process; the next batch is read from Parquet while the current one is encoded."""
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


def _flat(encoded: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    """The documents' token ids end to end, EOS after each."""
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for ids, n in zip(encoded, lengths, strict=True):
        flat[pos : pos + n - 1] = ids
        flat[pos + n - 1] = eos
        pos += n
    return flat


def _write(encoded: list[list[int]], eos: np.ndarray, writer: token_data.ShardWriter) -> int:
    flat = _flat(encoded, int(eos[0]), writer.dtype)
    writer.add(flat)
    return flat.size


@functools.lru_cache(maxsize=2)
def _worker_tokenizer(tok_dir: str) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def _encode_unit(unit: tuple[str, int], tok_dir: str, dtype: str, batch_docs: int) -> tuple[np.ndarray, int, int]:
    """One row group of a corpus shard encoded (the work a fan-out worker does): (tokens, documents, text bytes).
    Each document is encoded on its own, so how the corpus is cut into units does not change a token."""
    tok = _worker_tokenizer(tok_dir)
    texts = pq.ParquetFile(unit[0]).read_row_group(unit[1], columns=["text"]).column(0)
    parts, n_bytes = [], 0
    for start in range(0, len(texts), batch_docs):
        arr = texts.slice(start, batch_docs)
        n_bytes += pc.sum(pc.binary_length(arr)).as_py() or 0
        parts.append(_flat(tok.encode_batch(arr.to_pylist()), tok.eos_id, np.dtype(dtype)))
    return (np.concatenate(parts) if parts else np.empty(0, np.dtype(dtype))), len(texts), n_bytes


def encode_split_fanout(mapper: fanout.Mapper, tok_dir: Path, corpus_dir: Path, manifest: dict, split: str,
                        writer: token_data.ShardWriter, cfg: Config, pbar: tqdm) -> dict[str, float]:
    """Encode one split a row group per worker; results come back in corpus order and are written here."""
    units = [(str(corpus_dir / s["file"]), rg) for s in manifest["shards"] if s["split"] == split
             for rg in range(pq.ParquetFile(corpus_dir / s["file"]).num_row_groups)]
    fn = functools.partial(_encode_unit, tok_dir=str(tok_dir), dtype=writer.dtype.name,
                           batch_docs=cfg.encode_batch_docs)
    n_tokens = n_docs = n_bytes = 0
    for tokens, docs, size in mapper.map(fn, units, [f"{Path(f).stem}-rg{rg}" for f, rg in units]):
        writer.add(tokens)
        n_tokens, n_docs, n_bytes = n_tokens + tokens.size, n_docs + docs, n_bytes + size
        pbar.update(docs)
    return {"tokens": n_tokens, "documents": n_docs, "text_bytes": n_bytes,
            "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0}


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
    common.remove_stale(out_dir, ("tokenizer", "tokens"))
    # The corpus manifest carries every shard's sha256, so hashing it stands for hashing the corpus.
    key = common.fingerprint(cfg, inputs={"corpus": corpus_dir / MANIFEST}, extra={"format": token_data.FORMAT},
                             exclude=EXECUTION_FIELDS)
    tok_dir, tokens_dir = out_dir / "tokenizer", out_dir / "tokens"
    outputs = {"tokenizer": tok_dir, "tokens": tokens_dir}

    with common.stop_when_disk_full(out_dir):
        tm, timings = _build(cfg, corpus_dir, manifest, tok_dir, tokens_dir, key, tracker)
    result = StageResult(outputs=outputs, metrics={**tm["metrics"], **timings}, samples=tm["samples"])
    result.metrics = {k: float(v) for k, v in result.metrics.items()}
    tracker.log_metrics(result.metrics)
    return result


def _build(cfg: Config, corpus_dir: Path, manifest: dict, tok_dir: Path, tokens_dir: Path, key: str,
           tracker: Tracker) -> tuple[dict[str, Any], dict[str, float]]:
    """Train and encode; returns the tokens manifest and the timings (kept out of it so reruns are byte-identical)."""
    t0 = time.perf_counter()
    train_bytes = manifest["text_bytes"]["train"]
    hf = train_bpe(train_texts(corpus_dir, manifest, cfg.train_max_bytes), cfg.vocab_size, cfg.min_frequency,
                   length=manifest["rows"]["train"], show_progress=False)
    train_s = time.perf_counter() - t0
    tracker.log_metrics({"tokenizer/train_seconds": train_s}, step=0)
    # Both folders are swapped into place only when both are complete, so a failure (disk full, kill) never
    # leaves a new tokenizer next to old tokens.
    total_docs = sum(manifest["rows"].values())
    with (
        contextlib.ExitStack() as stack,
        atomic_dir(tok_dir) as tok_tmp,
        atomic_dir(tokens_dir) as tmp,
        tqdm(total=total_docs, desc="encode", unit=" docs", mininterval=1.0) as pbar,
    ):
        mapper = (stack.enter_context(fanout.open_mapper(cfg.workers, cfg.dask_address, "tokenizer"))
                  if cfg.workers > 1 or cfg.dask_address else None)
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
                splits[split] = (encode_split(tok, corpus_dir, manifest, split, writer, cfg, pbar) if mapper is None
                                 else encode_split_fanout(mapper, tok_tmp, corpus_dir, manifest, split, writer, cfg,
                                                          pbar))
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
        timings = {"tokenizer/train_seconds": train_s, "encode/tokens_per_s": n_tokens / max(encode_s, 1e-9)}
        samples = _samples(tok, corpus_dir, manifest)
        token_data.write_manifest(tmp, {
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "pad_id": tok.pad_id,
            "tokenizer_sha256": tok_sha,
            "input_fingerprint": key,
            "shards": shards,
            "splits": splits,
            "metrics": metrics,
            "samples": samples,
        })
    return token_data.read_manifest(tokens_dir), timings


def _samples(tok: Tokenizer, corpus_dir: Path, manifest: dict, n: int = 5) -> list[dict[str, Any]]:
    rows = []
    for batch in iter_texts(corpus_dir, "val", manifest, batch_size=n):
        for text in batch[:n]:
            ids = tok.encode(text[:200])
            rows.append({"text": text[:200], "tokens": len(ids),
                         "pieces": " | ".join(tok.decode([i]) for i in ids[:40])})
        break
    return rows
