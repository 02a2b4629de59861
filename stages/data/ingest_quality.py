"""The ingest stage's quality work: the FineWeb-style filters (`stages.data.quality`) and near-duplicate removal
(`stages.data.near_dedup`) applied to its cleaned batches, with the counts and examples that show what they removed.

Per batch, wherever cleaning runs (`filter_batch`): the filters drop documents and rewrite the kept ones (C4's line
rules), and the MinHash signatures of the kept ones are taken. In the stage's process, in source order (`Staging`):
the documents left after exact dedup are written to a temporary Arrow file beside the corpus and their signatures
to the near-duplicate index; once every source is read, the index is matched and the staged documents are replayed
without the near-duplicates, in the same order, into the shard writers. Without near-duplicate removal nothing is
staged and the batches go straight to the writers.

Which sources take part: a source's `filters` setting when given, else every source but the built-in one (its short
templated stories would trip the length and duplicate rules).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.data import near_dedup, quality
from stages.data.compression import compression_of, data_suffix
from stages.data.readers import BuiltinSource, Source, Unit
from stages.runtime import fanout

log = logging.getLogger("stages.ingest")
EXCERPT = 300
STAGED = pa.schema([("text", pa.string()), ("digest", pa.binary(16)), ("source", pa.string())])
# Warn when the filters remove more than this share of a source's documents: usually a corpus they do not suit.
WARN_SHARE = 0.5


@dataclass
class Cleaned:
    """One batch after cleaning and the filters, hashed: what the order-independent work yields."""

    texts: pa.Array  # string
    digests: list[bytes]  # 16 bytes of sha256 per text
    sizes: np.ndarray  # UTF-8 bytes per text
    source: str
    read: int  # records in the batch before the filters
    dropped: Counter[str]
    source_index: int = 0
    dropped_bytes: Counter[str] = field(default_factory=Counter)
    removed: list[dict[str, Any]] = field(default_factory=list)  # examples of removed documents, by rule
    lines_removed: Counter[str] = field(default_factory=Counter)
    sigs: np.ndarray | None = None  # MinHash signatures (None: the source takes no part in near-dedup)
    has_sig: np.ndarray | None = None

    def take(self, mask: np.ndarray) -> None:
        """Keep the documents where `mask` is true."""
        m = pa.array(mask)
        self.texts, self.sizes = self.texts.filter(m), self.sizes[mask]
        self.digests = [d for d, t in zip(self.digests, mask, strict=True) if t]
        if self.sigs is not None and self.has_sig is not None:
            self.sigs, self.has_sig = self.sigs[mask], self.has_sig[mask]


def takes_part(src: Source) -> bool:
    return src.filters if src.filters is not None else not isinstance(src, BuiltinSource)


def family(rule: str) -> str:
    """The filter a rule belongs to (`gopher_quality.short_doc` -> `gopher_quality`)."""
    return rule.split(".", 1)[0]


def _row(rule: str, source: str, text: str, detail: str = "") -> dict[str, Any]:
    return {"rule": rule, "source": source, "id": hashlib.sha256(text.encode()).digest()[:16].hex(),
            "text": text[:EXCERPT], "detail": detail}


def filter_batch(texts: pa.Array, source: str, src: Source, q: quality.QualityConfig, nd: near_dedup.NearDedupConfig,
                 per_rule: int) -> tuple[pa.Array, dict[str, Any]]:
    """The quality filters and the signatures for one length-filtered batch: (kept texts, Cleaned fields)."""
    extra: dict[str, Any] = {"dropped": Counter(), "dropped_bytes": Counter(), "removed": [],
                             "lines_removed": Counter()}
    part = takes_part(src)
    kept: list[str] | None = None  # the kept texts as Python strings, once the filters made them
    if part and q.enabled and len(texts):
        py = texts.to_pylist()
        verdicts = quality.apply(py, q)
        keep = np.array([r is None and bool(t) for r, t in zip(verdicts.rules, verdicts.texts, strict=True)])
        for i in np.flatnonzero(~keep):
            rule = verdicts.rules[i] or "c4.all_lines_removed"
            extra["dropped"][rule] += 1
            extra["dropped_bytes"][rule] += len(py[i].encode())
            if extra["dropped"][rule] <= per_rule:
                extra["removed"].append(_row(rule, source, py[i], verdicts.details.get(int(i), "")))
        extra["lines_removed"] = verdicts.lines_removed
        kept = [t for t, k in zip(verdicts.texts, keep, strict=True) if k]
        texts = pa.array(kept, pa.string())
    if part and nd.enabled:
        extra["sigs"], extra["has_sig"] = near_dedup.signatures(texts.to_pylist() if kept is None else kept, nd)
    return texts, extra


class Counts:
    """What the stage counts while reading: records, drops by rule (documents and bytes), per source, examples."""

    def __init__(self, per_rule: int) -> None:
        self.dropped: Counter[str] = Counter()
        self.dropped_bytes: Counter[str] = Counter()
        self.lines_removed: Counter[str] = Counter()
        self.by_source: Counter[str] = Counter()
        self.removed: dict[str, list[dict[str, Any]]] = {}
        self.near_pairs: dict[str, int] = {}
        self.total = self.bad = self.kept = self.kept_bytes = 0
        self.first_bad: list[str] = []
        self.per_rule = per_rule

    def add_removed(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            kept = self.removed.setdefault(row["rule"], [])
            if len(kept) < self.per_rule:
                kept.append(row)

    def add_batch(self, c: Cleaned) -> None:
        self.total += c.read
        self.dropped.update(c.dropped)
        self.dropped_bytes.update(c.dropped_bytes)
        self.lines_removed.update(c.lines_removed)
        self.add_removed(c.removed)
        for rule, n in c.dropped_bytes.items():
            self.by_source[f"{c.source_index}/dropped/{family(rule)}"] += c.dropped[rule]
            self.by_source[f"{c.source_index}/dropped_bytes/{family(rule)}"] += n

    def add_kept(self, source_index: int, rows: int, size: int) -> None:
        self.kept += rows
        self.kept_bytes += size
        self.by_source[f"{source_index}/rows"] += rows
        self.by_source[f"{source_index}/bytes"] += size

    def removed_rows(self) -> list[dict[str, Any]]:
        return [row for rule in sorted(self.removed) for row in self.removed[rule]]

    def warn_heavy_filtering(self, sources: list[Source]) -> None:
        """A source the filters took most of is usually one they do not suit (chat logs, notes): say which rule and
        how to exempt it."""
        for i, src in enumerate(sources):
            mine = {k.rsplit("/", 1)[1]: v for k, v in self.by_source.items() if k.startswith(f"{i}/dropped/")}
            removed, kept = sum(mine.values()), self.by_source[f"{i}/rows"]
            if removed and removed > WARN_SHARE * (removed + kept):
                top = max(mine, key=lambda k: mine[k])
                log.warning("ingest.sources[%d] (%s): the quality filters removed %d of its %d documents (most: "
                            "%s, %d); if its documents are short or templated by design, set filters: false on "
                            "that source.", i, src.type, removed, removed + kept, top, mine[top])


# What the stage's processes take (resident MB, sampled peaks of ingests of 2-1024 MB of generated web text on a
# 2-core VM, rounded up), for `plan_memory`. The stage's own process, reading a batch at a time: Python, Arrow, the
# readers' prefetch and the shard writers' row groups on their way to disk; exact dedup's set, per document; the
# near-dedup staging besides its matching's sorts. A Dask worker process with the stage imported. What datatrove's
# filters and MinHash, and lingua's models, add to each process that cleans. Per MB of text in a unit (a file): what
# its cleaned batches take in a worker (the batches, then their pickled copy) and in the stage's process (the bytes
# received and the batches made from them). A unit's results travel whole, so these grow with the largest file;
# with one process (no workers) the units stream and only the batches in flight count.
STAGE_MB = 450
DEDUP_BYTES_PER_DOC = 100
STAGING_MB = 50
WORKER_MB = 180
FILTERS_MB = 30
LANGUAGE_MB = 100
WORKER_MB_PER_UNIT_MB = 3.0
STAGE_MB_PER_UNIT_MB = 4.0
COMPRESSED_TEXT_RATIO = 4.0  # MB of text per MB of a .gz/.zst/.bz2/.xz file (an estimate: the size is unknown)
DOC_BYTES = 1000  # per document, where the input does not say how many it holds
HF_DOC_BYTES = 4000  # per row of a Hugging Face dataset with max_rows; without it, HF_UNIT_MB
HF_UNIT_MB = 4096.0
BUILTIN_DOC_BYTES = 300  # the built-in stories are about 250 bytes each
MIN_NEAR_DEDUP_MB = 4  # the least the near-duplicate matching's sorts get (65536 records fit 3 MB)


@dataclass
class MemoryPlan:
    """How an ingest fits `ingest.memory_budget_mb`: the worker processes to start (1: none, the stage's process
    does the work) and the budget to give the near-duplicate matching (its sorts use a quarter of it)."""

    workers: int
    near_dedup_budget_bytes: int
    estimate_mb: float  # the estimated peak of the whole process tree with that many workers
    note: str = ""  # why `workers` is below the requested number, or why the estimate is over the budget


def _parquet_text_mb(path: Path, field: str) -> tuple[float, int | None]:
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException):  # unreadable: the reader reports it; its size is the estimate
        return path.stat().st_size / 1e6, None
    size = 0
    for rg in (meta.row_group(i) for i in range(meta.num_row_groups)):
        cols = [c for c in range(rg.num_columns) if rg.column(c).path_in_schema == field] or range(rg.num_columns)
        size += sum(rg.column(c).total_uncompressed_size for c in cols)
    return size / 1e6, meta.num_rows


def unit_text_mb(unit: Unit) -> tuple[float, int | None]:
    """(MB of text, documents or None when unknown) that one unit of the sources yields at most, estimated from
    its file's size (Parquet: the footer's uncompressed size of the text column, and its row count)."""
    src, path = unit.source, unit.path
    if path is not None:
        if not path.is_file():
            return 0.0, 0  # a path that matched nothing readable: the reader reports it
        if data_suffix(path) == ".parquet" and not compression_of(path):
            return _parquet_text_mb(path, getattr(src, "text_field", "text"))
        ratio = COMPRESSED_TEXT_RATIO if compression_of(path) else 1.0
        return path.stat().st_size * ratio / 1e6, None
    if isinstance(src, BuiltinSource):
        return src.n_documents * BUILTIN_DOC_BYTES / 1e6, src.n_documents
    rows = getattr(src, "max_rows", None)
    return (rows * HF_DOC_BYTES / 1e6, rows) if rows else (HF_UNIT_MB, None)


def plan_memory(cfg: Any, units: list[Unit]) -> MemoryPlan:
    """Fit the ingest (`cfg`, an `ingest.Config`; `units`, its sources' units) into `cfg.memory_budget_mb` (see
    `MemoryPlan`): the stage's process (exact dedup's set and the near-duplicate matching's sorts included: a
    quarter of the budget, or what a band of every input document takes when the inputs say how many) plus each
    worker at its estimated cost; `cfg.workers` is lowered until the sum fits, and one line says so. With a remote
    cluster (`dask_address`) only the stage's process is here to count."""
    budget, workers = cfg.memory_budget_mb, cfg.workers
    part = any(takes_part(s) for s in cfg.sources)
    q, nd = cfg.quality, cfg.near_dedup
    cleaning = (FILTERS_MB if part and (q.enabled or nd.enabled) else 0) + \
        (LANGUAGE_MB if part and q.enabled and q.language.enabled else 0)
    sizes = [unit_text_mb(u) for u in units] or [(0.0, 0)]
    unit_mb = max(mb for mb, _ in sizes)
    docs = sum(n if n is not None else mb * 1e6 / DOC_BYTES for mb, n in sizes)
    near_mb = 0.0
    if part and nd.enabled:
        near_mb = STAGING_MB + min(budget / 4, docs * near_dedup.BYTES_PER_SORTED_RECORD / 1e6)
    alone = STAGE_MB + (docs * DEDUP_BYTES_PER_DOC / 1e6 if cfg.dedup else 0) + near_mb  # reading batch by batch
    stage_mb = alone + STAGE_MB_PER_UNIT_MB * unit_mb  # ... or taking in a unit's results at a time
    if cfg.dask_address:
        return MemoryPlan(workers, budget << 20, stage_mb)
    worker_mb = WORKER_MB + cleaning + WORKER_MB_PER_UNIT_MB * unit_mb
    run = fanout.workers_within(workers, budget, stage_mb, worker_mb)
    plan = MemoryPlan(run, budget << 20, alone + cleaning if run == 1 else stage_mb + run * worker_mb)
    notes = []
    if run < workers:
        notes.append(f"ingest.workers={workers} lowered to {run} to stay within ingest.memory_budget_mb={budget}: "
                     f"{workers} worker processes would take about {stage_mb + workers * worker_mb:.0f} MB with "
                     f"this process (each worker about {worker_mb:.0f} MB, with input files of up to "
                     f"{unit_mb:.3g} MB of text; this process {stage_mb:.0f} MB), "
                     f"{'this process alone' if run == 1 else run} about {plan.estimate_mb:.0f} MB. Raise the "
                     f"budget, or split the input into smaller files, for more.")
    if plan.estimate_mb > budget:
        left = budget - (plan.estimate_mb - near_mb) - (STAGING_MB if near_mb else 0)
        notes.append(f"ingest.memory_budget_mb={budget} is below the about {plan.estimate_mb:.0f} MB this ingest "
                     f"is estimated to take in one process; the near-duplicate matching gets what is left "
                     f"({max(MIN_NEAR_DEDUP_MB, left):.0f} MB).")
        plan.near_dedup_budget_bytes = int(max(MIN_NEAR_DEDUP_MB, left) * 4) << 20
    plan.note = " ".join(notes)
    if plan.note:
        log.warning("%s", plan.note)
    return plan


