"""Stage `ingest`: raw text sources -> cleaned, deduplicated, split zstd Parquet shards + manifest.json.

Sources (any mix, read in order, streamed so a corpus never has to fit in memory):
* `builtin`: the seeded synthetic corpus of stages/corpus.py (also writes the `tasks` folder);
* `files`: local .txt / .jsonl / .parquet files or globs;
* `hf`: a Hugging Face dataset by name (streaming) or a local dataset folder.

Cleaning per document: newline normalisation, Unicode normalisation (NFC by default), control characters
removed, length filters, exact dedup by content hash, a train/val split by the same hash (stable when the
corpus grows). Bad records (invalid UTF-8, malformed JSON, a missing text field, an unreadable or corrupt file)
are counted and listed in `quarantine.jsonl`; more than `max_bad_fraction` of them fails the stage with the
first offending file and line. Output folders are built under a temporary name and renamed when complete, so
a killed run leaves nothing under the final name, and a rerun with the same inputs and config is a no-op
(byte-identical shards either way).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import queue
import re
import shutil
import threading
import unicodedata
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from stages import corpus
from stages.common import (
    NullTracker,
    StageError,
    StageResult,
    Tracker,
    TransientError,
    atomic_dir,
    sha256_file,
    write_json,
)

FORMAT = "llm-pipeline.corpus/1"
SCHEMA = pa.schema([("text", pa.string()), ("id", pa.string()), ("source", pa.string())])


class BuiltinSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["builtin"] = Field("builtin", description="The built-in synthetic corpus and task set.")
    seed: int = Field(0, description="Seed of the generator; the same seed gives byte-identical data.")
    n_documents: int = Field(12000, ge=1, description="Pretraining documents (~250 bytes each; 12000 is ~3 MB).")
    n_sft: int = Field(4000, ge=1, description="SFT chat examples (sft.jsonl).")
    n_pref: int = Field(2000, ge=1, description="Preference pairs for the reward model (preferences.jsonl).")
    n_heldout: int = Field(200, ge=1, description="Items in each held-out set (heldout, sft_eval, preferences_eval).")
    n_rl_prompts: int = Field(1000, ge=1, description="Training prompts for RL (rl_prompts.jsonl).")


class FilesSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["files"] = Field("files", description="Local files.")
    paths: list[str] = Field(..., min_length=1, description="Files or glob patterns (** allowed), read in sorted order.")
    format: Literal["auto", "txt", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' goes by the extension (.txt, .jsonl/.json, .parquet).")
    text_field: str = Field("text", description="Field (JSONL) or column (Parquet) holding the document text.")
    txt_unit: Literal["file", "paragraph", "line"] = Field(
        "paragraph", description="What one document is in a .txt file: the whole file, a blank-line-separated "
        "paragraph, or a line.")


class HFSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["hf"] = Field("hf", description="A Hugging Face dataset.")
    name: str = Field(..., description="Dataset name on the Hub, or a local folder (save_to_disk or a data folder).")
    config_name: str | None = Field(None, description="Dataset configuration (subset) name, if it has several.")
    split: str = Field("train", description="Split to read.")
    text_field: str = Field("text", description="Column holding the document text.")
    streaming: bool = Field(True, description="Stream rows instead of downloading the whole dataset first.")
    max_rows: int | None = Field(None, ge=1, description="Stop after this many rows (None: all).")


Source = Annotated[BuiltinSource | FilesSource | HFSource, Field(discriminator="type")]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[Source] = Field(default_factory=lambda: [BuiltinSource()], min_length=1,
                                  description="Where the text comes from, read in order.")
    normalization: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalisation form applied to every document.")
    min_chars: int = Field(1, ge=1, description="Drop documents shorter than this (after cleaning).")
    max_chars: int = Field(1_000_000, ge=1, description="Drop documents longer than this; also bounds memory "
                           "per document while reading.")
    dedup: bool = Field(True, description="Drop exact duplicate documents (by content hash).")
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="Share of documents (by hash) in the "
                                "validation split.")
    shard_max_bytes: int = Field(256 << 20, ge=1 << 10, description="Start a new shard after this many bytes "
                                 "of text.")
    row_group_bytes: int = Field(32 << 20, ge=1 << 10, description="Bytes of text per Parquet row group.")
    compression_level: int = Field(3, ge=1, le=22, description="zstd compression level of the shards.")
    max_bad_fraction: float = Field(0.001, ge=0.0, le=1.0, description="Fail when more than this share of "
                                    "records is bad (invalid UTF-8, malformed JSON, missing field, unreadable "
                                    "file); below it, bad records are quarantined and counted.")


# ------------------------------------------------------------------------------------------------------ reading

BATCH = 2048  # documents per batch between the readers and the vectorised cleaning
ROW_GROUP_READ_MAX = 256 << 20  # read a Parquet row group whole up to this size (uncompressed, all columns)


@dataclass
class Bad:
    """A record that could not be used: where it is ("file:line" / "source#row") and why."""

    where: str
    reason: str


@dataclass
class Batch:
    """Good raw documents from one source."""

    texts: pa.Array  # string
    source: str


Item = Bad | Batch


def _read_units(path: Path, unit: str, max_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """Yield (raw bytes of one document, first line number); None for a document over `max_bytes`.

    Reads in bounded chunks, so a 100 MB line costs `max_bytes` of memory, not 100 MB.
    """
    with open(path, "rb") as f:
        buf: list[bytes] = []
        size, start, line_no, at_line_start, too_long = 0, 1, 0, True, False

        def flush() -> tuple[bytes | None, int]:
            return (None if too_long else b"".join(buf)), start

        while chunk := f.readline(1 << 20):
            complete = chunk.endswith(b"\n")
            blank = at_line_start and complete and not chunk.strip()
            if at_line_start:
                line_no += 1
            at_line_start = complete
            if unit == "paragraph" and blank:
                if buf or too_long:
                    yield flush()
                buf, size, too_long, start = [], 0, False, line_no + 1
                continue
            if not buf and not too_long:
                start = line_no
            if not too_long:
                size += len(chunk)
                if size > max_bytes:
                    too_long, buf = True, []
                else:
                    buf.append(chunk)
            if unit == "line" and complete:
                yield flush()
                buf, size, too_long = [], 0, False
        if buf or too_long:
            yield flush()


class _Batcher:
    """Collects good texts of one source into `Batch`es."""

    def __init__(self, source: str) -> None:
        self.source, self.texts = source, []

    def add(self, text: str) -> Batch | None:
        self.texts.append(text)
        return self.flush() if len(self.texts) >= BATCH else None

    def flush(self) -> Batch | None:
        if not self.texts:
            return None
        batch = Batch(pa.array(self.texts, pa.string()), self.source)
        self.texts = []
        return batch


def _read_txt(path: Path, unit: str, max_bytes: int, name: str) -> Iterator[Item]:
    out = _Batcher(name)
    for raw, line in _read_units(path, unit, max_bytes):
        if raw is None:
            yield Bad(f"{name}:{line}", "too_long")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Bad(f"{name}:{line}", "invalid_utf8")
            continue
        if b := out.add(text):
            yield b
    if b := out.flush():
        yield b


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # lone surrogates (from JSON escapes) cannot be encoded
        return True
    except UnicodeEncodeError:
        return False


def _read_jsonl(path: Path, field: str, max_bytes: int, name: str) -> Iterator[Item]:
    out = _Batcher(name)
    for raw, line in _read_units(path, "line", max_bytes):
        where = f"{name}:{line}"
        if raw is None:
            yield Bad(where, "too_long")
            continue
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield Bad(where, "invalid_utf8")
            continue
        except json.JSONDecodeError:
            yield Bad(where, "bad_json")
            continue
        if not isinstance(obj, dict) or field not in obj:
            yield Bad(where, "missing_field")
        elif not isinstance(obj[field], str):
            yield Bad(where, "not_a_string")
        elif not _valid_utf8(obj[field]):
            yield Bad(where, "invalid_utf8")
        elif b := out.add(obj[field]):
            yield b
    if b := out.flush():
        yield b


def _read_parquet(path: Path, field: str, name: str) -> Iterator[Item]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt footer
        yield Bad(f"{name} ({type(e).__name__}: {e})", "bad_parquet")
        return
    schema = pf.schema_arrow
    if field not in schema.names:
        raise StageError(
            f"{name}: Parquet file has no column {field!r} (columns: {schema.names}); set text_field in the "
            f"ingest source to the column holding the text."
        )
    ftype = schema.field(field).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
        raise StageError(f"{name}: column {field!r} has type {ftype}, not a string; point text_field at a text column.")
    row = 0
    try:
        for rb in _parquet_batches(pf, field):
            col = rb.column(0).cast(pa.string())
            if col.null_count:
                for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)):
                    yield Bad(f"{name}#{row + int(i) + 1}", "missing_field")
                col = col.drop_null()
            try:
                col.validate(full=True)  # Parquet does not guarantee valid UTF-8
            except pa.ArrowInvalid:
                col, bad_rows = _split_invalid_utf8(col)
                for i in bad_rows:
                    yield Bad(f"{name}#{row + i + 1}", "invalid_utf8")
            row += rb.num_rows
            if len(col):
                yield Batch(col, name)
    except (OSError, pa.ArrowException) as e:
        yield Bad(f"{name}#{row + 1} ({type(e).__name__}: {e})", "bad_parquet")


def _parquet_batches(pf: pq.ParquetFile, field: str) -> Iterator[pa.RecordBatch]:
    """One column in batches of BATCH rows: a row group at a time when it is small enough (Arrow decodes its pages
    on several threads, ~1.4x faster than `iter_batches` on 2 cores), else streamed batch by batch."""
    for i in range(pf.num_row_groups):
        if pf.metadata.row_group(i).total_byte_size <= ROW_GROUP_READ_MAX:
            yield from pf.read_row_group(i, columns=[field]).to_batches(max_chunksize=BATCH)
        else:
            yield from pf.iter_batches(batch_size=BATCH, columns=[field], row_groups=[i])


def _split_invalid_utf8(col: pa.Array) -> tuple[pa.Array, list[int]]:
    good, bad = [], []
    for i, raw in enumerate(col.cast(pa.binary()).to_pylist()):
        try:
            good.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(i)
    return pa.array(good, pa.string()), bad


def _expand(src: FilesSource) -> list[Path]:
    files: list[Path] = []
    for pattern in src.paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not Path(m).is_dir()]
        if not matches or not Path(matches[0]).exists():
            raise StageError(f"ingest source path {pattern!r} matches no file; fix sources[].paths.")
        files.extend(Path(m) for m in matches)
    return files


def _file_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    fmt = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "jsonl",
           ".parquet": "parquet"}.get(suffix)
    if fmt is None:
        raise StageError(f"{path}: cannot tell the format from the extension {suffix!r}; set format in the source.")
    return fmt


def _read_files(src: FilesSource, max_bytes: int) -> Iterator[Item]:
    for path in _expand(src):
        name = str(path)
        fmt = _file_format(path, src.format)
        try:
            if fmt == "txt":
                yield from _read_txt(path, src.txt_unit, max_bytes, name)
            elif fmt == "jsonl":
                yield from _read_jsonl(path, src.text_field, max_bytes, name)
            else:
                yield from _read_parquet(path, src.text_field, name)
        except (PermissionError, IsADirectoryError) as e:
            yield Bad(f"{name} ({e.strerror})", "unreadable")


def _read_hf(src: HFSource) -> Iterator[Item]:
    import datasets

    local = Path(src.name)
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            ds: Any = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise StageError(f"{src.name}: no split {src.split!r} (has {list(ds)}); fix split.")
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(src.name, src.config_name, split=src.split, streaming=src.streaming)
    except StageError:
        raise
    except (ConnectionError, TimeoutError) as e:
        raise TransientError(f"could not reach the dataset {src.name!r}: {e}") from e
    except Exception as e:
        raise StageError(f"could not open the Hugging Face dataset {src.name!r} ({type(e).__name__}: {e}); check "
                         f"the name, config_name and split, or point name at a local dataset folder.") from e
    out = _Batcher(src.name)
    for i, row in enumerate(ds):
        if src.max_rows is not None and i >= src.max_rows:
            break
        if i == 0 and isinstance(row, dict) and src.text_field not in row:
            raise StageError(f"dataset {src.name!r} has no column {src.text_field!r} (columns: {list(row)}); set "
                             f"text_field in the ingest source.")
        value = row.get(src.text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            yield Bad(f"{src.name}#{i + 1}", "missing_field")
        elif not _valid_utf8(value):
            yield Bad(f"{src.name}#{i + 1}", "invalid_utf8")
        elif b := out.add(value):
            yield b
    if b := out.flush():
        yield b


def _read_builtin(src: BuiltinSource) -> Iterator[Item]:
    out = _Batcher("builtin")
    for text in corpus.pretraining_documents(src.seed, src.n_documents):
        if b := out.add(text):
            yield b
    if b := out.flush():
        yield b


def _items(cfg: Config) -> Iterator[Item]:
    max_bytes = cfg.max_chars * 4  # UTF-8 is at most 4 bytes per character
    for src in cfg.sources:
        if isinstance(src, BuiltinSource):
            yield from _read_builtin(src)
        elif isinstance(src, FilesSource):
            yield from _read_files(src, max_bytes)
        else:
            yield from _read_hf(src)


# ----------------------------------------------------------------------------------------------------- cleaning

# C0/C1 control characters except tab and newline; DEL too. CR is folded into newlines before this applies.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _fix_one(text: str, normalization: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if normalization != "none" and not unicodedata.is_normalized(normalization, text):
        text = unicodedata.normalize(normalization, text)
    return text


def clean_batch(arr: pa.Array, normalization: str = "NFC") -> pa.Array:
    """Newlines folded to \\n, control characters removed, Unicode normalised, outer whitespace stripped.

    One numpy pass over the batch's UTF-8 bytes finds the strings that are not plain printable ASCII; only
    those go through Python (most documents of most corpora are clean). The rest is Arrow kernels.
    """
    arr = arr.cast(pa.string())
    if len(arr):
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]] if data_buf else np.empty(0, np.uint8)
        # Bytes that send a string down the slow path: C0 controls (CR included), DEL, and any non-ASCII byte
        # (C1 controls are \xc2\x80-\xc2\x9f; other non-ASCII text may need normalising). One wrapping
        # subtraction flags everything outside 0x20-0x7e; tabs and newlines are then let through.
        hits = np.flatnonzero((data - np.uint8(0x20)) >= np.uint8(0x5F))
        hits = hits[(data[hits] != 0x09) & (data[hits] != 0x0A)] + offsets[0]
        if hits.size:
            rows = np.unique(np.searchsorted(offsets, hits, side="right") - 1)
            mask = np.zeros(len(arr), dtype=bool)
            mask[rows] = True
            fixed = [_fix_one(t, normalization) for t in arr.take(pa.array(rows)).to_pylist()]
            arr = pc.replace_with_mask(arr, pa.array(mask), pa.array(fixed, pa.string()))
    return _strip(arr)


def _strip(arr: pa.Array) -> pa.Array:
    """Trim outer whitespace, copying only the strings whose first or last byte may be whitespace."""
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    nonempty = offsets[1:] > offsets[:-1]
    if not len(arr) or data_buf is None or not nonempty.any():
        return arr
    data = np.frombuffer(data_buf, dtype=np.uint8)
    first = data[offsets[:-1][nonempty]]
    last = data[offsets[1:][nonempty] - 1]
    # ASCII space, \t \n \v \f \r, or any non-ASCII byte (Unicode spaces such as U+00A0 or U+3000).
    edge = ((first <= 0x20) | (first >= 0x80)) | ((last <= 0x20) | (last >= 0x80))
    if not edge.any():
        return arr
    mask = np.zeros(len(arr), dtype=bool)
    mask[np.flatnonzero(nonempty)[edge]] = True
    m = pa.array(mask)
    return pc.replace_with_mask(arr, m, pc.utf8_trim_whitespace(arr.filter(m)))


def clean_text(text: str, normalization: str = "NFC") -> str:
    """`clean_batch` for one string."""
    return clean_batch(pa.array([text], pa.string()), normalization)[0].as_py()


# ------------------------------------------------------------------------------------------------------ writing


class _ShardWriter:
    """Writes one split's rows into size-bounded zstd Parquet shards, each closed before the next opens.

    Row-group and shard boundaries fall after the row that reaches the byte limit, whatever the batch sizes,
    so the output depends only on the documents. Encoding, compression and file IO run on `io`, a one-thread
    pool shared by the writers (Arrow releases the GIL there), so they overlap with cleaning the next batch.
    """

    def __init__(self, out: Path, split: str, cfg: Config, io: _IOThread) -> None:
        self.out, self.split, self.cfg, self.io = out, split, cfg, io
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
            room = min(self.cfg.row_group_bytes - self._buffered, self.cfg.shard_max_bytes - self._shard_bytes)
            base = int(cum[start - 1]) if start else 0
            end = min(int(np.searchsorted(cum, base + room, side="left")) + 1, n)
            added = int(cum[end - 1]) - base
            self._chunks.append((texts.slice(start, end - start), ids.slice(start, end - start), source))
            self._buffered += added
            self._shard_bytes += added
            self._shard_rows += end - start
            if self._buffered >= self.cfg.row_group_bytes:
                self._flush_rows()
            if self._shard_bytes >= self.cfg.shard_max_bytes:
                self.close_shard()
            start = end

    def _open_file(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, SCHEMA, compression="zstd",
                                        compression_level=self.cfg.compression_level)

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


class _IOThread:
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


def _prefetch(items: Iterator[Item], depth: int = 4) -> Iterator[Item]:
    """Run the readers one step ahead in a thread: Parquet decoding releases the GIL, so it overlaps cleaning."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)

    t = threading.Thread(target=produce, name="ingest-read", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        t.join(timeout=5)


def _input_fingerprint(cfg: Config) -> str:
    """What the output depends on: the config plus each input file's identity (path, size, mtime)."""
    dump = cfg.model_dump(mode="json")
    for src in dump["sources"]:  # the task-set sizes do not change the corpus
        if src["type"] == "builtin":
            for key in ("n_sft", "n_pref", "n_heldout", "n_rl_prompts"):
                src.pop(key)
    h = hashlib.sha256(json.dumps(dump, sort_keys=True).encode())
    h.update(FORMAT.encode())
    for src in cfg.sources:
        if isinstance(src, FilesSource):
            for p in _expand(src):
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _complete(folder: Path, fingerprint: str) -> dict | None:
    """The manifest of a finished earlier run with the same inputs, if its files are all there."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("input_fingerprint") != fingerprint:
        return None
    for s in manifest.get("shards", []):
        p = folder / s["file"]
        if not p.exists() or p.stat().st_size != s["bytes"]:
            return None
    return manifest


# Out of space, out of quota, or over a file-size limit: the user must make room; retrying will not help.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full_error(e: OSError, where: Path) -> StageError:
    return StageError(f"disk full while writing {where} ({e.strerror or e}); free space on that disk (or move the "
                      f"work directory) and rerun. Nothing under the final name was touched.")


def _clean_stale(out_dir: Path) -> None:
    # Leftovers of a killed run (atomic_dir's temporary names); they never sit under a final name.
    for name in ("corpus", "tasks"):
        for stale in out_dir.glob(f".{name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


class _Counts:
    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.total = self.bad = self.kept = self.kept_bytes = 0
        self.first_bad: list[str] = []


def _process(batch: Batch, cfg: Config, seen: set[bytes], writers: dict[str, _ShardWriter], counts: _Counts,
             samples: list[dict[str, Any]]) -> None:
    """Clean, filter, dedup and split one batch; hand the survivors to the split's writer.

    Everything but the hash and the dedup lookup is vectorised in Arrow/numpy."""
    arr = clean_batch(batch.texts, cfg.normalization)
    lengths = pc.utf8_length(arr).to_numpy(zero_copy_only=False)
    empty, too_long = lengths == 0, lengths > cfg.max_chars
    too_short = (lengths < cfg.min_chars) & ~empty
    counts.dropped["empty"] += int(empty.sum())
    counts.dropped["too_short"] += int(too_short.sum())
    counts.dropped["too_long"] += int(too_long.sum())
    keep = ~(empty | too_short | too_long)
    if not keep.all():
        arr = arr.filter(pa.array(keep))
    sha = hashlib.sha256
    digests = [sha(data).digest()[:16] for data in arr.cast(pa.binary()).to_pylist()]
    sizes = pc.binary_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    if cfg.dedup:
        take = np.ones(len(digests), dtype=bool)
        for i, d in enumerate(digests):
            if d in seen:
                take[i] = False
            else:
                seen.add(d)
        if not take.all():
            counts.dropped["duplicate"] += int((~take).sum())
            digests = [d for d, t in zip(digests, take, strict=True) if t]
            arr, sizes = arr.filter(pa.array(take)), sizes[take]
    if not digests:
        return
    joined = b"".join(digests)
    # The split and the id both come from the content hash: stable however the corpus is ordered or grows.
    first4 = np.frombuffer(joined, dtype=np.uint8).reshape(-1, 16)[:, :4].copy().view("<u4")[:, 0]
    split_val = first4.astype(np.uint64) < np.uint64(int(cfg.val_fraction * (1 << 32)))
    ids = pa.array(np.frombuffer(joined.hex().encode(), dtype="S32")).cast(pa.string())
    for split, mask in (("train", ~split_val), ("val", split_val)):
        if mask.any():
            m = pa.array(mask)
            writers[split].add(arr.filter(m), ids.filter(m), sizes[mask], batch.source)
    counts.kept += len(digests)
    counts.kept_bytes += int(sizes.sum())
    if len(samples) < 5:
        for i in np.flatnonzero(~split_val)[: 5 - len(samples)]:
            samples.append({"id": ids[int(i)].as_py(), "source": batch.source, "text": arr[int(i)].as_py()[:300]})


def _write_corpus(cfg: Config, out: Path, fingerprint: str, tracker: Tracker) -> dict:
    io = _IOThread()
    writers = {"train": _ShardWriter(out, "train", cfg, io), "val": _ShardWriter(out, "val", cfg, io)}
    try:
        return _write_corpus_with(cfg, out, fingerprint, tracker, writers, io)
    finally:
        io.shutdown()
        for w in writers.values():
            w.abort()


def _write_corpus_with(cfg: Config, out: Path, fingerprint: str, tracker: Tracker,
                       writers: dict[str, _ShardWriter], io: _IOThread) -> dict:
    counts = _Counts()
    seen: set[bytes] = set()
    samples: list[dict[str, Any]] = []
    quarantine = open(out / "quarantine.jsonl", "w", encoding="utf-8")
    pbar = tqdm(desc="ingest", unit=" docs", mininterval=1.0)
    next_log = 1_000_000
    try:
        for item in _prefetch(_items(cfg)):
            if isinstance(item, Bad):
                counts.total += 1
                counts.dropped[item.reason] += 1
                if item.reason == "too_long":  # a length filter, not a broken record
                    continue
                counts.bad += 1
                if len(counts.first_bad) < 5:
                    counts.first_bad.append(f"{item.where}: {item.reason}")
                quarantine.write(json.dumps({"where": item.where, "reason": item.reason}) + "\n")
                continue
            counts.total += len(item.texts)
            pbar.update(len(item.texts))
            _process(item, cfg, seen, writers, counts, samples)
            if counts.total >= next_log:
                tracker.log_metrics({"ingest/rows": counts.kept, "ingest/mb": counts.kept_bytes / 1e6},
                                    step=counts.total)
                next_log += 1_000_000
    finally:
        pbar.close()
        quarantine.close()

    dropped = dict(sorted((k, v) for k, v in counts.dropped.items() if v))
    if counts.total and counts.bad / counts.total > cfg.max_bad_fraction:
        raise StageError(
            f"{counts.bad} of {counts.total} input records are bad ({dropped}), more than "
            f"max_bad_fraction={cfg.max_bad_fraction}; first: {'; '.join(counts.first_bad)}. Fix or remove those "
            f"inputs, or raise ingest.max_bad_fraction to quarantine them."
        )
    if counts.kept == 0:
        raise StageError(
            f"the corpus is empty: {counts.total} records read, none kept (dropped: {dropped}); check "
            f"ingest.sources and the length filters (min_chars/max_chars)."
        )
    for w in writers.values():
        w.close_shard()
    io.drain()
    shards = writers["train"].shards + writers["val"].shards
    rows = {s: sum(x["rows"] for x in w.shards) for s, w in writers.items()}
    text_bytes = {s: sum(x["text_bytes"] for x in w.shards) for s, w in writers.items()}
    manifest = {
        "format": FORMAT,
        "input_fingerprint": fingerprint,
        "shards": shards,
        "rows": rows,
        "text_bytes": text_bytes,
        "records_read": counts.total,
        "bad_records": counts.bad,
        "dropped": dropped,
        "quarantine_sha256": sha256_file(out / "quarantine.jsonl"),
        "samples": samples,
        "config": cfg.model_dump(mode="json"),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def read_manifest(corpus_dir: str | Path, verify: bool = True) -> dict:
    """Load a corpus manifest; with `verify`, check every shard's size and sha256 before anyone reads it."""
    folder = Path(corpus_dir)
    path = folder / "manifest.json"
    if not path.exists():
        raise StageError(f"{path} does not exist; pass the `corpus` output of the ingest stage.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{path} is not valid JSON ({e}); rerun the ingest stage.") from e
    if manifest.get("format") != FORMAT:
        raise StageError(f"{path} is not a corpus manifest (format {manifest.get('format')!r}, expected {FORMAT}).")
    if verify:
        for s in manifest["shards"]:
            p = folder / s["file"]
            if not p.exists():
                raise StageError(f"corpus shard {p} is missing; rerun the ingest stage.")
            if p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
                raise StageError(
                    f"corpus shard {p} is corrupt (size or sha256 differs from {path}); delete the corpus folder "
                    f"and rerun the ingest stage."
                )
    return manifest


def iter_texts(corpus_dir: str | Path, split: str | None = None, manifest: dict | None = None,
               batch_size: int = 1024, arrow: bool = False) -> Iterator[Any]:
    """Stream the corpus text in batches (all splits, or one), in manifest order: lists of str, or Arrow string
    arrays with `arrow=True`."""
    folder = Path(corpus_dir)
    manifest = manifest or read_manifest(folder)
    for s in manifest["shards"]:
        if split is not None and s["split"] != split:
            continue
        pf = pq.ParquetFile(folder / s["file"])
        for batch in pf.iter_batches(batch_size=batch_size, columns=["text"]):
            yield batch.column(0) if arrow else batch.column(0).to_pylist()


def _metrics(manifest: dict) -> dict[str, float]:
    m: dict[str, float] = {
        "rows": sum(manifest["rows"].values()),
        "rows/train": manifest["rows"]["train"],
        "rows/val": manifest["rows"]["val"],
        "bytes": sum(manifest["text_bytes"].values()),
        "shards": len(manifest["shards"]),
        "records_read": manifest["records_read"],
        "bad_records": manifest["bad_records"],
    }
    m.update({f"dropped/{k}": v for k, v in manifest["dropped"].items()})
    return m


def run(cfg: Config, inputs: dict[str, Path] | None, out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    """Ingest the configured sources into `out_dir/corpus` (and `out_dir/tasks` for the built-in source)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir)
    fingerprint = _input_fingerprint(cfg)  # also fails fast on paths that match nothing
    outputs: dict[str, Path] = {}

    builtin = [s for s in cfg.sources if isinstance(s, BuiltinSource)]
    if len(builtin) > 1:
        raise StageError("ingest.sources lists the builtin source more than once; keep one.")
    if builtin:
        b = builtin[0]
        tasks_dir = out_dir / "tasks"
        tasks_manifest = _tasks_complete(tasks_dir, b)
        if tasks_manifest is None:
            try:
                with atomic_dir(tasks_dir) as tmp:
                    corpus.write_tasks(tmp, b.seed, b.n_sft, b.n_pref, b.n_heldout, b.n_rl_prompts)
            except OSError as e:
                if e.errno in DISK_FULL_ERRNOS:
                    raise disk_full_error(e, tasks_dir) from e
                raise
        outputs["tasks"] = tasks_dir

    corpus_dir = out_dir / "corpus"
    manifest = _complete(corpus_dir, fingerprint)
    if manifest is None:
        try:
            with atomic_dir(corpus_dir) as tmp:
                manifest = _write_corpus(cfg, tmp, fingerprint, tracker)
        except OSError as e:
            if e.errno in DISK_FULL_ERRNOS:
                raise disk_full_error(e, corpus_dir) from e
            raise
    outputs["corpus"] = corpus_dir
    metrics = _metrics(manifest)
    tracker.log_metrics(metrics)
    return StageResult(outputs=outputs, metrics=metrics, samples=manifest.get("samples", []))


def _tasks_complete(tasks_dir: Path, b: BuiltinSource) -> dict | None:
    try:
        m = json.loads((tasks_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    want = {"seed": b.seed, "n_sft": b.n_sft, "n_pref": b.n_pref, "n_heldout": b.n_heldout,
            "n_rl_prompts": b.n_rl_prompts}
    if m.get("params") != want:
        return None
    if not all((tasks_dir / f).exists() and sha256_file(tasks_dir / f) == v["sha256"] for f, v in m["files"].items()):
        return None
    return m
