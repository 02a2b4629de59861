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

from stages.data import near_dedup, quality
from stages.data.readers import BuiltinSource, Source

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