class Staging:
    """The documents left after exact dedup, in order, in a temporary Arrow file, and their near-duplicate index,
    both in a folder beside the corpus that is removed afterwards (`remove_stale` clears one a killed run left)."""

    def __init__(self, parent: Path, cfg: near_dedup.NearDedupConfig, memory_budget_bytes: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=".near_dedup.", suffix=".tmp", dir=parent))
        self.index = near_dedup.Index(self.folder / "index", cfg, memory_budget_bytes)
        self._sink = pa.OSFile(str(self.folder / "staged.arrow"), "wb")
        self._writer = pa.ipc.new_file(self._sink, STAGED, options=pa.ipc.IpcWriteOptions(compression="lz4"))
        self._sources: list[int] = []  # source index of each staged batch

    def add(self, c: Cleaned) -> None:
        n = len(c.texts)
        self._writer.write_batch(pa.record_batch([c.texts, pa.array(c.digests, pa.binary(16)),
                                                  pa.repeat(pa.scalar(c.source, pa.string()), n)], schema=STAGED))
        self._sources.append(c.source_index)
        self.index.add(c.sigs, c.has_sig, n)

    def replay(self, counts: Counts) -> Iterator[Cleaned]:
        """Match the index, then the staged batches again, in order, without the near-duplicates."""
        self._writer.close()
        self._sink.close()
        log.info("near-duplicate matching: %d documents, %d bands", self.index.n, self.index.cfg.bands)
        found = self.index.duplicates()
        log.info("near-duplicates: %d documents to remove (%d candidate pairs, %d accepted)", found.removed.size,
                 found.candidate_pairs, found.accepted_pairs)
        counts.near_pairs = {"candidate_pairs": found.candidate_pairs, "accepted_pairs": found.accepted_pairs}
        removed, start = found.removed, 0
        wanted = {found.kept_for[int(x)]: "" for x in removed[: counts.per_rule]}  # ids of the kept documents
        with pa.OSFile(str(self.folder / "staged.arrow"), "rb") as f:  # read, not mapped: RSS stays one batch
            reader = pa.ipc.open_file(f)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                n = batch.num_rows
                lo, hi = np.searchsorted(removed, [start, start + n])
                digests = batch.column(1).to_pylist()
                for x in wanted:
                    if start <= x < start + n:
                        wanted[x] = digests[x - start].hex()
                texts = batch.column(0)
                sizes = pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
                c = Cleaned(texts, digests, sizes, batch.column(2)[0].as_py() if n else "", 0, Counter(),
                            self._sources[b])
                if hi > lo:
                    c = self._drop(c, removed[lo:hi] - start, start, found, wanted, counts)
                start += n
                yield c

    def _drop(self, c: Cleaned, local: np.ndarray, start: int, found: near_dedup.Removals, wanted: dict[int, str],
              counts: Counts) -> Cleaned:
        texts = c.texts
        rows = []
        for i in local[: max(0, counts.per_rule - len(counts.removed.get("near_duplicate", [])))]:
            x = int(i) + start
            kept = found.kept_for[x]
            # clusters chain (a ~ b ~ c), so the kept document can be less similar than the pair that joined them
            detail = f"cluster kept {wanted.get(kept, '')}; similarity to it {self.index.similarity(x, kept):.2f}"
            rows.append(_row("near_duplicate", c.source, texts[int(i)].as_py(), detail))
        counts.add_removed(rows)
        mask = np.ones(len(texts), dtype=bool)
        mask[local] = False
        gone = int(c.sizes[~mask].sum())
        counts.dropped["near_duplicate"] += int(local.size)
        counts.dropped_bytes["near_duplicate"] += gone
        counts.by_source[f"{c.source_index}/dropped/near_dedup"] += int(local.size)
        counts.by_source[f"{c.source_index}/dropped_bytes/near_dedup"] += gone
        c.take(mask)
        return c

    def close(self) -> None:
        try:
            self.index.close()
            self._writer.close()
            self._sink.close()
        except (OSError, pa.ArrowException):  # already closed by replay, or the run is failing anyway
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
