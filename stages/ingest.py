"""Stage `ingest`: raw text sources -> cleaned, deduplicated, split zstd Parquet shards + manifest.json.

Sources (any mix, read in order, streamed so a corpus never has to fit in memory):
* `builtin`: the seeded synthetic corpus of stages/world/corpus.py (also writes the `tasks` folder);
* `files`: local .txt / .jsonl / .parquet files or globs;
* `hf`: a Hugging Face dataset by name (streaming) or a local dataset folder.

Cleaning per document: newline normalisation, Unicode normalisation (NFC by default), control characters
removed, length filters, FineWeb's quality filters (`ingest.quality`, off by default), exact dedup by content hash,
near-duplicate removal (`ingest.near_dedup`, off by default), a train/val split by the content hash (stable when the
corpus grows). Bad records (invalid UTF-8, malformed JSON, a missing text field, an unreadable or corrupt file)
are counted and listed in `quarantine.jsonl`; more than `max_bad_fraction` of them fails the stage with the
first offending file and line. Output folders are built under a temporary name and renamed when complete, so
a killed run leaves nothing under the final name, and a rerun with the same inputs and config is a no-op
(byte-identical shards either way).

This module is the flow of work; reading the sources is `stages.data.readers`, cleaning `stages.data.cleaning`, writing the
shards `stages.data.shard_writer`, the quality filters and near-duplicate removal `stages.data.ingest_quality`, and reading a
finished corpus `stages.data.corpus_reader`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from stages.common import (
    NullTracker,
    StageError,
    StageResult,
    Tracker,
    atomic_dir,
    fingerprint,
    remove_stale,
    sha256_file,
    sizes_match,
    stop_when_disk_full,
    write_json,
)
from stages.data import builtin, ingest_quality, quality
from stages.data.cleaning import clean_batch
from stages.data.corpus_reader import FORMAT, MANIFEST
from stages.data.ingest_quality import Cleaned, Counts, Staging, filter_batch
from stages.data.near_dedup import NearDedupConfig
from stages.data.quality import QualityConfig
from stages.data.readers import (
    Bad,
    Batch,
    BuiltinSource,
    FilesSource,
    HFSource,
    Source,
    Unit,
    expand_paths,
    prefetch,
    read_unit,
    split_units,
)
from stages.data.shard_writer import SplitWriters
from stages.runtime import fanout

__all__ = ["BuiltinSource", "Config", "FilesSource", "HFSource", "run"]
log = logging.getLogger(__name__)

TASK_FIELDS = builtin.TASK_FIELDS


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[Source] = Field(default_factory=lambda: [BuiltinSource()], min_length=1,
                                  description="Where the text comes from, read in order.")

    @model_validator(mode="after")
    def _has_text(self) -> Config:
        if all(isinstance(s, BuiltinSource) and not s.stories for s in self.sources):
            raise ValueError("no source gives pretraining text: add a files or hf source, or set stories: true on "
                             "the builtin source")
        return self
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
    workers: int = Field(1, ge=1, description="Processes that read and clean the sources, a file (or a non-file "
                         "source) each at a time, on a local Dask cluster (under Prefect: its Dask task runner, a "
                         "task run per file); dedup, split and shard writing stay in this process, so the output "
                         "is byte-identical to 1, which runs everything here without Dask. Fewer run when "
                         "memory_budget_mb cannot hold them.")
    dask_address: str | None = Field(None, description="Scheduler of an existing Dask cluster (tcp://HOST:PORT) to "
                                     "read and clean on instead of a local cluster; its workers need this project "
                                     "installed and the input files at the same paths.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="FineWeb's quality filters (datatrove: "
                                   "Gopher repetition and quality, C4 lines, FineWeb lines; lingua language ID), "
                                   "each switchable; applied to the sources whose `filters` is not false (the "
                                   "builtin source only with filters: true).")
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig, description="Near-duplicate removal across "
                                        "the same sources (MinHash + LSH over word n-grams, state on disk).")
    removed_samples: int = Field(3, ge=0, description="Removed documents kept per rule as examples (the rule, the "
                                 "source, the start of the text) in the run's samples table.")
    memory_budget_mb: int = Field(2048, ge=256, description="Memory the whole ingest may use, by estimate: this "
                                  "process (exact dedup's set included), each Dask worker process (its cost grows "
                                  "with the largest input file, whose results travel whole) and the near-duplicate "
                                  "matching, whose index files are sorted in key ranges that fit a quarter of it. "
                                  "`workers` is lowered, with a log line, until the estimate fits.")

    @model_validator(mode="after")
    def _known_languages(self) -> Config:
        if self.quality.enabled and self.quality.language.enabled:
            quality.check_languages(self.quality.language.languages)
        return self


# How the work is spread, not what it computes: kept out of the corpus key and the manifest, so a corpus built
# with any number of workers is the same bytes and reused whatever the setting.
EXECUTION_FIELDS = {"workers", "dask_address", "memory_budget_mb"}


def _clean(batch: Batch, cfg: Config, source_index: int = 0) -> Cleaned:
    """Clean, length-filter, quality-filter and hash one batch of `cfg.sources[source_index]`; depends on nothing
    outside it, so any process can do it.

    Cleaning and the length filters are vectorised in Arrow/numpy; the quality filters are datatrove's."""
    arr = clean_batch(batch.texts, cfg.normalization)
    lengths = pc.utf8_length(arr).to_numpy(zero_copy_only=False)
    empty, too_long = lengths == 0, lengths > cfg.max_chars
    too_short = (lengths < cfg.min_chars) & ~empty
    dropped = Counter({"empty": int(empty.sum()), "too_short": int(too_short.sum()), "too_long": int(too_long.sum())})
    keep = ~(empty | too_short | too_long)
    if not keep.all():
        arr = arr.filter(pa.array(keep))
    arr, extra = filter_batch(arr, batch.source, cfg.sources[source_index], cfg.quality, cfg.near_dedup,
                              cfg.removed_samples)
    dropped.update(extra.pop("dropped"))
    sha = hashlib.sha256
    digests = [sha(data).digest()[:16] for data in arr.cast(pa.binary()).to_pylist()]
    sizes = pc.binary_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    return Cleaned(arr, digests, sizes, batch.source, len(batch.texts), dropped, source_index, **extra)


