"""Where a dataset's rows come from: `DatasetRef` (a path, glob, folder or Hugging Face name, with its shape and
column names) and `read_records`, which reads its raw rows.

Local `.jsonl` / `.json` / `.parquet` files, compressed or not (`.gz`, `.zst`, `.bz2`, `.xz`; streamed through
`stages.data.compression`, never unpacked to disk), globs of them, folders of them, folders written by
`datasets.Dataset.save_to_disk`, and Hugging Face dataset names (`name`, `name:split`; with a row limit a hub
dataset is streamed, not downloaded). What the rows mean is `stages.data.chat_data`'s business.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.common import StageError
from stages.data.compression import COMPRESSION_SUFFIXES, CorruptArchive, data_suffix, open_binary

Format = Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "transcript", "preference", "prompt"]
FORMATS: tuple[str, ...] = Format.__args__  # type: ignore[attr-defined]
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class DatasetRef(BaseModel):
    """One dataset: where it is, and (only for shapes not recognised on their own) its shape and column names.

    A plain string in a config (`sft.dataset: data/chat.jsonl.gz`) is the `path` alone."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., min_length=1, description="A .jsonl/.json/.parquet file (optionally .gz/.zst/.bz2/.xz), a "
                      "glob of them, a folder of them or written by save_to_disk, or a Hugging Face dataset name "
                      "('name' or 'name:split', e.g. 'HuggingFaceH4/ultrachat_200k:train_sft[:5000]').")
    format: Format = Field("auto", description="The rows' shape: 'auto' recognises messages, prompt_completion, "
                           "alpaca, sharegpt, transcript and preference rows by their columns.")
    columns: dict[str, str] = Field(default_factory=dict, description="The shape's column names mapped to the "
                                    "dataset's, e.g. {instruction: question, output: answer}.")
    revision: str | None = Field(None, description="A Hugging Face dataset's git revision (commit, tag or branch) "
                                 "to read; empty = the latest, resolved and recorded when the stage runs.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    def __str__(self) -> str:
        return self.path


def as_ref(source: DatasetRef | str | Path) -> DatasetRef:
    return source if isinstance(source, DatasetRef) else DatasetRef(path=str(source))


# --------------------------------------------------------------------------------------------- raw record reading
def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a possibly compressed text file; a broken archive raises naming the line."""
    lineno = 0
    try:
        with open_binary(path) as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007 - read in the except clause
                yield lineno, line
    except CorruptArchive as e:
        raise StageError(f"{path}: the archive is damaged after line {lineno} ({e.error}); download or "
                         "compress it again.") from e


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StageError(f"{path}:{lineno} is not valid JSON ({e}); fix or remove that line.") from e
        if not isinstance(obj, dict):
            raise StageError(f"{path}:{lineno} is a JSON {type(obj).__name__}, expected an object per line.")
        rows.append(obj)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    raw = b"".join(line for _, line in _lines(path))
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path} is not valid JSON ({e}); use one JSON object per line (.jsonl).") from e
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise StageError(f"{path} must hold a JSON list of objects (or use .jsonl, one object per line).")
    return obj


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() in COMPRESSION_SUFFIXES:  # Parquet compresses inside; an outer layer is unusual
            with open_binary(path) as f:
                return pq.read_table(io.BytesIO(f.read())).to_pylist()
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise StageError(f"{path} could not be read as Parquet ({e}); check that the file is complete.") from e


_READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _readable(path: Path) -> bool:
    return data_suffix(path) in _READERS


def _read_file(path: Path) -> list[dict[str, Any]]:
    reader = _READERS.get(data_suffix(path))
    if reader is None:
        raise StageError(f"{path}: unsupported file type {''.join(path.suffixes[-2:])!r}; use .jsonl, .json or "
                         f".parquet, optionally compressed ({', '.join(COMPRESSION_SUFFIXES)}).")
    return reader(path)


# `owner/name` or `name`, then an optional `:split` that may slice (`train[:5000]`): how a hub dataset is named.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+(\[[0-9:%-]*\])?)?$")


def is_hub_name(text: str) -> bool:
    """A Hugging Face dataset name (with an optional split), not a local path: no such path exists, it does not
    start like a path, and it names no data file."""
    return (bool(_HUB_NAME.match(text)) and not text.startswith((".", "/", "~")) and not Path(text).exists()
            and not text.endswith((*DATA_SUFFIXES, *COMPRESSION_SUFFIXES)))


def _is_glob(text: str) -> bool:
    return not is_hub_name(text) and any(c in text for c in "*?[")


def local_files(source: str) -> list[Path] | None:
    """The local files a source names (a file, a glob, or a folder of data files), or None when it names no local
    path (a saved dataset folder or a Hugging Face dataset name)."""
    p = Path(source).expanduser()
    if p.is_file():
        return [p]
    if _is_glob(source) and not p.exists():
        return sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
    if p.is_dir() and not _saved_dataset(p):
        return sorted(f for f in p.iterdir() if f.is_file() and _readable(f))
    return None


def _saved_dataset(p: Path) -> bool:
    return any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def looks_local(text: str) -> bool:
    """Whether a source string is meant as a local path (so a missing one is an error, not a hub name)."""
    return (text.startswith((".", "/", "~")) or _is_glob(text) or any(text.endswith(s) for s in DATA_SUFFIXES)
            or any(text.endswith(s) for s in COMPRESSION_SUFFIXES) or Path(text).exists())


def hub_name_split(text: str, split: str) -> tuple[str, str]:
    name, _, name_split = text.partition(":")
    return name, name_split or split


def read_records(source: DatasetRef | str | Path, *, split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """Raw rows (dicts) of a dataset (see the module doc for where they can come from). `limit` reads only the
    first rows (a hub dataset is then streamed, not downloaded)."""
    ref = as_ref(source)
    text = ref.path
    files = local_files(text)
    if files is not None:
        if not files:
            raise StageError(f"dataset {text} matches no .jsonl/.json/.parquet file (compressed or not); check the "
                             "path or pattern.")
        rows: list[dict[str, Any]] = []
        for f in files:
            rows.extend(_read_file(f))
            if limit is not None and len(rows) >= limit:
                return rows[:limit]
        return rows
    p = Path(text).expanduser()
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise StageError(f"{p} has splits {sorted(ds)}, not {split!r}; name one as '{p}:<split>'.")
            ds = ds[split]
        return ds.select(range(min(limit, len(ds)))).to_list() if limit is not None else ds.to_list()
    if looks_local(text):
        raise StageError(f"dataset file {text} does not exist; check the path.")
    return _read_hub(ref, split, limit)


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a connection (once per process): without it, hub datasets are read from
    the local cache only, at once, instead of after the client's minute of retries per dataset."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((host.hostname or "huggingface.co", host.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_mode() -> Iterator[None]:
    """Hub reads in this block use the local cache only when the hub cannot be reached. The libraries read their
    offline switches once, at import, so the module-level flags are set along with the environment."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    offline = not hub_reachable()
    flags: list[tuple[Any, str, Any]] = []
    if offline:
        import datasets.config
        import huggingface_hub.constants

        os.environ.update({k: "1" for k in keys})
        for module, name in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                             (huggingface_hub.constants, "HF_HUB_OFFLINE")):
            flags.append((module, name, getattr(module, name)))
            setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in flags:
            setattr(module, name, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _read_hub(ref: DatasetRef, split: str, limit: int | None) -> list[dict[str, Any]]:
    name, name_split = hub_name_split(ref.path, split)
    try:
        import datasets

        with hub_mode():
            if limit is not None:  # a sample: streamed, so checking a large dataset costs no download
                base = re.sub(r"\[.*\]$", "", name_split)
                ds = datasets.load_dataset(name, split=base, streaming=True, revision=ref.revision)
                return [dict(r) for _, r in zip(range(limit), ds, strict=False)]
            return datasets.load_dataset(name, split=name_split, revision=ref.revision).to_list()
    except Exception as e:  # offline, unknown name, unknown split ... all user-fixable
        where = "" if hub_reachable() else " The hub cannot be reached from this machine and it is not in the local cache."
        raise StageError(
            f"could not load Hugging Face dataset {name!r} (split {name_split!r}): {e}.{where} "
            "Check the name, or point the config at a local .jsonl/.parquet file."
        ) from e
