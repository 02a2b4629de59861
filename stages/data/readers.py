"""Reading the ingest stage's sources: the built-in corpus, local .txt / .jsonl / .parquet files (.txt and .jsonl
also compressed: .gz, .zst, .bz2, .xz) and Hugging Face datasets, as batches of raw texts plus the records
that could not be used.

Readers stream, so a corpus never has to fit in memory, and they never raise on bad data: an invalid record is
yielded as `Bad` (where and why) for the stage to count and quarantine. Errors in the configuration (a missing
column, a path that matches nothing) are StageErrors.
"""

from __future__ import annotations

import contextlib
import glob
import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from stages.common import StageError, TransientError
from stages.data.builtin import BuiltinSource, documents
from stages.data.compression import (
    COMPRESSION_SUFFIXES,
    CorruptArchive,
    compression_of,
    data_suffix,
    open_binary,
)


class FilesSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["files"] = Field("files", description="Local files.")
    paths: list[str] = Field(..., min_length=1, description="Files or glob patterns (** allowed), read in sorted order.")
    format: Literal["auto", "txt", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' goes by the extension (.txt, .jsonl/.json, .parquet). .txt and "
        ".jsonl files may be compressed (" + ", ".join(COMPRESSION_SUFFIXES) + " after the format's extension, "
        "e.g. corpus.jsonl.gz): they are decompressed while streaming, whatever the format says.")
    text_field: str = Field("text", description="Field (JSONL) or column (Parquet) holding the document text.")
    txt_unit: Literal["file", "paragraph", "line"] = Field(
        "paragraph", description="What one document is in a .txt file: the whole file, a blank-line-separated "
        "paragraph, or a line.")
    filters: bool | None = Field(None, description="Apply ingest.quality and ingest.near_dedup (when enabled) to this "
                                 "source; unset: yes. Set false for text the filters do not suit (chat logs, notes).")


class HFSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["hf"] = Field("hf", description="A Hugging Face dataset.")
    name: str = Field(..., description="Dataset name on the Hub, or a local folder (save_to_disk or a data folder).")
    config_name: str | None = Field(None, description="Dataset configuration (subset) name, if it has several.")
    split: str = Field("train", description="Split to read.")
    text_field: str = Field("text", description="Column holding the document text.")
    streaming: bool = Field(True, description="Stream rows instead of downloading the whole dataset first.")
    max_rows: int | None = Field(None, ge=1, description="Stop after this many rows (None: all).")
    filters: bool | None = Field(None, description="Apply ingest.quality and ingest.near_dedup (when enabled) to this "
                                 "dataset; unset: yes.")


Source = Annotated[BuiltinSource | FilesSource | HFSource, Field(discriminator="type")]



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


def _read_units(path: Path, unit: str, max_bytes: int) -> Iterator[tuple[bytes | CorruptArchive | None, int]]:
    """Yield (raw bytes of one document, first line number); None for a document over `max_bytes`.

    Reads in bounded chunks, so a 100 MB line costs `max_bytes` of memory, not 100 MB. A compressed file is
    decompressed while reading; if it turns out truncated or corrupt, the last item is the `CorruptArchive` with
    the line where reading broke (the documents before it have been yielded; the one being read is lost).
    """
    with open_binary(path) as f:
        buf: list[bytes] = []
        size, start, line_no, at_line_start, too_long = 0, 1, 0, True, False

        def flush() -> tuple[bytes | None, int]:
            return (None if too_long else b"".join(buf)), start

        try:
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
        except CorruptArchive as e:
            yield e, line_no + 1 if at_line_start else line_no
            return
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


def _bad_archive(name: str, line: int, e: CorruptArchive) -> Bad:
    return Bad(f"{name}:{line} ({type(e.error).__name__}: {e.error}; the file is truncated or corrupt, or not "
               f"compressed as its suffix says)", "bad_archive")


def _read_txt(path: Path, unit: str, max_bytes: int, name: str) -> Iterator[Item]:
    out = _Batcher(name)
    for raw, line in _read_units(path, unit, max_bytes):
        if isinstance(raw, CorruptArchive):
            yield _bad_archive(name, line, raw)
            continue
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
        if isinstance(raw, CorruptArchive):
            yield _bad_archive(name, line, raw)
            continue
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
    """One column in batches of BATCH rows: a row group at a time when it is small enough (Arrow then decodes its
    pages on several threads, which `iter_batches` does not), else streamed batch by batch."""
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


def expand_paths(src: FilesSource) -> list[Path]:
    files: list[Path] = []
    for pattern in src.paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not Path(m).is_dir()]
        if not matches or not Path(matches[0]).exists():
            raise StageError(f"ingest source path {pattern!r} matches no file; fix sources[].paths.")
        files.extend(Path(m) for m in matches)
    return files


def _file_format(path: Path, declared: str) -> str:
    suffix, compression = data_suffix(path), compression_of(path)
    fmt = declared if declared != "auto" else {
        ".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
    }.get(suffix)
    if fmt is None:
        under = f" under {compression!r}" if compression else ""
        raise StageError(f"{path}: cannot tell the format from the extension {suffix!r}{under}; set format in the "
                         f"source (txt, jsonl, parquet) or name the file like corpus.jsonl{compression or ''}.")
    if fmt == "parquet" and compression:
        # Parquet is read by seeking to its footer and column chunks, which a compressed stream cannot do
        raise StageError(f"{path}: a Parquet file cannot be read through {compression!r} compression; decompress "
                         f"it (Parquet compresses its columns itself) or convert it to .jsonl{compression}.")
    return fmt


def _read_file(src: FilesSource, path: Path, max_bytes: int) -> Iterator[Item]:
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
    for text in documents(src.seed, src.n_documents):
        if b := out.add(text):
            yield b
    if b := out.flush():
        yield b


@dataclass(frozen=True)
class Unit:
    """A piece of the sources that reads on its own: one file of a `files` source, or a whole other source."""

    source: Source
    path: Path | None = None

    @property
    def label(self) -> str:
        return self.path.name if self.path is not None else self.source.type


def split_units(sources: list[Source]) -> list[Unit]:
    """The sources as units, in reading order (`files` sources expanded to their files)."""
    return [u for src in sources if not (isinstance(src, BuiltinSource) and not src.stories)
            for u in ([Unit(src, p) for p in expand_paths(src)] if isinstance(src, FilesSource) else [Unit(src)])]


def read_unit(unit: Unit, max_chars: int) -> Iterator[Item]:
    """One unit's records in order: `Batch`es of good raw texts and `Bad` records."""
    max_bytes = max_chars * 4  # UTF-8 is at most 4 bytes per character
    src = unit.source
    if isinstance(src, BuiltinSource):
        yield from _read_builtin(src)
    elif isinstance(src, FilesSource):
        assert unit.path is not None
        yield from _read_file(src, unit.path, max_bytes)
    else:
        yield from _read_hf(src)


def prefetch(items: Iterator[Item], depth: int = 4) -> Iterator[Item]:
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