def _clean_unit(unit: tuple[int, Unit], cfg: Config) -> list[Bad | Cleaned]:
    """A whole unit (a file, or a non-file source) read and cleaned, in order: the work a fan-out worker does."""
    index, u = unit
    return [item if isinstance(item, Bad) else _clean(item, cfg, index) for item in read_unit(u, cfg.max_chars)]


def _dedup_exact(c: Cleaned, cfg: Config, seen: set[bytes], counts: Counts) -> None:
    """Drop the documents of `c` seen before (by content hash): it depends on every earlier document, so it runs in
    one process, in the order of the sources."""
    if not cfg.dedup:
        return
    take = np.ones(len(c.digests), dtype=bool)
    for i, d in enumerate(c.digests):
        if d in seen:
            take[i] = False
        else:
            seen.add(d)
    if not take.all():
        counts.dropped["duplicate"] += int((~take).sum())
        c.take(take)


def _keep(c: Cleaned, cfg: Config, writers: SplitWriters, counts: Counts, samples: list[dict[str, Any]]) -> None:
    """Split one deduplicated batch and hand it to the split's writers, in the order of the sources."""
    arr, digests, sizes = c.texts, c.digests, c.sizes
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
            writers[split].add(arr.filter(m), ids.filter(m), sizes[mask], c.source)
    counts.add_kept(c.source_index, len(digests), int(sizes.sum()))
    if len(samples) < 5:
        for i in np.flatnonzero(~split_val)[: 5 - len(samples)]:
            samples.append({"id": ids[int(i)].as_py(), "source": c.source, "text": arr[int(i)].as_py()[:300]})


def _cleaned_items(cfg: Config, stack: contextlib.ExitStack, workers: int) -> Iterator[Bad | Cleaned]:
    """Every record of the sources, cleaned, in source order: in this process (`workers: 1`), or a unit per
    worker through `stages.runtime.fanout` (the same items in the same order, so the same bytes come out)."""
    units = [(i, u) for i, src in enumerate(cfg.sources) for u in split_units([src])]
    if workers == 1 and not cfg.dask_address:
        read = ((i, item) for i, u in units for item in read_unit(u, cfg.max_chars))
        return (item if isinstance(item, Bad) else _clean(item, cfg, i) for i, item in prefetch(read))
    mapper = stack.enter_context(fanout.open_mapper(workers, cfg.dask_address, "ingest"))
    results = mapper.map(functools.partial(_clean_unit, cfg=cfg), units, [u.label for _, u in units])
    return itertools.chain.from_iterable(results)


