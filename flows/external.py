"""The external inputs of a stage (files, globs, folders and Hugging Face datasets its config points at) and their
fingerprints, which are part of the stage's cache key: editing a file in place reruns the stages that read it.

What is external is found in the stage's config: every `DatasetRef` (post-training datasets), every `files` or
`hf` source of ingest, and every field marked `json_schema_extra={"external": True}` (e.g. evaluate.include_path).

A local file is fingerprinted by its content (sha256) up to `FULL_HASH_BYTES`; a larger one by its size, mtime and
the sha256 of three 1 MiB samples (start, middle, end), as ingest records its inputs, so that deciding to reuse a
100 GB corpus does not mean reading it. A Hugging Face dataset by the commit its name resolves to on the hub (or
the `revision` it names); when the hub cannot be asked, by its name alone, said in a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)

FULL_HASH_BYTES = 64 << 20
SAMPLE_BYTES = 1 << 20


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return f"sha256:{h.hexdigest()}"
        for offset in (0, st.st_size // 2, max(0, st.st_size - SAMPLE_BYTES)):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return f"size:{st.st_size}:mtime:{st.st_mtime_ns}:sample:{h.hexdigest()}"


def _tree(paths: list[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        if p.is_dir():
            out.update(_tree(sorted(q for q in p.rglob("*") if q.is_file())))
        elif p.is_file():
            out[str(p)] = _file_fingerprint(p)
    return out


def hub_revision(name: str, revision: str | None = None) -> str | None:
    """The commit a hub dataset name (at `revision`, default its main branch) resolves to, or None when the hub
    cannot be asked (offline, unknown name)."""
    from stages.data.dataset_files import hub_reachable

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1" or not hub_reachable():
        log.warning("Hugging Face dataset %s: the hub cannot be reached; its cache key holds the name only", name)
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision, timeout=10).sha
    except Exception as e:  # offline, rate-limited, unknown: the key then holds the name as written
        log.warning("could not resolve Hugging Face dataset %s on the hub (%s); its cache key holds the name only",
                    name, type(e).__name__)
        return None


def _dataset(ref: Any) -> dict[str, Any]:
    from stages.data.chat_data import hub_name_split, local_files

    files = local_files(ref.path)
    if files is not None:
        return {"files": _tree(files)}
    p = Path(ref.path).expanduser()
    if p.is_dir():
        return {"files": _tree([p])}
    name, _ = hub_name_split(ref.path, "train")
    return {"hub": name, "revision": ref.revision or hub_revision(name, ref.revision)}


def _source(src: Any) -> dict[str, Any]:
    from stages.data.readers import FilesSource, expand_paths

    if isinstance(src, FilesSource):
        try:
            return {"files": _tree(expand_paths(src))}
        except Exception as e:  # a pattern that matches nothing: the stage says so; the key notes it
            return {"error": str(e)}
    p = Path(src.name).expanduser()
    if p.exists():
        return {"files": _tree([p])}
    return {"hub": src.name, "revision": hub_revision(src.name)}


def _walk(value: Any, where: str) -> Iterator[tuple[str, Any, str]]:
    """(dotted field, value, kind) of every external input inside a config value."""
    from stages.data.chat_data import DatasetRef
    from stages.data.readers import FilesSource, HFSource

    if isinstance(value, DatasetRef):
        yield where, value, "dataset"
    elif isinstance(value, FilesSource | HFSource):
        yield where, value, "source"
    elif isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            v = getattr(value, name)
            if extra.get("external") and v:
                yield f"{where}.{name}".lstrip("."), v, "path"
            else:
                yield from _walk(v, f"{where}.{name}".lstrip("."))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{where}.{i}")




def fingerprints(cfg: BaseModel) -> dict[str, str]:
    """Dotted config field -> sha256 of what its external input holds now, or `name@commit` for a hub dataset
    (see the module doc)."""
    out = {}
    for where, value, kind in _walk(cfg, ""):
        if kind == "dataset":
            facts = _dataset(value)
        elif kind == "source":
            facts = _source(value)
        else:
            facts = {"files": _tree([Path(str(value)).expanduser()])}
        if "hub" in facts:  # readable in the run's tags: which commit of which dataset
            out[where] = f"{facts['hub']}@{facts['revision'] or 'unresolved'}"
        else:
            out[where] = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    return out
