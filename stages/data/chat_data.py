"""The format layer: every dataset the post-training stages read, in the shapes public datasets come in, normalised
into one set of records.

Where the rows come from (`read_records`, in stages.data.dataset_files): a local `.jsonl` / `.json` / `.parquet` file,
compressed or not (`.gz`, `.zst`, `.bz2`, `.xz`; streamed, never unpacked to disk), a glob of such files, a folder
of them, a folder written by `datasets.Dataset.save_to_disk`, or a Hugging Face dataset name (`name:split`).

Shapes recognised without configuration (`format: auto`), per row:
  * `messages`: TRL's conversational form, a list of {role, content};
  * `prompt` + `completion`: strings or message lists;
  * Alpaca: `instruction` (+ `input`) + `output`;
  * ShareGPT: `conversations`, a list of {from, value} with roles human / gpt / system;
  * transcripts: one string in the "\\n\\nHuman: ...\\n\\nAssistant: ..." style (column `text`; for preference
    pairs `chosen` and `rejected`, whose shared beginning is the prompt);
  * preference pairs with an explicit `prompt` + `chosen` + `rejected`, or TRL's implicit-prompt pairs: `chosen` and
    `rejected` whole conversations that share a prefix (the prompt).
Anything else: `format` names the shape and `columns` maps the shape's column names to the dataset's, e.g.
`{path: qa.jsonl, format: alpaca, columns: {instruction: question, output: answer}}`.

Every loader returns the conversational records the chat template renders, so the tokenizer's template is the one
place that decides what a turn looks like:
  * chat:        {"messages": [{"role", "content"}, ...]}   ending in an assistant turn
  * preference:  {"prompt": [...], "chosen": [...], "rejected": [...], "kind"?: str}
  * rl prompt:   {"prompt": [messages ending in a user turn], "answer": str | None, "kind": str | None}
Bad input (unknown file type, an unknown shape, empty data, malformed rows) raises StageError naming the source,
the row and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from stages.common import StageError
from stages.data.dataset_files import FORMATS, DatasetRef, as_ref, hub_name_split, local_files, read_records

__all__ = ["FORMATS", "LOADERS", "NORMALISERS", "DatasetRef", "Message", "as_ref", "chat_records", "hub_name_split",
           "load_chat", "load_preferences", "load_prompts", "local_files", "preference_records", "prompt_records",
           "prompt_text", "read_records", "subsample"]

Message = dict[str, str]
ROLES = {"system", "user", "assistant"}


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


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                   "chatgpt": "assistant", "system": "system"}


def _sharegpt(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise StageError(f"{where}: `conversations` must be a non-empty list of {{from, value}} turns.")
    out = []
    for t in value:
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise StageError(f"{where}: every turn in `conversations` needs `from` and `value` keys, got {t!r}.")
        role = _SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise StageError(f"{where}: unknown speaker {t['from']!r} in `conversations`; use human, gpt or system.")
        out.append({"role": role, "content": str(t["value"])})
    return out


_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def is_transcript(value: Any) -> bool:
    return isinstance(value, str) and bool(re.match(r"\s*Human:", value)) and "\n\nAssistant:" in value


def parse_transcript(text: str, where: str, column: str) -> list[Message]:
    """'\\n\\nHuman: q\\n\\nAssistant: a ...' -> messages. A trailing empty 'Assistant:' (a prompt awaiting its answer)
    is left out."""
    text = text.lstrip()
    parts = _TURN.split(text)
    if parts[0].strip():
        raise StageError(f"{where}: `{column}` does not start with 'Human:'; not a Human/Assistant transcript.")
    out = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        out.append({"role": role, "content": content.strip()})
    if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
        out.pop()
    if not out:
        raise StageError(f"{where}: `{column}` holds no Human/Assistant turns.")
    return out


def _alpaca(row: dict, where: str) -> tuple[list[Message], str | None]:
    instruction = row["instruction"]
    extra = row.get("input")
    if not isinstance(instruction, str) or not instruction.strip():
        raise StageError(f"{where}: `instruction` must be a non-empty string.")
    text = instruction if not extra else f"{instruction}\n\n{extra}"
    prompt = ([{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row["system"]
              else [])
    return prompt + [{"role": "user", "content": text}], row.get("output")


# Which columns make each shape, in the order `auto` tries them (the first whose columns a row has wins).
CHAT_SHAPES = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
               "alpaca": ("instruction", "output"), "transcript": ("text",)}
PROMPT_SHAPES = {"prompt": ("prompt",), "messages": ("messages",), "sharegpt": ("conversations",),
                 "alpaca": ("instruction",), "transcript": ("text",)}


def _rename(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for shape_name, actual in columns.items():
        if actual in row:
            out[shape_name] = row[actual]
    return out


def _shape(row: dict[str, Any], shapes: dict[str, tuple[str, ...]], fmt: str, where: str, what: str,
           columns: dict[str, str]) -> str:
    """The shape of one row: the configured one (its columns must be there) or the first whose columns it has."""
    if fmt != "auto":
        need = shapes.get(fmt)
        if need is None:
            raise StageError(f"{where}: format {fmt!r} is not a shape of {what} data; use one of "
                             f"{', '.join(shapes)} (or auto).")
        missing = [c for c in need if c not in row]
        if missing:
            mapped = [columns.get(c, c) for c in missing]
            raise StageError(f"{where}: format {fmt!r} needs column(s) {mapped}, the row has {sorted(row)}; map them "
                             "with `columns`, e.g. {columns: {" + f"{missing[0]}: <your column>" + "}}.")
        return fmt
    for name, need in shapes.items():
        if all(c in row for c in need) and (name != "transcript" or is_transcript(row["text"])):
            return name
    known = "; ".join(f"{n} ({' + '.join(c)})" for n, c in shapes.items())
    raise StageError(f"{where}: a row with columns {sorted(row)} is no {what} shape this loader knows: {known}. Set "
                     "the dataset's `format` and map its columns with `columns`, e.g. {path: ..., format: alpaca, "
                     "columns: {instruction: question, output: answer}}.")


def _check_nonempty(rows: list, source: Any, what: str) -> None:
    if not rows:
        raise StageError(f"{what} dataset {source} is empty; it needs at least one row.")


def chat_records(rows: list[dict[str, Any]], source: Any, fmt: str = "auto",
                 columns: dict[str, str] | None = None) -> list[dict[str, list[Message]]]:
    """Rows of any chat shape as {"messages": [...]} ending in an assistant turn."""
    _check_nonempty(rows, source, "SFT")
    columns = columns or {}
    out = []
    for i, raw in enumerate(rows):
        where = f"{source} row {i}"
        row = _rename(raw, columns)
        shape = _shape(row, CHAT_SHAPES, fmt, where, "chat (SFT)", columns)
        if shape == "messages":
            msgs = _as_messages(row["messages"], "user", where, "messages")
        elif shape == "sharegpt":
            msgs = _sharegpt(row["conversations"], where)
        elif shape == "prompt_completion":
            msgs = _as_messages(row["prompt"], "user", where, "prompt") + _as_messages(
                row["completion"], "assistant", where, "completion")
        elif shape == "alpaca":
            prompt, output = _alpaca(row, where)
            if not isinstance(output, str):
                raise StageError(f"{where}: `output` must be a string.")
            msgs = prompt + [{"role": "assistant", "content": output}]
        else:
            msgs = parse_transcript(_string(row["text"], where, "text"), where, "text")
        while msgs and msgs[-1]["role"] != "assistant":  # a trailing unanswered turn teaches nothing
            msgs = msgs[:-1]
        if not msgs:
            raise StageError(f"{where}: no assistant message, so there is nothing to learn from it.")
        out.append({"messages": msgs})
    return out


def _string(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise StageError(f"{where}: `{column}` must be a string here, got {type(value).__name__}.")
    return value


def _conversation(value: Any, where: str, column: str) -> list[Message]:
    """A whole conversation given as messages, ShareGPT turns or a transcript string."""
    if is_transcript(value):
        return parse_transcript(value, where, column)
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return _sharegpt(value, where)
    return _as_messages(value, "assistant", where, column)


def _split_shared_prefix(chosen: list[Message], rejected: list[Message], where: str) -> tuple[list[Message], ...]:
    """(prompt, chosen, rejected) of two conversations that share a beginning: the prompt is the shared messages up
    to the first that differ, and it must end with a user turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) and n == len(rejected):
        raise StageError(f"{where}: `chosen` and `rejected` are identical; the pair teaches nothing.")
    if n == 0 or chosen[n - 1]["role"] != "user":
        raise StageError(f"{where}: `chosen` and `rejected` must share a prompt that ends with a user turn (TRL's "
                         "implicit-prompt pairs); give an explicit `prompt` column otherwise.")
    return chosen[:n], chosen[n:], rejected[n:]