def _near_dedup_on(cfg: Config) -> bool:
    return cfg.near_dedup.enabled and any(ingest_quality.takes_part(s) for s in cfg.sources)


def _bad(item: Bad, counts: Counts, quarantine: Any) -> None:
    counts.total += 1
    counts.dropped[item.reason] += 1
    if item.reason == "too_long":  # a length filter, not a broken record
        return
    counts.bad += 1
    if len(counts.first_bad) < 5:
        counts.first_bad.append(f"{item.where}: {item.reason}")
    quarantine.write(json.dumps({"where": item.where, "reason": item.reason}) + "\n")


def _read_all(cfg: Config, out: Path, writers: SplitWriters, tracker: Tracker) -> tuple[Counts, list[dict]]:
    """Stream every source through cleaning into the writers; bad records go to `quarantine.jsonl`. With
    near-duplicate removal the deduplicated batches are staged first and written once the index is matched."""
    counts = Counts(cfg.removed_samples)
    seen: set[bytes] = set()
    samples: list[dict[str, Any]] = []
    next_log = 1_000_000
    with (contextlib.ExitStack() as stack,
          open(out / "quarantine.jsonl", "w", encoding="utf-8") as quarantine,
          tqdm(desc="ingest", unit=" docs", mininterval=1.0) as pbar):
        plan = ingest_quality.plan_memory(cfg, split_units(cfg.sources))
        staging = None
        if _near_dedup_on(cfg):
            staging = Staging(out.parent, cfg.near_dedup, plan.near_dedup_budget_bytes)
            stack.callback(staging.close)
        for item in _cleaned_items(cfg, stack, plan.workers):
            if isinstance(item, Bad):
                _bad(item, counts, quarantine)
                continue
            counts.add_batch(item)
            pbar.update(item.read)
            _dedup_exact(item, cfg, seen, counts)
            if staging is not None:
                staging.add(item)
            else:
                _keep(item, cfg, writers, counts, samples)
            if counts.total >= next_log:
                tracker.log_metrics({"ingest/rows": counts.kept, "ingest/mb": counts.kept_bytes / 1e6},
                                    step=counts.total)
                next_log += 1_000_000
        if staging is not None:
            for c in staging.replay(counts):
                _keep(c, cfg, writers, counts, samples)
    counts.warn_heavy_filtering(cfg.sources)
    return counts, samples


def _check_counts(cfg: Config, counts: Counts) -> dict[str, int]:
    """The dropped-record counts, once the share of bad records and the kept corpus are known to be acceptable."""
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
            f"ingest.sources, the length filters (min_chars/max_chars) and, if on, ingest.quality and "
            f"ingest.near_dedup (filters: false on a source exempts it)."
        )
    return dropped


def _write_corpus(cfg: Config, out: Path, key: str, tracker: Tracker) -> dict:
    with SplitWriters(out, cfg.shard_max_bytes, cfg.row_group_bytes, cfg.compression_level) as writers:
        counts, samples = _read_all(cfg, out, writers, tracker)
        dropped = _check_counts(cfg, counts)
        shards = writers.finish()
    manifest = {
        "format": FORMAT,
        "input_fingerprint": key,
        "shards": shards,
        "rows": {s: sum(x["rows"] for x in shards if x["split"] == s) for s in SplitWriters.SPLITS},
        "text_bytes": {s: sum(x["text_bytes"] for x in shards if x["split"] == s) for s in SplitWriters.SPLITS},
        "records_read": counts.total,
        "bad_records": counts.bad,
        "dropped": dropped,
        "quarantine_sha256": sha256_file(out / "quarantine.jsonl"),
        "samples": samples,
        "config": cfg.model_dump(mode="json", exclude=EXECUTION_FIELDS),
    }
    if _filtering(cfg):
        manifest["quality"] = {
            "dropped_bytes": dict(sorted((k, v) for k, v in counts.dropped_bytes.items() if v)),
            "lines_removed": dict(sorted((k, v) for k, v in counts.lines_removed.items() if v)),
            "by_source": dict(sorted((k, v) for k, v in counts.by_source.items() if v)),
            "near_dedup": counts.near_pairs,
            "removed_samples": counts.removed_rows(),
        }
    write_json(out / MANIFEST, manifest)
    return manifest


def _filtering(cfg: Config) -> bool:
    return (cfg.quality.enabled or cfg.near_dedup.enabled) and any(ingest_quality.takes_part(s) for s in cfg.sources)


