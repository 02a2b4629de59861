"""Checks of every external input a pipeline config names, made before any stage runs, so a run fails in seconds
with every problem listed instead of after hours of pretraining with the first one.

Before anything runs (`check_ingest`, `check_task_data`, `check_evaluate`): every corpus source and dataset exists,
is readable and holds a recognised shape, datasets have enough examples, and no held-out file is its training file.
Local datasets are read whole (they are read again by the stage; post-training sets are small next to a corpus);
corpus files by their first record; Hugging Face datasets by a streamed sample, never a download.

Once the tokenizer exists (`check_fit`): each dataset rendered through the chat template against the model's
context under the truncation policy (stages.data.truncation); a stage left with too little data to train is an error.
Each function returns the problems as lines naming the setting, the file and the fix; the caller reports them all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stages.common import StageError
from stages.data.chat_data import NORMALISERS, DatasetRef, hub_name_split, local_files, read_records
from stages.data.compression import CorruptArchive, open_binary
from stages.data.dataset_files import hub_mode, hub_reachable
from stages.data.task_data import ROLES, hash_split

HUB_SAMPLE = 32  # rows streamed from a hub dataset to check its shape


# ----------------------------------------------------------------------------------------------------- ingest
def _first_record(path: Path, fmt: str, text_field: str) -> str | None:
    """A problem with the first record of a corpus file, or None."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except Exception as e:
            return f"{path} could not be read as Parquet ({e})"
        return None if text_field in names else (f"{path}: Parquet file has no column {text_field!r} (columns: "
                                                 f"{names}); set text_field in the source to the column holding "
                                                 "the text")
    try:
        with open_binary(path) as f:
            line = b""
            for line in f:
                if line.strip():
                    break
    except CorruptArchive as e:
        return f"{path}: the archive cannot be read ({e.error}); download or compress it again"
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e})"
    if fmt != "jsonl" or not line.strip():  # an empty file is harmless beside others; ingest fails an empty corpus
        return None
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{path}: the first record is not valid JSON ({e})"
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        fields = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        return (f"{path}: the first record has no string field {text_field!r} (fields: {fields}); set text_field in "
                "the source to the field holding the text")
    return None


def check_ingest(cfg: Any) -> list[str]:
    """The corpus sources of an ingest config (stages.ingest.Config)."""
    from stages.data.readers import FilesSource, HFSource, _file_format, expand_paths

    problems = []
    for i, src in enumerate(cfg.sources):
        where = f"ingest.sources[{i}]"
        if isinstance(src, FilesSource):
            try:
                files = expand_paths(src)
            except StageError as e:
                problems.append(f"{where}: {e}")
                continue
            for path in files:
                try:
                    fmt = _file_format(path, src.format)
                except StageError as e:
                    problems.append(f"{where}: {e}")
                    continue
                if (p := _first_record(path, fmt, src.text_field)) is not None:
                    problems.append(f"{where}: {p}")
        elif isinstance(src, HFSource):
            problems.extend(f"{where}: {p}" for p in _check_hf_source(src))
    return problems


def _check_hf_source(src: Any) -> list[str]:
    local = Path(src.name).expanduser()
    if src.name.startswith((".", "/", "~")) and not local.exists():
        return [f"{src.name} does not exist; check the path"]
    try:
        rows = read_records(DatasetRef(path=src.name if local.exists() else f"{src.name}:{src.split}"),
                            split=src.split, limit=1) if src.config_name is None else _hub_config_sample(src)
    except StageError as e:
        return [str(e)]
    if rows and src.text_field not in rows[0]:
        return [f"dataset {src.name} has no column {src.text_field!r} (columns: {sorted(rows[0])}); set text_field"]
    return [] if rows else [f"dataset {src.name} split {src.split!r} is empty"]


def _hub_config_sample(src: Any) -> list[dict]:
    try:
        import datasets

        with hub_mode():
            ds = datasets.load_dataset(src.name, src.config_name, split=src.split, streaming=True)
            return [dict(r) for _, r in zip(range(1), ds, strict=False)]
    except Exception as e:
        where = "" if hub_reachable() else " (the hub cannot be reached from this machine, nor is it cached)"
        raise StageError(f"could not read Hugging Face dataset {src.name!r} ({src.config_name}, split {src.split!r}): "
                         f"{e}{where}; check the name or work from a local copy") from e


# ----------------------------------------------------------------------------------------------- task data
def _is_hub(ref: DatasetRef) -> bool:
    return local_files(ref.path) is None and not Path(ref.path).expanduser().is_dir()


def _identity(ref: DatasetRef) -> Any:
    """What names a dataset's content: its files' hashes, or a hub dataset's name and split."""
    files = local_files(ref.path)
    if files is None:
        return ("dir", str(Path(ref.path).expanduser().resolve())) if not _is_hub(ref) else (
            "hub", *hub_name_split(ref.path, "train"))
    return ("files", tuple(sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)))


def _records(stage: str, field: str, ref: DatasetRef) -> tuple[list[dict] | None, str | None]:
    """(normalised records, problem): local data whole, a hub dataset by a streamed sample (records None)."""
    kind = ROLES[stage].kind
    try:
        hub = _is_hub(ref)
        rows = read_records(ref, limit=HUB_SAMPLE if hub else None)
        records = NORMALISERS[kind](rows, ref.path, ref.format, ref.columns)
    except StageError as e:
        return None, f"{stage}.{field}: {e}"
    return (None if hub else records), None