def preference_records(rows: list[dict[str, Any]], source: Any, fmt: str = "auto",
                       columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Preference rows (explicit prompt, implicit shared prefix, transcripts) as {"prompt", "chosen", "rejected"}."""
    _check_nonempty(rows, source, "preference")
    columns = columns or {}
    if fmt not in ("auto", "preference", "transcript"):
        raise StageError(f"preference dataset {source}: format {fmt!r} is not a preference shape; use preference "
                         "(explicit `prompt` or a prompt shared by `chosen` and `rejected`), transcript or auto.")
    out = []
    for i, raw in enumerate(rows):
        where = f"{source} row {i}"
        row = _rename(raw, columns)
        missing = [c for c in ("chosen", "rejected") if c not in row]
        if missing:
            raise StageError(
                f"preference dataset {source} row {i} lacks column(s) {[columns.get(c, c) for c in missing]} (has "
                f"{sorted(raw)}); it needs `chosen` and `rejected` (whole conversations or transcripts sharing their "
                "prompt), plus `prompt` when the answers do not repeat it. Map other names with `columns`.")
        shape = "preference" if "prompt" in row else "implicit"
        chosen = _conversation(row["chosen"], where, "chosen")
        rejected = _conversation(row["rejected"], where, "rejected")
        if shape == "preference":
            prompt = _as_messages(row["prompt"], "user", where, "prompt")
            # some datasets repeat the prompt at the start of each answer's conversation
            if len(chosen) > len(prompt) and chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:
                chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
            if chosen == rejected:
                raise StageError(f"{where}: `chosen` and `rejected` are identical; the pair teaches nothing.")
        else:
            prompt, chosen, rejected = _split_shared_prefix(chosen, rejected, where)
        if not chosen or not rejected:
            raise StageError(f"{where}: `chosen` or `rejected` has no answer after the prompt.")
        pair: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if row.get("kind") is not None:  # what the pair tests; the reward stage reports accuracy per kind
            pair["kind"] = str(row["kind"])
        out.append(pair)
    return out


def _prompt_only(msgs: list[Message]) -> list[Message]:
    """The conversation up to its last user turn (the answer after it is what the policy writes)."""
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    return msgs[: last_user + 1]


def prompt_records(rows: list[dict[str, Any]], source: Any, fmt: str = "auto",
                   columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Prompt rows of any shape (plus optional `answer`, `kind`) as {"prompt": [messages], "answer", "kind"}."""
    _check_nonempty(rows, source, "prompt")
    columns = columns or {}
    out = []
    for i, raw in enumerate(rows):
        where = f"{source} row {i}"
        row = _rename(raw, columns)
        if fmt == "auto" and "chosen" in row and "rejected" in row and "prompt" not in row:
            # preference pairs as RL prompts: the shared prefix
            prompt = preference_records([row], source)[0]["prompt"]
        else:
            shape = _shape(row, PROMPT_SHAPES, fmt, where, "prompt", columns)
            if shape == "prompt":
                value = row["prompt"]
                prompt = (parse_transcript(value, where, "prompt") if is_transcript(value)
                          else _as_messages(value, "user", where, "prompt"))
            elif shape == "messages":
                prompt = _prompt_only(_as_messages(row["messages"], "user", where, "messages"))
            elif shape == "sharegpt":
                prompt = _prompt_only(_sharegpt(row["conversations"], where))
            elif shape == "alpaca":
                prompt = _alpaca(row, where)[0]
            else:
                prompt = _prompt_only(parse_transcript(_string(row["text"], where, "text"), where, "text"))
        if not prompt or prompt[-1]["role"] == "assistant":
            raise StageError(f"{where}: the prompt ends with an assistant turn or is empty; the model must answer last.")
        answer = row.get("answer")
        out.append({"prompt": prompt, "answer": None if answer is None else str(answer), "kind": row.get("kind")})
    return out


def load_chat(source: DatasetRef | str | Path) -> list[dict[str, list[Message]]]:
    ref = as_ref(source)
    return chat_records(read_records(ref), ref.path, ref.format, ref.columns)


def load_preferences(source: DatasetRef | str | Path) -> list[dict[str, Any]]:
    ref = as_ref(source)
    return preference_records(read_records(ref), ref.path, ref.format, ref.columns)


def load_prompts(source: DatasetRef | str | Path) -> list[dict[str, Any]]:
    ref = as_ref(source)
    return prompt_records(read_records(ref), ref.path, ref.format, ref.columns)


LOADERS: dict[str, Callable[[DatasetRef | str | Path], list[dict[str, Any]]]] = {
    "chat": load_chat, "preference": load_preferences, "prompt": load_prompts}
NORMALISERS = {"chat": chat_records, "preference": preference_records, "prompt": prompt_records}


def prompt_text(prompt: list[Message]) -> str:
    """The last user message: what a sample table shows as the prompt."""
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])


def subsample(rows: Iterable[Any], limit: int | None) -> list[Any]:
    rows = list(rows)
    return rows if limit is None else rows[:limit]
