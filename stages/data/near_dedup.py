"""Near-duplicate removal for the ingest stage: MinHash signatures over word n-grams (datatrove's, as FineWeb computed
them) grouped by locality-sensitive hashing, with every state on disk, so the corpus never has to fit in memory.

The work is staged the way datatrove stages it, inside one ingest:

1. signatures: each document's text is simplified (lower case, no punctuation, numbers as 0) and split into word
   n-grams; `bands * rows` MinHash values are taken with datatrove's `MinhashDedupSignature`. Pure per document, so
   it runs wherever cleaning runs (the fan-out workers included).
2. index (`Index.add`, in document order): each signature is appended to a file of signatures, and for every band one
   64-bit key of its `rows` values is appended to that band's file. Memory holds one batch.
3. matching (`Index.duplicates`): one band file at a time (split by key range when it exceeds the memory budget) is
   sorted; documents sharing a key are candidate pairs. A candidate pair counts when the share of equal values
   over the whole signature, an estimate of the Jaccard similarity of the two n-gram sets, reaches `threshold`
   (LSH alone would also pair documents that agree on one band by chance).
4. clusters: accepted pairs are joined (union-find over the documents involved only); each cluster keeps its
   earliest document, in source order, and the others are removed.

Why these defaults and not FineWeb's (5-grams, 14 bands of 8, no check): a copy with 5 % of its words changed at
random keeps about 0.95^5 of its 5-grams, a Jaccard similarity near 0.63, which 14 bands of 8 find about 30 % of the
time. 32 bands of 4 find it 99.6 % of the time, and the signature check at 0.5 removes the pairs that met by chance.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import operator
import os
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stages.data.quality import word_splitter

BAND_RECORD = np.dtype([("key", "<u8"), ("doc", "<u4")])
# Memory a sorted band partition takes per record: the records, the sort order, the sorted copies, the run marks.
BYTES_PER_SORTED_RECORD = 48
# Shingles whose MinHash values are computed at once: 8 bytes per value, bands*rows values per shingle (1 MB at
# the default 128, which stays in the CPU's cache: larger chunks are slower than one document at a time).
SHINGLES_PER_CHUNK = 1 << 10
MERSENNE_61 = (1 << 61) - 1  # the prime of datatrove's MinHash permutations
_DIGEST = operator.methodcaller("digest")


class NearDedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Remove near-duplicate documents across every filtered source (MinHash "
                          "+ LSH, state on disk); a source's `filters` setting overrides this, and the builtin source "
                          "takes part only with filters: true.")
    ngram: int = Field(5, ge=1, description="Words per n-gram (shingle); smaller finds looser copies, and more "
                       "unrelated templated text.")
    bands: int = Field(32, ge=1, description="LSH bands: documents agreeing on all `rows` values of one band become a "
                       "candidate pair. More bands find less similar copies.")
    rows: int = Field(4, ge=1, description="MinHash values per band; bands * rows values per document.")
    threshold: float = Field(0.5, gt=0.0, le=1.0, description="A candidate pair is a near-duplicate when this share "
                             "of their MinHash values agree (an estimate of the Jaccard similarity of their n-grams).")
    seed: int = Field(1, description="Seed of the MinHash permutations.")

    @property
    def num_hashes(self) -> int:
        return self.bands * self.rows


@functools.cache
def _signer(cfg_json: str) -> Any:
    """datatrove's signature step, used for its shingling and MinHash only (its files are written by `Index`)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig

    cfg = NearDedupConfig.model_validate_json(cfg_json)
    # sha1: datatrove's xxhash path passes str to xxhash, which xxhash 4 (the version the project's other
    # dependencies resolve to) refuses. 32-bit values: half the disk, and chance agreements stay negligible.
    mh = MinhashConfig(n_grams=cfg.ngram, num_buckets=cfg.bands, hashes_per_bucket=cfg.rows, seed=cfg.seed,
                       hash_config=HashConfig(precision=32, hash_fc="sha1"))
    return MinhashDedupSignature(output_folder=tempfile.gettempdir(), config=mh, language=word_splitter())


