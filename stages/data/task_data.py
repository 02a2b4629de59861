"""Task data: what the SFT, reward and RL stages train and evaluate on, from the user's datasets or the built-in world.

Each stage has one role:

| stage  | role       | records (stages.data.chat_data) | built-in files (the `tasks` folder of the ingest stage) |
|--------|------------|----------------------------|---------------------------------------------------------|
| sft    | chat       | {"messages"}               | sft.jsonl, sft_eval.jsonl                               |
| reward | preference | {"prompt","chosen","rejected"} | preferences.jsonl, preferences_eval.jsonl           |
| ppo    | prompt     | {"prompt","answer","kind"} | rl_prompts.jsonl, heldout.jsonl                         |

Training data is the stage's `dataset` when set, else the built-in file. Held-out data is its `eval_dataset` when
set, else the built-in held-out file when the training data is the built-in one, else a fixed share of the
training data chosen by the hash of each record (the same records whatever the order or size of the file) and
never trained on. The built-in world is one implementation of this interface, imported only here and only when its
data is in use; its checker (answers checked by program, harmful requests refused) applies to its own held-out
items, and a user's RL prompts with an `answer` column are checked by normalised exact match.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common import StageError
from stages.data.chat_data import LOADERS, DatasetRef, subsample

HOLDOUT_SHARE = 0.1  # of a user's training data, held out when no eval_dataset is given


@dataclass(frozen=True)
class Role:
    stage: str
    kind: str  # the chat_data loader: chat, preference, prompt
    train_file: str
    eval_file: str
    what: str  # for messages: "chat examples", ...


ROLES = {
    "sft": Role("sft", "chat", "sft.jsonl", "sft_eval.jsonl", "chat examples"),
    "reward": Role("reward", "preference", "preferences.jsonl", "preferences_eval.jsonl", "preference pairs"),
    "ppo": Role("ppo", "prompt", "rl_prompts.jsonl", "heldout.jsonl", "RL prompts"),
}


# ----------------------------------------------------------------------------------------------- answer checking
_TRAILING = re.compile(r"[\s.,!?;:'\"]+$")
_LEADING = re.compile(r"^[\s'\"]+")


def normalize_answer(text: str) -> str:
    """First line, stripped, lowercased, without surrounding quotes or trailing punctuation."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    first = _LEADING.sub("", _TRAILING.sub("", first))
    return " ".join(first.lower().split())


def check_answer(response: str, answer: str) -> bool:
    """True when the model's response is exactly the expected answer after normalisation."""
    return normalize_answer(response) == normalize_answer(answer) and normalize_answer(answer) != ""


@dataclass(frozen=True)
class Checker:
    """How held-out answers with a known `answer` are judged. `refusal_kind`: items of that kind must be declined
    (judged by `is_refusal`), and the refusal rates on them and on the other items are metrics."""

    check: Callable[[str, str, str | None], bool]
    is_refusal: Callable[[str], bool] | None = None
    refusal_kind: str | None = None
    name: str = "exact match"


GENERIC_CHECKER = Checker(lambda response, answer, kind: check_answer(response, answer))


def builtin_checker() -> Checker:
    from stages.data import (
        builtin,  # imported on use: the built-in world is loaded only when its data is read
    )

    return builtin.checker()


# --------------------------------------------------------------------------------------------------- the data
@dataclass
class TaskSet:
    """One stage's training and held-out records and where they came from."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    train_source: str  # a path or name, or "the built-in <file>"
    eval_source: str
    builtin: bool  # the training data is the built-in world's
    builtin_eval: bool  # the held-out data is the built-in world's (its checker and metrics apply)
    sources: list[Any] = field(default_factory=list)  # what the stage's work key covers (refs and paths)

    @property
    def checker(self) -> Checker | None:
        """The checker of the held-out items, when every one has an expected answer."""
        if self.builtin_eval:
            return builtin_checker()
        if self.eval and all(r.get("answer") is not None for r in self.eval):
            return GENERIC_CHECKER
        return None


def record_hash(record: Any) -> int:
    """A record's place in [0, 2**32): decides which records a hash split holds out, stable across runs."""
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little")


def hash_split(records: list[dict[str, Any]], share: float = HOLDOUT_SHARE) -> tuple[list[dict], list[dict]]:
    """(train, held out): the records whose hash falls under `share`, at least one of each when there are two."""
    cut = int(share * (1 << 32))
    hashes = [record_hash(r) for r in records]
    held = [h < cut for h in hashes]
    if len(records) >= 2 and not any(held):
        held[min(range(len(records)), key=hashes.__getitem__)] = True
    if len(records) >= 2 and all(held):
        held[max(range(len(records)), key=hashes.__getitem__)] = False
    return ([r for r, h in zip(records, held, strict=True) if not h],
            [r for r, h in zip(records, held, strict=True) if h])


def _builtin_file(tasks_dir: Path | None, name: str, role: Role, setting: str) -> Path:
    if tasks_dir is None:
        raise StageError(f"{setting} is empty and there is no built-in task data; set {setting} to your dataset, or "
                         "add `{type: builtin}` to ingest.sources for the built-in world's.")
    path = Path(tasks_dir) / name
    if not path.exists():
        raise StageError(f"{path} not found: the tasks folder lacks {name}; rerun ingest with the built-in source "
                         f"or set {setting}.")
    return path


def load(stage: str, dataset: DatasetRef | str | None, eval_dataset: DatasetRef | str | None,
         tasks_dir: Path | None, eval_limit: int | None = None) -> TaskSet:
    """The stage's training and held-out records (see the module doc); StageError names the setting to fix."""
    role = ROLES[stage]
    loader = LOADERS[role.kind]
    if dataset:
        train_src: Any = dataset
        train = loader(dataset)
        builtin = False
    else:
        train_src = _builtin_file(tasks_dir, role.train_file, role, f"{stage}.dataset")
        train = loader(train_src)
        builtin = True
    if eval_dataset:
        eval_src: Any = eval_dataset
        held = loader(eval_dataset)
        builtin_eval = False
        eval_desc = str(eval_dataset)
    elif builtin:
        eval_src = _builtin_file(tasks_dir, role.eval_file, role, f"{stage}.eval_dataset")
        held = loader(eval_src)
        builtin_eval = True
        eval_desc = f"the built-in {role.eval_file}"
    else:
        if len(train) < 2:
            raise StageError(f"{dataset} has {len(train)} {role.what}; with no {stage}.eval_dataset at least 2 are "
                             f"needed so {HOLDOUT_SHARE:.0%} can be held out.")
        train, held = hash_split(train)
        eval_src, builtin_eval = None, False
        eval_desc = f"{HOLDOUT_SHARE:.0%} of {dataset} by hash"
    desc = str(dataset) if dataset else f"the built-in {role.train_file}"
    return TaskSet(train, subsample(held, eval_limit), desc, eval_desc, builtin, builtin_eval,
                   [s for s in (train_src, eval_src) if s is not None])


def builtin_heldout(tasks_dir: Path | None, limit: int | None = None) -> list[dict[str, Any]]:
    """The built-in world's held-out questions and requests (for the exact-match and refusal metrics of a stage
    trained on its data), or none without a tasks folder."""
    if tasks_dir is None or not (Path(tasks_dir) / "heldout.jsonl").exists():
        return []
    return subsample(LOADERS["prompt"](Path(tasks_dir) / "heldout.jsonl"), limit)