def check_task_data(stage: str, cfg: Any, builtin_tasks: bool) -> list[str]:
    """The datasets of the sft, reward or ppo section; `builtin_tasks`: the built-in task data is configured."""
    role = ROLES[stage]
    problems = []
    if not cfg.dataset and not builtin_tasks:
        problems.append(f"{stage}.dataset is empty and there is no built-in task data: set {stage}.dataset to your "
                        f"{role.what}, or add {{type: builtin, stories: false}} to ingest.sources for the built-in "
                        "world's")
    train = held = None
    if cfg.dataset:
        train, p = _records(stage, "dataset", cfg.dataset)
        problems += [p] if p else []
    if cfg.eval_dataset:
        held, p = _records(stage, "eval_dataset", cfg.eval_dataset)
        problems += [p] if p else []
        if cfg.dataset and not p and _identity(cfg.dataset) == _identity(cfg.eval_dataset):
            problems.append(f"{stage}.eval_dataset is the same data as {stage}.dataset ({cfg.eval_dataset}); held-out "
                            "examples must not be trained on: name other data, or leave eval_dataset empty to hold "
                            "out 10% of the training data")
    if train is not None:
        if not cfg.eval_dataset:
            if len(train) < 2:
                problems.append(f"{stage}.dataset {cfg.dataset} has {len(train)} {role.what}; with no "
                                f"{stage}.eval_dataset at least 2 are needed so some can be held out")
                return problems
            train, _ = hash_split(train)
        if stage == "ppo":
            kept = [r for r in train if r.get("kind") not in cfg.exclude_kinds]
            need = cfg.batch_size if cfg.algorithm == "ppo" else 1
            if len(kept) < need:
                problems.append(f"ppo.dataset {cfg.dataset} gives {len(kept)} training prompts (after holding out "
                                f"{'none' if cfg.eval_dataset else '10%'} and ppo.exclude_kinds), fewer than "
                                f"ppo.batch_size={cfg.batch_size}; add prompts or lower batch_size")
    return problems


def check_evaluate(cfg: Any, builtin_tasks: bool) -> list[str]:
    from stages.evaluate import LOCAL_TASKS

    problems = []
    if cfg.include_path:
        p = Path(cfg.include_path).expanduser()
        if not p.is_dir():
            problems.append(f"evaluate.include_path: {p} is not a folder of lm-eval task YAML files")
        elif not any(p.rglob("*.yaml")) and not any(p.rglob("*.yml")):
            problems.append(f"evaluate.include_path: {p} holds no .yaml task definitions")
    world = [t for t in (cfg.tasks or []) if t in LOCAL_TASKS]
    if world and not builtin_tasks:
        problems.append(f"evaluate.tasks names {', '.join(world)}, built from the built-in world's held-out "
                        "questions, but there is no built-in task data: drop them or add {type: builtin} to "
                        "ingest.sources")
    return problems


# ------------------------------------------------------------------------------------------ against the context
def check_fit(sections: dict[str, Any], tok: Any, ctx: int, tasks_dir: Path | None) -> tuple[list[str], dict]:
    """Each post-training dataset under the truncation policy for a model with `ctx` tokens of context and the
    pipeline's tokenizer: (problems, {stage: Fit}). A problem is a stage left with too little data or a chat
    template that cannot render the data."""
    from stages.data import task_data, truncation

    problems: list[str] = []
    fits: dict[str, Any] = {}
    for stage in ("sft", "reward", "ppo"):
        cfg = sections[stage]
        try:
            data = task_data.load(stage, cfg.dataset, cfg.eval_dataset, tasks_dir, getattr(cfg, "eval_limit", None))
            limit = min(getattr(cfg, "max_length", None) or ctx, ctx)
            if stage == "sft":
                fit, held = truncation.fit_chat(tok, data.train, limit), truncation.fit_chat(tok, data.eval, limit)
            elif stage == "reward":
                fit, held = truncation.fit_pairs(tok, data.train, limit), truncation.fit_pairs(tok, data.eval, limit)
            else:
                prompts = [p for p in data.train if p.get("kind") not in cfg.exclude_kinds]
                fit = truncation.fit_prompts(tok, prompts, ctx, cfg.response_length)
                held = truncation.fit_prompts(tok, data.eval, ctx, cfg.max_new_tokens)
                need = cfg.batch_size if cfg.algorithm == "ppo" else 1
                if len(fit.kept) < need:
                    problems.append(
                        f"ppo: {len(fit.kept)} of {len(prompts)} RL prompts of {data.train_source} leave room for "
                        f"ppo.response_length={cfg.response_length} tokens in the model's context of {ctx} tokens, "
                        f"fewer than ppo.batch_size={cfg.batch_size}; use shorter prompts, lower response_length, "
                        "or a longer context (pretrain.model_overrides.max_seq_len)")
        except StageError as e:
            problems.append(f"{stage}: {e}")
            continue
        except Exception as e:  # the chat template failing on a record: a Jinja error, named with its stage
            problems.append(f"{stage}: the tokenizer's chat template cannot render the data ({type(e).__name__}: {e})")
            continue
        if stage != "ppo" and not fit.kept:
            problems.append(f"{stage}: no training example of {data.train_source} fits the model's context of {limit} "
                            "tokens even with its prompt cut; shorten the answers or use a longer context")
        fits[stage] = fit + held
    return problems, fits