Cuts = tuple[str, list[int], list[int]]  # a word list joined by a separator; where each word starts and ends in it


def cuts(words: list[str], sep: str) -> Cuts:
    """`sep.join(words)` and the start and end of each word in it."""
    joined = sep.join(words)
    lens = np.fromiter(map(len, words), np.int64, len(words)) + len(sep)
    ends = np.cumsum(lens)
    return joined, (ends - lens).tolist(), (ends - len(sep)).tolist()


def ngrams(words: list[str], n: int, sep: str, cut: Cuts | None = None) -> list[str]:
    """`sep.join(words[i : i + n])` for every i, sliced out of the joined words (`cut`: `cuts(words, sep)`, made
    once for several n) instead of a list slice and a join per n-gram."""
    if n < 1:  # not an n-gram size, but what datatrove would make of it
        return [sep.join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(words) < n:
        return []
    joined, starts, stops = cut or cuts(words, sep)
    return list(map(joined.__getitem__, map(slice, starts[: len(words) - n + 1], stops[n - 1 :])))


def _simplify(text: str, norm: Any) -> str:
    """datatrove's `simplify_text`, its last step (dropping combining marks after NFD) done per distinct character
    and skipped for ASCII text, which it leaves as it is: the same string, without a Python call per character."""
    from datatrove.utils.text import simplify_text

    if not norm.norm_unicode_diacritics:
        return simplify_text(text, norm)
    text = simplify_text(text, dataclasses.replace(norm, norm_unicode_diacritics=False))
    if text.isascii():
        return text
    text = unicodedata.normalize("NFD", text)
    marks = {ord(c): None for c in set(text) if unicodedata.category(c) == "Mn"}
    return text.translate(marks).strip()


def _shingles(signer: Any, text: str) -> np.ndarray:
    """datatrove's `MinhashDedupSignature.get_shingles`: the 32-bit sha1 (first 4 bytes, little-endian) of each
    space-joined word n-gram of the simplified text; the n-grams sliced out of one joined string, as bytes when it
    is ASCII, and the digests read as one array (uint64 [k])."""
    words = signer.word_tokenizer.word_tokenize(_simplify(text, signer.config.norm_config))
    n = signer.config.n_grams
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    joined, starts, stops = cuts(words, " ")
    if joined.isascii():
        grams: Any = map(joined.encode().__getitem__, map(slice, starts[: len(words) - n + 1], stops[n - 1 :]))
    else:
        grams = map(str.encode, ngrams(words, n, " ", (joined, starts, stops)))
    digests = np.frombuffer(b"".join(map(_DIGEST, map(hashlib.sha1, grams))), dtype=np.uint8)
    return digests.reshape(-1, 20)[:, :4].copy().view("<u4")[:, 0].astype(np.uint64)


def _min_hashes(shingles: np.ndarray, starts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per document (its shingles from `starts[i]` on), datatrove's `get_signature` at 32 bits: the minimum over its
    shingles of ((s * a + b) mod p) & 0xffffffff, p = 2^61 - 1, the products wrapping at 64 bits as numpy's do.
    x mod p is taken as y = (x & p) + (x >> 61) (< 2p), less p when that reaches p (then y - p < y; below p, y - p
    wraps past y): the same value as %, in fewer passes over the array."""
    p = np.uint64(MERSENNE_61)
    x = shingles[:, None] * a
    x += b
    y = x & p
    x >>= np.uint64(61)
    y += x
    np.subtract(y, p, out=x)
    np.minimum(y, x, out=y)
    y &= np.uint64(0xFFFFFFFF)
    return np.minimum.reduceat(y, starts, axis=0).astype(np.uint32)


def _chunks(sizes: np.ndarray) -> Iterator[np.ndarray]:
    """The documents with shingles, in order, in runs of at most `SHINGLES_PER_CHUNK` shingles (a larger document
    alone)."""
    docs = np.flatnonzero(sizes)
    lo = 0
    while lo < docs.size:
        hi, rows = lo + 1, sizes[docs[lo]]
        while hi < docs.size and rows + sizes[docs[hi]] <= SHINGLES_PER_CHUNK:
            rows += sizes[docs[hi]]
            hi += 1
        yield docs[lo:hi]
        lo = hi


def signatures(texts: list[str], cfg: NearDedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(signatures uint32 [n, bands*rows], has_signature bool [n]); a text shorter than `ngram` words has none and
    is never a near-duplicate (as in datatrove). The values are datatrove's, computed for many documents at once,
    `SHINGLES_PER_CHUNK` shingles at a time."""
    signer = _signer(cfg.model_dump_json())
    a, b = signer.parameters
    sigs = np.zeros((len(texts), cfg.num_hashes), dtype=np.uint32)
    shingles = [_shingles(signer, text) for text in texts]
    sizes = np.array([s.size for s in shingles], dtype=np.int64)
    for part in _chunks(sizes):
        if part.size == 1:  # one document, perhaps longer than a chunk: its minimum over blocks of one
            one = shingles[part[0]]
            blocks = [_min_hashes(one[i : i + SHINGLES_PER_CHUNK], np.zeros(1, np.int64), a, b)
                      for i in range(0, one.size, SHINGLES_PER_CHUNK)]
            sigs[part] = np.minimum.reduce(blocks)
            continue
        starts = np.concatenate([[0], np.cumsum(sizes[part])[:-1]])
        sigs[part] = _min_hashes(np.concatenate([shingles[i] for i in part]), starts, a, b)
    return sigs, sizes > 0


def _band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band): the band's values mixed by fixed odd multipliers, then a finaliser, so
    equal keys mean equal values except with negligible probability."""
    mult = np.random.default_rng(0x5EED).integers(1, 1 << 63, size=rows, dtype=np.uint64) | np.uint64(1)
    vals = sigs.reshape(len(sigs), bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = (vals * mult).sum(axis=2, dtype=np.uint64)
        key ^= key >> np.uint64(31)
        key *= np.uint64(0x9E3779B97F4A7C15)
        key ^= key >> np.uint64(29)
    return key


@dataclass
class Removals:
    """The outcome of matching: documents to drop (sorted indices), the document each one's cluster keeps, and the
    pair counts."""

    removed: np.ndarray  # int64, sorted
    kept_for: dict[int, int]
    candidate_pairs: int
    accepted_pairs: int


class _Clusters:
    """Union-find over the documents of accepted pairs only; the root of a cluster is its earliest document."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while (up := self.parent.get(root, root)) != root:
            root = up
        while (up := self.parent.get(x, x)) != root:  # path compression
            self.parent[x] = root
            x = up
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo
            self.parent.setdefault(lo, lo)


class Index:
    """The disk-backed LSH index of one ingest: a signature file and one key file per band, under `folder`."""

    def __init__(self, folder: Path, cfg: NearDedupConfig, memory_budget_bytes: int) -> None:
        self.folder, self.cfg = Path(folder), cfg
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_sorted = max(1 << 16, memory_budget_bytes // 4 // BYTES_PER_SORTED_RECORD)
        self.n = 0
        self._sig_path = self.folder / "signatures.u32"
        self._sigs = open(self._sig_path, "wb")
        self._bands = [open(self.folder / f"band-{b:03d}.bin", "wb") for b in range(cfg.bands)]

    def add(self, sigs: np.ndarray | None, has: np.ndarray | None, n: int) -> None:
        """Append the next `n` documents (in order); `sigs` None: none of them takes part (an unfiltered source)."""
        if sigs is None or has is None:
            sigs, has = np.zeros((n, self.cfg.num_hashes), np.uint32), np.zeros(n, bool)
        self._sigs.write(np.ascontiguousarray(sigs, dtype="<u4").tobytes())
        docs = np.arange(self.n, self.n + n, dtype=np.uint32)[has]
        if docs.size:
            keys = _band_keys(sigs[has], self.cfg.bands, self.cfg.rows)
            for b, f in enumerate(self._bands):
                rec = np.empty(docs.size, dtype=BAND_RECORD)
                rec["key"], rec["doc"] = keys[:, b], docs
                f.write(rec.tobytes())
        self.n += n

    def close(self) -> None:
        for f in (self._sigs, *self._bands):
            f.close()

    def _partitions(self, path: Path) -> Iterator[np.ndarray]:
        """A band's records in groups that fit the memory budget: the whole file, or ranges of the key."""
        n = path.stat().st_size // BAND_RECORD.itemsize
        if n <= self.max_sorted:
            yield np.fromfile(path, dtype=BAND_RECORD)
            return
        bits = int(np.ceil(np.log2(2 * n / self.max_sorted)))
        parts = [path.with_suffix(f".part{p:04d}") for p in range(1 << bits)]
        outs = [open(p, "wb") for p in parts]
        try:
            with open(path, "rb") as f:
                while chunk := f.read(self.max_sorted * BAND_RECORD.itemsize):
                    rec = np.frombuffer(chunk, dtype=BAND_RECORD)
                    which = (rec["key"] >> np.uint64(64 - bits)).astype(np.int64)
                    order = np.argsort(which, kind="stable")
                    bounds = np.searchsorted(which[order], np.arange((1 << bits) + 1))
                    for p, out in enumerate(outs):
                        out.write(rec[order[bounds[p] : bounds[p + 1]]].tobytes())
        finally:
            for out in outs:
                out.close()
        for p in parts:
            yield np.fromfile(p, dtype=BAND_RECORD)
            p.unlink()

    def _row(self, fd: int, doc: int) -> np.ndarray:
        size = self.cfg.num_hashes * 4
        return np.frombuffer(os.pread(fd, size, doc * size), dtype="<u4")

    def duplicates(self) -> Removals:
        """Match every band, check each candidate pair on its whole signature, and cluster (see the module doc)."""
        self.close()
        clusters = _Clusters()
        candidates = accepted = 0
        fd = os.open(self._sig_path, os.O_RDONLY)
        try:
            for b in range(self.cfg.bands):
                path = self.folder / f"band-{b:03d}.bin"
                for rec in self._partitions(path):
                    for a, c in _candidate_pairs(rec):
                        candidates += 1
                        if clusters.find(a) == clusters.find(c):
                            continue
                        sim = float(np.mean(self._row(fd, a) == self._row(fd, c)))
                        if sim >= self.cfg.threshold:
                            accepted += 1
                            clusters.union(a, c)
                path.unlink()
        finally:
            os.close(fd)
        kept_for = {x: r for x in clusters.parent if (r := clusters.find(x)) != x}
        removed = np.array(sorted(kept_for), dtype=np.int64)
        return Removals(removed, kept_for, candidates, accepted)

    def similarity(self, a: int, b: int) -> float:
        """The share of agreeing MinHash values of two indexed documents (after `duplicates`)."""
        fd = os.open(self._sig_path, os.O_RDONLY)
        try:
            return float(np.mean(self._row(fd, a) == self._row(fd, b)))
        finally:
            os.close(fd)


def _candidate_pairs(rec: np.ndarray) -> Iterator[tuple[int, int]]:
    """Documents sharing a key: each paired with the one before it and with the first of its run (earlier document
    first), so a run of any length gives a linear number of pairs."""
    if rec.size < 2:
        return
    order = np.argsort(rec["key"], kind="stable")  # stable: within a key, documents stay in their order
    keys, docs = rec["key"][order], rec["doc"][order].astype(np.int64)
    same = keys[1:] == keys[:-1]
    if not same.any():
        return
    start = np.concatenate([[True], ~same])
    first = np.maximum.accumulate(np.where(start, np.arange(keys.size), 0))
    at = np.flatnonzero(same) + 1
    prev_pairs = np.stack([docs[at - 1], docs[at]], axis=1)
    first_pairs = np.stack([docs[first[at]], docs[at]], axis=1)
    pairs = np.unique(np.concatenate([prev_pairs, first_pairs]), axis=0)
    yield from ((int(a), int(c)) for a, c in pairs)
