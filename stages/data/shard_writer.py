"""Writing the corpus: size-bounded zstd Parquet shards per split, with encoding and file IO on one background thread.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.common import sha256_file

SCHEMA = pa.schema([("text", pa.string()), ("id", pa.string()), ("source", pa.string())])


class IOThread:
    """A one-thread pool for writer work: in order, at most `depth` tasks queued, errors re-raised promptly."""

    def __init__(self, depth: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-io")
        self._pending: deque[Future] = deque()
        self._depth = depth

    def submit(self, fn: Any, *args: Any) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= self._depth):
            self._pending.popleft().result()  # raises the worker's error (e.g. disk full) here
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def shutdown(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()


class ShardWriter:
    """Writes one split's rows into size-bounded zstd Parquet shards, each closed before the next opens.

    Row-group and shard boundaries fall after the row that reaches the byte limit, whatever the batch sizes,
    so the output depends only on the documents. Encoding, compression and file IO run on `io`, a one-thread
    pool shared by the writers (Arrow releases the GIL there), so they overlap with cleaning the next batch.
    The shard list (`shards`, manifest entries) is complete once `close_shard` ran and the pool is drained.
    """

    def __init__(self, out: Path, split: str, io: IOThread, shard_max_bytes: int, row_group_bytes: int,
                 compression_level: int) -> None:
        self.out, self.split, self.io = out, split, io
        self.shard_max_bytes, self.row_group_bytes, self.compression_level = (shard_max_bytes, row_group_bytes,
                                                                               compression_level)
        self.shards: list[dict[str, Any]] = []
        self._n_shards = 0
        self._writer: pq.ParquetWriter | None = None
        self._open = False
        self._chunks: list[tuple[pa.Array, pa.Array, str]] = []
        self._buffered = 0
        self._shard_rows = 0
        self._shard_bytes = 0

    def _path(self) -> Path:
        return self.out / f"{self.split}-{self._n_shards:05d}.parquet"

    def add(self, texts: pa.Array, ids: pa.Array, sizes: np.ndarray, source: str) -> None:
        cum = np.cumsum(sizes)
        start, n = 0, len(texts)
        while start < n:
            if not self._open:
                path = self._path()
                self.io.submit(self._open_file, path)
                self._open = True
            room = min(self.row_group_bytes - self._buffered, self.shard_max_bytes - self._shard_bytes)
            base = int(cum[start - 1]) if start else 0
            end = min(int(np.searchsorted(cum, base + room, side="left")) + 1, n)
            added = int(cum[end - 1]) - base
            self._chunks.append((texts.slice(start, end - start), ids.slice(start, end - start), source))
            self._buffered += added
            self._shard_bytes += added
            self._shard_rows += end - start
            if self._buffered >= self.row_group_bytes:
                self._flush_rows()
            if self._shard_bytes >= self.shard_max_bytes:
                self.close_shard()
            start = end

    def _open_file(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, SCHEMA, compression="zstd",
                                        compression_level=self.compression_level)

    def _write(self, chunks: list[tuple[pa.Array, pa.Array, str]]) -> None:
        texts = pa.concat_arrays([c[0] for c in chunks])
        ids = pa.concat_arrays([c[1] for c in chunks])
        sources = pa.concat_arrays([pa.repeat(pa.scalar(c[2], pa.string()), len(c[0])) for c in chunks])
        table = pa.Table.from_arrays([texts, ids, sources], schema=SCHEMA)
        assert self._writer is not None
        self._writer.write_table(table, row_group_size=len(table))

    def _flush_rows(self) -> None:
        if self._chunks:
            self.io.submit(self._write, self._chunks)
        self._chunks = []
        self._buffered = 0

    def _close_file(self, path: Path, rows: int, text_bytes: int) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        self.shards.append({"file": path.name, "split": self.split, "rows": rows, "text_bytes": text_bytes,
                            "bytes": path.stat().st_size, "sha256": sha256_file(path)})

    def close_shard(self) -> None:
        if not self._open:
            return
        self._flush_rows()
        self.io.submit(self._close_file, self._path(), self._shard_rows, self._shard_bytes)
        self._open, self._n_shards, self._shard_rows, self._shard_bytes = False, self._n_shards + 1, 0, 0

    def abort(self) -> None:
        """After a failure: close the open file (the caller's temporary folder is removed anyway)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None


class SplitWriters:
    """The train and val writers of one corpus and their IO thread; `finish` returns the shard entries in manifest
    order, and leaving the `with` block always stops the thread and closes any open file."""

    SPLITS = ("train", "val")

    def __init__(self, out: Path, shard_max_bytes: int, row_group_bytes: int, compression_level: int) -> None:
        self.io = IOThread()
        self.writers = {s: ShardWriter(out, s, self.io, shard_max_bytes, row_group_bytes, compression_level)
                        for s in self.SPLITS}

    def __getitem__(self, split: str) -> ShardWriter:
        return self.writers[split]

    def finish(self) -> list[dict[str, Any]]:
        for w in self.writers.values():
            w.close_shard()
        self.io.drain()
        return [s for split in self.SPLITS for s in self.writers[split].shards]

    def __enter__(self) -> SplitWriters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.io.shutdown()
        for w in self.writers.values():
            w.abort()