# ------------------------------------------------------------------------------------------------ resuming work
# Whether the whole stage reruns is decided by the flow layer (flows.finished); inside one run, a corpus or task set
# already written by an interrupted attempt with the same settings is kept, each judged on its own, so a run killed
# while writing the tasks does not read the whole corpus again.
TASKS_STAMP = ".tasks_params.json"


def _corpus_key(cfg: Config) -> str:
    """What the corpus depends on: the config less the task-set sizes, and each input file's identity.

    Input files are identified by (path, size, mtime), not content: deciding to keep a large corpus must not mean
    reading all of its inputs again (the flow layer's cache key fingerprints their content).
    """
    dump = cfg.model_dump(mode="json", exclude=EXECUTION_FIELDS)
    dump["sources"] = [s for s in dump["sources"] if s["type"] != "builtin" or s["stories"]]
    for src in dump["sources"]:
        if src["type"] == "builtin":
            for name in (*TASK_FIELDS, "tasks", "stories"):
                src.pop(name)
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
             for src in cfg.sources if isinstance(src, FilesSource) for p in expand_paths(src)]
    return fingerprint(dump, extra={"format": FORMAT, "files": files})


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _corpus_intact(folder: Path, key: str) -> bool:
    manifest = _load(folder / MANIFEST)
    return manifest.get("input_fingerprint") == key and sizes_match(folder, manifest.get("shards", []))


def _tasks_intact(folder: Path, stamp: Path, params: dict) -> bool:
    files = _load(folder / MANIFEST).get("files", {})
    return (bool(files) and _load(stamp) == params
            and all((folder / f).exists() and sha256_file(folder / f) == v["sha256"] for f, v in files.items()))


def _corpus(cfg: Config, key: str, out_dir: Path, tracker: Tracker) -> StageResult:
    corpus_dir = out_dir / "corpus"
    if _corpus_intact(corpus_dir, key):
        log.info("keeping the corpus an interrupted attempt wrote in %s", corpus_dir)
        manifest = _load(corpus_dir / MANIFEST)
    else:
        with stop_when_disk_full(corpus_dir), atomic_dir(corpus_dir) as tmp:
            manifest = _write_corpus(cfg, tmp, key, tracker)
    removed = manifest.get("quality", {}).get("removed_samples", [])
    return StageResult(outputs={"corpus": corpus_dir}, metrics=_metrics(manifest),
                       samples=manifest["samples"] + removed)


def _tasks(b: BuiltinSource, out_dir: Path) -> Path:
    tasks_dir = out_dir / "tasks"
    params = {"seed": b.seed, **{name: getattr(b, name) for name in TASK_FIELDS}}
    stamp = out_dir / TASKS_STAMP
    if not _tasks_intact(tasks_dir, stamp, params):
        stamp.unlink(missing_ok=True)
        with stop_when_disk_full(tasks_dir), atomic_dir(tasks_dir) as tmp:
            builtin.write_tasks(tmp, b)
        write_json(stamp, params)
    return tasks_dir


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
    q = manifest.get("quality", {})
    m.update({f"dropped_bytes/{k}": v for k, v in q.get("dropped_bytes", {}).items()})
    m.update({f"lines_removed/{k}": v for k, v in q.get("lines_removed", {}).items()})
    m.update({f"by_source/{k}": v for k, v in q.get("by_source", {}).items()})
    m.update({f"near_dedup/{k}": v for k, v in q.get("near_dedup", {}).items()})
    return m


def run(cfg: Config, inputs: dict[str, Path] | None, out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    """Ingest the configured sources into `out_dir/corpus` (and `out_dir/tasks` for the built-in source)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # (contamination: written here by earlier versions; near_dedup: the staging folder of a killed run)
    remove_stale(out_dir, ("corpus", "tasks", "contamination", "near_dedup"))
    key = _corpus_key(cfg)  # also fails fast on paths that match nothing
    builtin = [s for s in cfg.sources if isinstance(s, BuiltinSource)]
    if len(builtin) > 1:
        raise StageError("ingest.sources lists the builtin source more than once; keep one.")
    outputs = {"tasks": _tasks(builtin[0], out_dir)} if builtin and builtin[0].tasks else {}
    result = _corpus(cfg, key, out_dir, tracker)
    metrics = dict(result.metrics)
    tracker.log_metrics(metrics)
    return StageResult(outputs={**outputs, **result.outputs}, metrics=metrics, samples=result.samples)
