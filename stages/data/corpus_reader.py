"""Reading a corpus the ingest stage wrote: its manifest (verified shard by shard) and its text, streamed.

The tokenizer stage and the benches read corpora through these two functions only, so the shard layout is known
here and in the ingest stage's writer (`stages.data.shard_writer`) and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stages.common import StageError, read_json, sha256_file

FORMAT = "llm-pipeline.corpus/1"
MANIFEST = "manifest.json"


def read_manifest(corpus_dir: str | Path, verify: bool = True) -> dict:
    """Load a corpus manifest; with `verify`, check every shard's size and sha256 before anyone reads it."""
    folder = Path(corpus_dir)
    path = folder / MANIFEST
    manifest = read_json(path, "corpus manifest", "the ingest stage (pass its `corpus` output)")
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
