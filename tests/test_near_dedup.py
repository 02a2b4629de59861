"""Near-duplicate removal in ingest (`ingest.near_dedup`, stages/data/near_dedup.py: datatrove's MinHash, LSH and
clusters with their state on disk): planted near-copies (5 % of the words changed at random positions) among
templated unrelated pages are removed and the pages kept, the same bytes come out on two workers, and matching in
key ranges (a small memory budget) finds the same documents. Run: .venv/bin/pytest tests/test_near_dedup.py"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.web_corpus import near_dup_corpus
from stages import ingest
from stages.data import near_dedup
from stages.data.corpus_reader import iter_texts


def write_corpus(folder: Path, n_pages: int) -> tuple[list[str], set[str], set[str]]:
    """The generated stream in three .jsonl files; (paths, page texts, copy texts)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = list(near_dup_corpus(n_pages, copy_share=0.1, change=0.05, seed=3))
    third = len(docs) // 3 + 1
    paths = []
    for i in range(3):
        path = folder / f"part-{i}.jsonl"
        path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs[i * third : (i + 1) * third]))
        paths.append(str(path))
    return paths, {d.text for d in docs if d.kind == "page"}, {d.text for d in docs if d.kind == "copy"}


def config(paths: list[str], **kw: object) -> ingest.Config:
    return ingest.Config(sources=[ingest.FilesSource(paths=paths)], near_dedup={"enabled": True},
                         val_fraction=0.1, **kw)


@pytest.fixture(scope="module")
def deduped(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("near")
    paths, pages, copies = write_corpus(root / "in", 1500)
    return root, paths, pages, copies, ingest.run(config(paths), None, root / "out")


def test_planted_near_copies_are_removed_and_unrelated_pages_kept(deduped):
    root, _, pages, copies, res = deduped
    kept = {t for batch in iter_texts(res.outputs["corpus"]) for t in batch}
    copies_removed = len(copies - kept) / len(copies)
    pages_removed = len(pages - kept) / len(pages)
    assert len(copies) >= 120 and copies_removed >= 0.95, copies_removed
    assert pages_removed < 0.01, pages_removed
    m = res.metrics
    assert m["dropped/near_duplicate"] == len(pages | copies) - len(kept)
    assert m["by_source/0/dropped/near_dedup"] == m["dropped/near_duplicate"]
    assert m["near_dedup/accepted_pairs"] <= m["near_dedup/candidate_pairs"]
    rows = [r for r in res.samples if r.get("rule") == "near_duplicate"]
    assert len(rows) == 3 and all(r["text"] in {t[:300] for t in copies} and "similarity" in r["detail"]
                                  for r in rows)
    assert not list((root / "out").glob(".near_dedup*"))  # the staged documents and the index are gone


def test_quality_filters_and_near_dedup_give_the_same_bytes_on_two_workers(deduped, tmp_path):
    _, paths, _, _, _ = deduped
    both = {"quality": {"enabled": True}, "shard_max_bytes": 200_000, "row_group_bytes": 50_000}
    one = ingest.run(config(paths, **both), None, tmp_path / "one")
    two = ingest.run(config(paths, workers=2, **both), None, tmp_path / "two")
    files = sorted(p.name for p in one.outputs["corpus"].iterdir())
    assert files == sorted(p.name for p in two.outputs["corpus"].iterdir()) and len(files) > 4
    assert all((one.outputs["corpus"] / f).read_bytes() == (two.outputs["corpus"] / f).read_bytes() for f in files)
    assert one.metrics == two.metrics and one.samples == two.samples


def test_matching_in_key_ranges_finds_the_same_duplicates(tmp_path):
    cfg = near_dedup.NearDedupConfig(enabled=True)
    texts = [d.text for d in near_dup_corpus(300, copy_share=0.2, seed=5)]
    sigs, has = near_dedup.signatures(texts, cfg)
    found = []
    for name, budget in (("whole", 1 << 30), ("ranges", 1 << 20)):
        index = near_dedup.Index(tmp_path / name, cfg, budget)
        if name == "ranges":
            index.max_sorted = 100  # a band of ~330 records is split into 8 key ranges
        for start in range(0, len(texts), 64):
            index.add(sigs[start : start + 64], has[start : start + 64], len(texts[start : start + 64]))
        found.append(index.duplicates())
    assert found[0].removed.size >= 50
    assert np.array_equal(found[0].removed, found[1].removed) and found[0].kept_for == found[1].kept_for
