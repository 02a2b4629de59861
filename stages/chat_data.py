"""Loading and validating the post-training datasets: chat (SFT), preference pairs (reward) and RL prompts.

A dataset source is one of:
  * None: the built-in task file (e.g. `sft.jsonl`) in the `tasks` folder written by the ingest stage;
  * a local `.jsonl`/`.json` file or a `.parquet` file (or a folder of them);
  * a local folder written by `datasets.Dataset.save_to_disk`;
  * a Hugging Face dataset name, optionally `name:split` (e.g. `trl-lib/Capybara:train`).

Every loader returns records normalised to the conversational form the chat template renders, so the tokenizer's
template is the single place that decides what a turn looks like:
  * chat:        {"messages": [{"role", "content"}, ...]}   (from `messages`, or `prompt`/`completion`)
  * preference:  {"prompt": [...], "chosen": [...], "rejected": [...], "kind"?: str}   (strings become lists)
  * rl prompt:   {"prompt": [{"role": "user", ...}], "answer": str | None, "kind": str | None}
Bad input (unknown file type, missing columns, empty data, malformed rows) raises StageError naming the source.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stages.common import StageError

Message = dict[str, str]
ROLES = {"system", "user", "assistant"}


# --------------------------------------------------------------------------------------------- raw record reading
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line.") from e
            if not isinstance(obj, dict):
                raise StageError(f"{path}:{lineno} is a JSON {type(obj).__name__}, expected an object per line.")
            rows.append(obj)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path} is not valid JSON ({e.msg}); use one JSON object per line (.jsonl).") from e
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise StageError(f"{path} must hold a JSON list of objects (or use .jsonl, one object per line).")
    return obj


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise StageError(f"{path} could not be read as Parquet ({e}); check that the file is complete.") from e


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _read_file(path: Path) -> list[dict[str, Any]]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise StageError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet.")
    return reader(path)


def read_records(source: str | Path, *, split: str = "train") -> list[dict[str, Any]]:
    """Raw rows (dicts) from a file, a folder of files, a `save_to_disk` folder or a Hugging Face dataset name."""
    p = Path(source)
    if p.is_file():
        return _read_file(p)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise StageError(f"{p} has splits {sorted(ds)}, not {split!r}; name one as '{p}:<split>'.")
                ds = ds[split]
            return ds.to_list()
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in _READERS)
        if not files:
            raise StageError(f"{p} holds no .jsonl/.json/.parquet files and is not a saved dataset folder.")
        return [row for f in files for row in _read_file(f)]
    text = str(source)
    if text.endswith(tuple(_READERS)) or text.startswith((".", "/", "~")):
        raise StageError(f"dataset file {source} does not exist; check the path.")
    name, _, name_split = text.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=name_split or split)
    except Exception as e:  # offline, unknown name, unknown split ... all user-fixable
        raise StageError(
            f"could not load Hugging Face dataset {name!r} (split {name_split or split!r}): {e}. "
            "Check the name, or point the config at a local .jsonl/.parquet file."
        ) from e
    return ds.to_list()


def resolve_source(source: str | Path | None, tasks_dir: Path | None, builtin_file: str, field: str) -> Path | str:
    """The configured source, or the built-in task file when none is configured."""
    if source is not None and str(source) != "":
        return source
    if tasks_dir is None:
        raise StageError(f"no `{field}` configured and no `tasks` input given; set {field} or run ingest with the "
                         "built-in source.")
    path = Path(tasks_dir) / builtin_file
    if not path.exists():
        raise StageError(f"{path} not found: the tasks folder lacks {builtin_file}; rerun ingest with the built-in "
                         f"source or set `{field}`.")
    return path



def resolve_eval_source(source: str | Path | None, tasks_dir: Path | None, builtin_file: str) -> Path | str | None:
    """The configured held-out source, else the built-in held-out task file when there is one, else None."""
    if source is not None and str(source) != "":
        return source
    if tasks_dir is not None and (Path(tasks_dir) / builtin_file).exists():
        return Path(tasks_dir) / builtin_file
    return None

# ------------------------------------------------------------------------------------------------- normalisation
def _as_messages(value: Any, default_role: str, where: str, column: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict) and "role" in value:
        value = [value]
    if not isinstance(value, list) or not value:
        raise StageError(f"{where}: `{column}` must be a string or a non-empty list of {{role, content}} messages.")
    out = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise StageError(f"{where}: every message in `{column}` needs `role` and `content` keys, got {m!r}.")
        if m["role"] not in ROLES:
            raise StageError(f"{where}: unknown role {m['role']!r} in `{column}`; use one of {sorted(ROLES)}.")
        if not isinstance(m["content"], str):
            raise StageError(f"{where}: message content in `{column}` must be a string.")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_nonempty(rows: list, source: Any, what: str) -> None:
    if not rows:
        raise StageError(f"{what} dataset {source} is empty; it needs at least one row.")


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(rows[0]) if rows else []


def chat_records(rows: list[dict[str, Any]], source: Any) -> list[dict[str, list[Message]]]:
    """Rows with `messages`, or `prompt` + `completion`, as {"messages": [...]} ending in an assistant turn."""
    _check_nonempty(rows, source, "SFT")
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if "messages" in row:
            msgs = _as_messages(row["messages"], "user", where, "messages")
        elif "prompt" in row and "completion" in row:
            msgs = _as_messages(row["prompt"], "user", where, "prompt") + _as_messages(
                row["completion"], "assistant", where, "completion"
            )
        else:
            raise StageError(
                f"SFT dataset {source} row {i} has columns {sorted(row)}; it needs `messages` or "
                "`prompt` + `completion`."
            )
        if not any(m["role"] == "assistant" for m in msgs):
            raise StageError(f"{where}: no assistant message, so there is nothing to learn from it.")
        out.append({"messages": msgs})
    return out


def preference_records(rows: list[dict[str, Any]], source: Any) -> list[dict[str, list[Message]]]:
    """Rows with (`prompt`,) `chosen`, `rejected` as conversational {"prompt", "chosen", "rejected"}."""
    _check_nonempty(rows, source, "preference")
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in row]
        if missing:
            raise StageError(
                f"preference dataset {source} row {i} lacks column(s) {missing} (has {sorted(row)}); "
                "it needs `prompt`, `chosen` and `rejected`."
            )
        prompt = _as_messages(row["prompt"], "user", where, "prompt")
        chosen = _as_messages(row["chosen"], "assistant", where, "chosen")
        rejected = _as_messages(row["rejected"], "assistant", where, "rejected")
        if chosen == rejected:
            raise StageError(f"{where}: `chosen` and `rejected` are identical; the pair teaches nothing.")
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if row.get("kind") is not None:  # what the pair tests; the reward stage reports accuracy per kind
            pair["kind"] = str(row["kind"])
        out.append(pair)
    return out


def prompt_records(rows: list[dict[str, Any]], source: Any) -> list[dict[str, Any]]:
    """Rows with `prompt` (and optional `answer`, `kind`) as {"prompt": [messages], "answer", "kind"}."""
    _check_nonempty(rows, source, "prompt")
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if "prompt" not in row:
            raise StageError(f"prompt dataset {source} row {i} has columns {sorted(row)}; it needs `prompt`.")
        prompt = _as_messages(row["prompt"], "user", where, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise StageError(f"{where}: the prompt ends with an assistant turn; the model must answer last.")
        answer = row.get("answer")
        out.append({"prompt": prompt, "answer": None if answer is None else str(answer), "kind": row.get("kind")})
    return out


def load_chat(source: str | Path) -> list[dict[str, list[Message]]]:
    return chat_records(read_records(source), source)


def load_preferences(source: str | Path) -> list[dict[str, list[Message]]]:
    return preference_records(read_records(source), source)


def load_prompts(source: str | Path) -> list[dict[str, Any]]:
    return prompt_records(read_records(source), source)


def prompt_text(prompt: list[Message]) -> str:
    """The last user message: what a sample table shows as the prompt."""
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])


def subsample(rows: Iterable[Any], limit: int | None) -> list[Any]:
    rows = list(rows)
    return rows if limit is None else rows[:limit]
