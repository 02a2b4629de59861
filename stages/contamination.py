"""Contamination check: word n-gram overlap between every evaluation set the pipeline uses and every training
text. An evaluation item is contaminated when one of its n-grams (n words, 13 by default, as is usual; an item
shorter than n words is one n-gram of its own length) occurs in a training text. The evaluation n-grams are few and
kept in memory; the training texts are streamed once, so the check costs one pass over the corpus."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Evaluation sets of the built-in task folder, and the training files beside them.
EVAL_FILES = {"heldout": "heldout.jsonl", "sft_eval": "sft_eval.jsonl", "preferences_eval": "preferences_eval.jsonl"}
TRAIN_FILES = ("sft.jsonl", "preferences.jsonl", "rl_prompts.jsonl")
EXAMPLES = 5
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words: punctuation, case and spacing do not hide a copy."""
    return _WORD.findall(text.lower())


def _texts_of(row: dict[str, Any]) -> Iterator[str]:
    """Every piece of text in a task row (a prompt, messages, chosen/rejected answers)."""
    for key in ("prompt", "chosen", "rejected", "messages", "text"):
        value = row.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from (m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))


def _item_text(row: dict[str, Any]) -> str:
    """What an evaluation item shows the model: its prompt (for chat rows, the user turns)."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    turns = row.get("prompt") or row.get("messages") or []
    return " ".join(m["content"] for m in turns if isinstance(m, dict) and m.get("role") == "user")


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        yield from (json.loads(line) for line in f if line.strip())


def _grams(ws: list[str], n: int) -> Iterator[tuple[str, ...]]:
    if len(ws) < n:
        if ws:
            yield tuple(ws)
        return
    yield from (tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))


def training_texts(corpus_dir: Path | None, tasks_dir: Path | None) -> Iterator[str]:
    """The pretraining corpus (its train shards) and the task folder's SFT, preference and RL data."""
    if corpus_dir is not None:
        import pyarrow.parquet as pq

        for shard in sorted(Path(corpus_dir).glob("train-*.parquet")):
            for batch in pq.ParquetFile(shard).iter_batches(columns=["text"]):
                yield from (t for t in batch.column(0).to_pylist() if t)
    if tasks_dir is not None:
        for name in TRAIN_FILES:
            if (Path(tasks_dir) / name).is_file():
                for row in _read_jsonl(Path(tasks_dir) / name):
                    yield from _texts_of(row)


def check(eval_sets: dict[str, list[str]], train: Iterable[str], n: int = 13) -> dict[str, dict[str, Any]]:
    """Per evaluation set: how many of its items share an n-gram with any training text, and the first few."""
    owners: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    lengths = set()
    for name, items in eval_sets.items():
        for i, text in enumerate(items):
            for g in _grams(words(text), n):
                owners.setdefault(g, []).append((name, i))
                lengths.add(len(g))
    hit: set[tuple[str, int]] = set()
    for text in train:
        ws = words(text)
        for k in lengths:
            for j in range(len(ws) - k + 1):
                if (g := tuple(ws[j : j + k])) in owners:
                    hit.update(owners[g])
    report = {}
    for name, items in eval_sets.items():
        found = sorted(i for s, i in hit if s == name)
        report[name] = {"items": len(found), "total": len(items), "rate": len(found) / max(len(items), 1),
                        "examples": [items[i] for i in found[:EXAMPLES]]}
    return report


def check_tasks(tasks_dir: Path, corpus_dir: Path | None, n: int = 13) -> dict[str, dict[str, Any]]:
    """`check` over the task folder's evaluation sets against the corpus and the task folder's training data."""
    sets = {name: [_item_text(r) for r in _read_jsonl(tasks_dir / f)]
            for name, f in EVAL_FILES.items() if (tasks_dir / f).is_file()}  # fmt: skip
    return check(sets, training_texts(corpus_dir, tasks_dir), n)


def metrics_of(report: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"contamination/{name}/{k}": float(v[k]) for name, v in report.items() for k in ("items", "rate")}
