"""Stage `contamination`: word n-gram overlap between every evaluation set the run uses and every training text.

An evaluation item is contaminated when one of its n-grams (n words, 13 by default, as is usual; an item shorter than
n words is one n-gram of its own length) occurs in a training text. The evaluation n-grams are few and kept in
memory; the training texts are streamed once, so the check costs one pass over the corpus.

Evaluation sets: the held-out sets of the SFT, reward and PPO data (the user's eval datasets, the share held out of
their training files, or the built-in world's), the data files of the evaluate stage's own lm-eval tasks
(`include_path`), and the corpus's held-out split (`heldout_text`, reported but not a promotion gate: near-copies
inside one corpus are deduplication's business). Training texts: the corpus's train split and the SFT, preference
and RL training data. Its own stage with its own cache key: editing a dataset reruns this check, not ingest.

inputs:  corpus (ingest), tasks (the built-in task data, optional)
outputs: contamination (report.json: per set, the items found and the first few)
metrics: contamination/<set>/items, contamination/<set>/rate, contamination/mb_per_s
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stages.common import NullTracker, StageResult, Tracker, atomic_dir, require_path, write_json
from stages.data.chat_data import DatasetRef

log = logging.getLogger(__name__)
GATE_EXEMPT = ("heldout_text",)  # sets the promotion gate does not judge (see the module doc)

# Evaluation sets of the built-in task folder, and the training files beside them.
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


def check(eval_sets: dict[str, list[str | list[str]]], train: Iterable[str], n: int = 13) -> dict[str, dict[str, Any]]:
    """Per evaluation set: how many of its items share an n-gram with any training text, and the first few. An item
    is a text, or several (the fields of a row, each its own n-grams)."""
    owners: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    starts: dict[str, set[int]] = {}  # first word of an evaluation n-gram -> the lengths of those starting with it
    for name, items in eval_sets.items():
        for i, item in enumerate(items):
            for text in [item] if isinstance(item, str) else item:
                for g in _grams(words(text), n):
                    owners.setdefault(g, []).append((name, i))
                    starts.setdefault(g[0], set()).add(len(g))
    hit: set[tuple[str, int]] = set()
    for text in train:
        ws = words(text)
        for j, w in enumerate(ws):  # one dict lookup per word; a tuple only where an evaluation n-gram could start
            for k in starts.get(w, ()):
                if (g := tuple(ws[j : j + k])) in owners:
                    hit.update(owners[g])
    report = {}
    for name, items in eval_sets.items():
        found = sorted(i for s, i in hit if s == name)
        report[name] = {"items": len(found), "total": len(items), "rate": len(found) / max(len(items), 1),
                        "examples": [_shown(items[i]) for i in found[:EXAMPLES]]}
    return report


def _shown(item: str | list[str]) -> str:
    return item if isinstance(item, str) else " | ".join(item)




def metrics_of(report: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"contamination/{_metric_name(name)}/{k}": float(v[k]) for name, v in report.items()
            for k in ("items", "rate")}


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ------------------------------------------------------------------------------------------------------ the stage
class TaskRefs(BaseModel):
    """A post-training stage's datasets, as that stage's section names them."""

    model_config = ConfigDict(extra="forbid")
    dataset: DatasetRef | None = Field(None, description="The stage's training data (its `dataset`).")
    eval_dataset: DatasetRef | None = Field(None, description="The stage's held-out data (its `eval_dataset`).")


class Config(BaseModel):
    """The contamination check. `sft`, `reward`, `ppo` and `include_path` mirror those stages' settings: the pipeline
    fills them from its other sections, so set them only to run this stage on its own."""

    model_config = ConfigDict(extra="forbid")

    check: bool = Field(True, description="Run the check (one pass over the corpus and the training data).")
    ngram: int = Field(13, ge=1, description="An evaluation item is contaminated when one of its runs of this many "
                       "words occurs in a training text.")
    heldout_docs: int = Field(200, ge=0, description="Documents of the corpus's held-out split checked (the ones "
                              "the evaluate stage scores).")
    sft: TaskRefs = Field(default_factory=TaskRefs, description="sft.dataset / sft.eval_dataset (set by the pipeline).")
    reward: TaskRefs = Field(default_factory=TaskRefs, description="reward.dataset / reward.eval_dataset (set by the "
                             "pipeline).")
    ppo: TaskRefs = Field(default_factory=TaskRefs, description="ppo.dataset / ppo.eval_dataset (set by the pipeline).")
    include_path: str | None = Field(None, description="evaluate.include_path (set by the pipeline): its .jsonl/.json "
                                     "data files are evaluation sets too.", json_schema_extra={"external": True})


def _task_sets(cfg: Config, tasks_dir: Path | None) -> tuple[dict[str, list[str | list[str]]], list[str]]:
    """(evaluation sets, training texts) of the SFT, preference and RL data, as the stages read them."""
    from stages.data import task_data

    sets: dict[str, list[str | list[str]]] = {}
    train: list[str] = []
    for stage, name in (("sft", "sft_eval"), ("reward", "preferences_eval"), ("ppo", "heldout")):
        refs: TaskRefs = getattr(cfg, stage)
        if refs.dataset is None and tasks_dir is None:
            continue
        data = task_data.load(stage, refs.dataset, refs.eval_dataset, tasks_dir)
        sets[name if data.builtin_eval else f"{stage}_eval"] = [_item_text(r) for r in data.eval]
        train.extend(t for r in data.train for t in _texts_of(r))
    return sets, train


def _include_sets(include: Path | None) -> dict[str, list[str | list[str]]]:
    """The data files beside the evaluate stage's own task definitions: every string field of every row."""
    if include is None or not include.is_dir():
        return {}
    sets = {}
    for f in sorted([*include.rglob("*.jsonl"), *include.rglob("*.json")]):
        rows = list(_read_jsonl(f)) if f.suffix == ".jsonl" else json.loads(f.read_text(encoding="utf-8"))
        rows = rows if isinstance(rows, list) else [rows]
        sets[f"lm_eval:{f.stem}"] = [[v for v in r.values() if isinstance(v, str)] for r in rows if isinstance(r, dict)]
    return sets


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    from stages.posttrain.heldout_eval import val_docs

    corpus = require_path(inputs.get("corpus", ""), "input `corpus` (the ingest stage's corpus folder)")
    tasks_dir = Path(inputs["tasks"]) if inputs.get("tasks") else None
    include = Path(cfg.include_path).expanduser() if cfg.include_path else None
    out_dir = Path(out_dir)
    outputs = {"contamination": out_dir / "contamination"}
    sets: dict[str, list[str | list[str]]] = {}
    train: list[str] = []
    if cfg.check:
        sets, train = _task_sets(cfg, tasks_dir)
        sets.update(_include_sets(include))
        if cfg.heldout_docs:
            sets["heldout_text"] = val_docs(corpus, cfg.heldout_docs)
    t0 = time.monotonic()
    texts = [*training_texts(corpus, None), *train] if sets else []
    report = check(sets, texts, cfg.ngram) if sets else {}
    seconds = time.monotonic() - t0
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    for name, r in report.items():
        if r["items"]:
            log.warning("contamination: %d of %d %s items share a %d-word sequence with training text, e.g. %r",
                        r["items"], r["total"], name, cfg.ngram, r["examples"][0][:200])
    with atomic_dir(out_dir / "contamination") as tmp:
        write_json(tmp / "report.json", {"ngram": cfg.ngram, "sets": report, "training_mb": mb,
                                         "not_gated": list(GATE_EXEMPT)})
    metrics = {**metrics_of(report), "contamination/training_mb": mb,
               "contamination/mb_per_s": mb / seconds if seconds > 0 else 0.0}
    tracker.log_metrics(metrics)
    return StageResult(outputs=outputs, metrics=metrics)
