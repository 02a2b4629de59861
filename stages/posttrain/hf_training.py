"""What the SFT, reward and PPO stages share around the Hugging Face / TRL trainers: device and precision settings,
the common TrainingArguments, forwarding trainer logs to the stage tracker, reusing a finished run, resuming an
interrupted one from its Trainer checkpoints, and saving the result as a transformers-native folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from llm.tokenizer import TOKENIZER_FILES
from stages.common import StageError, Tracker, atomic_dir, fingerprint, require_path, stage_device

HF = "hf"  # every trainer stage's one output: a transformers-native model folder


# ----------------------------------------------------------------------------------------------- shared settings
class DeviceSettings(BaseModel):
    """Where a trainer stage runs and at which precision."""

    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu' or 'cuda[:N]'.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto' = bf16 mixed precision on CUDA GPUs that support it, fp32 on CPU."
    )


class ScheduleSettings(BaseModel):
    """The optimizer schedule settings whose defaults suit every trainer stage."""

    max_steps: int = Field(-1, description="Optimizer steps to run; > 0 overrides epochs.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name: cosine, linear, constant, ...")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Fraction of steps spent warming up the lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")


class DataSettings(BaseModel):
    """How the stage reports examples its truncation policy (stages.data.truncation) cut or dropped."""

    data_warn_share: float = Field(0.05, ge=0, le=1, description="Warn when more than this share of the examples "
                                   "had to be cut or dropped to fit the context (counted as data/truncated and "
                                   "data/dropped either way).")


class HeldoutEvalSettings(BaseModel):
    """Greedy answers to the held-out prompts, scored before and after training."""

    eval_limit: int | None = Field(None, ge=1, description="Evaluate on at most this many held-out prompts.")
    eval_batch_size: int = Field(64, ge=1, description="Prompts per batch during evaluation.")
    max_new_tokens: int = Field(24, ge=1, description="Longest answer generated during evaluation.")
    n_samples: int = Field(8, ge=0, description="Rows in the before/after sample table.")


# ------------------------------------------------------------------------------------------- trainer arguments
def precision_args(device: str | torch.device, precision: str, setting: str = "device") -> dict[str, Any]:
    """TrainingArguments keys for the device: TRL defaults to bf16=True, which a CPU run must switch off."""
    dev = device if isinstance(device, torch.device) else stage_device(device, setting)
    on_cuda = dev.type == "cuda"
    if precision == "bf16" and not on_cuda:
        raise StageError("precision: bf16 needs a CUDA device here; set precision: auto or fp32.")
    bf16 = on_cuda and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    args: dict[str, Any] = {"bf16": bf16, "fp16": False, "use_cpu": not on_cuda}
    if on_cuda:
        args["tf32"] = True
    return args


def common_training_args(work_dir: Path, seed: int, logging_steps: int) -> dict[str, Any]:
    return {
        "output_dir": str(work_dir),
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": logging_steps,
        "seed": seed,
        "data_seed": seed,
        "activation_checkpointing": False,  # small models: recompute costs more than the memory it saves
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "remove_unused_columns": True,
    }


def checkpoint_args(every: int) -> dict[str, Any]:
    """TrainingArguments keys for periodic resumable checkpoints (model, optimizer, scheduler, RNG, data position)."""
    if every <= 0:
        return {}
    return {"save_strategy": "steps", "save_steps": every, "save_total_limit": 2, "save_only_model": False}


def tracker_callback(tracker: Tracker, prefix: str = "train/") -> Any:
    """A transformers TrainerCallback that forwards every `on_log` record to the stage tracker."""
    from transformers import TrainerCallback

    class _TrackerCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
            if not logs:
                return
            metrics = {
                (f"eval/{k[5:]}" if k.startswith("eval_") else f"{prefix}{k}"): float(v)
                for k, v in logs.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            if metrics:
                tracker.log_metrics(metrics, step=int(state.global_step))

    return _TrackerCallback()


def fit(trainer_cls: Any, tracker: Tracker, **kwargs: Any) -> int:
    """Build a trainer that reports to `tracker`, train it, and return its optimizer step count."""
    trainer = trainer_cls(callbacks=[tracker_callback(tracker)], **kwargs)
    trainer.train()
    return int(trainer.state.global_step)


# ------------------------------------------------------------------------------------------------------ inputs
def optional_tasks(inputs: dict[str, Path]) -> Path | None:
    """The built-in task folder when the flow passes one (configured datasets make it optional)."""
    tasks = inputs.get("tasks")
    return require_path(tasks, "input `tasks`") if tasks is not None else None


def context_length(model: Any) -> int | None:
    """The longest sequence a transformers model (or its config) takes (GPT-2 calls it n_positions), or None."""
    config = getattr(model, "config", model)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def folder_context(model_dir: Path) -> int | None:
    """The context of the transformers model saved in `model_dir`, read from its config alone."""
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(str(model_dir)))


def check_assistant_mask(tokenizer: Any, messages: list[dict[str, str]], where: str) -> None:
    """Fail before training when the chat template cannot mark assistant tokens (assistant-only loss needs it)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    if 1 not in out.get("assistant_masks", []):
        raise StageError(
            f"the chat template of the tokenizer in {where} marks no assistant tokens (it needs "
            "{% generation %}...{% endgeneration %} around assistant content); rebuild the tokenizer with the "
            "tokenizer stage, or set assistant_only_loss: false."
        )


# ----------------------------------------------------------------------------------------------- resuming work
def job_key(cfg: BaseModel, inputs: dict[str, Path | None], sources: list[Any]) -> str:
    """What decides a trainer stage's output: its config, its input artifacts' content and its data sources
    (local files, globs and folders by content, hub dataset names as written). Checkpoints stamped with another key
    are not resumed (`resume_point`)."""
    from stages.data.chat_data import local_files

    local: dict[str, Path | None] = {}
    named: list[str] = []
    for i, s in enumerate(sources):
        files = local_files(str(s)) if s is not None else None
        if files:
            local.update({f"source{i}.{j}": f for j, f in enumerate(files)})
        elif s is not None and Path(str(s)).is_dir():
            local[f"source{i}"] = Path(str(s))
        else:
            named.append(str(s))
    return fingerprint(cfg, inputs={**inputs, **local}, extra={"datasets": named})


def resume_point(work: Path, key: str) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete Trainer checkpoint an interrupted run with the same key left in `work`.

    The Trainer writes `trainer_state.json` last, so a checkpoint without a readable one was cut off mid-write: it
    is removed. A work folder from a run with another key is discarded whole. Resuming loads optimizer/scheduler/RNG
    files with torch.load(weights_only=True) (transformers does so).
    """
    stamp = work / "fingerprint"
    if work.exists() and (not stamp.is_file() or stamp.read_text().strip() != key):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    complete = []
    for ck in work.glob("checkpoint-*"):
        try:
            step = int(ck.name.split("-", 1)[1])
            json.loads((ck / "trainer_state.json").read_text())
        except (ValueError, OSError):
            shutil.rmtree(ck, ignore_errors=True)
            continue
        complete.append((step, ck))
    return max(complete) if complete else None


# ------------------------------------------------------------------------------------------------------ output
def merge_lora(model: Any) -> Any:
    """Fold LoRA adapters into the base weights and return the plain transformers model."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_hf(model: Any, tokenizer: Any, dest: Path, tokenizer_src: Path | None = None) -> None:
    """Model + tokenizer (with its chat template) as a transformers-native folder, swapped in atomically.

    Training never changes the tokenizer, so its files are copied from `tokenizer_src` byte for byte: the folder
    keeps the tokenizer stage's layout (chat template inside tokenizer_config.json, left padding).
    """
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_src is not None and (tokenizer_src / "tokenizer.json").exists():
            for name in TOKENIZER_FILES:
                if (tokenizer_src / name).exists():
                    shutil.copy2(tokenizer_src / name, tmp / name)
        else:
            tokenizer.padding_side = "left"  # generation, the output's main use, wants left padding
            tokenizer.save_pretrained(str(tmp))


def save_trained(model: Any, tokenizer: Any, out_dir: Path, tokenizer_src: Path) -> Path:
    """Save the trained model as the stage's `hf` output and drop the trainer's work folder (checkpoints)."""
    model.eval()
    save_hf(model, tokenizer, out_dir / HF, tokenizer_src)
    shutil.rmtree(out_dir / ".trainer", ignore_errors=True)
    return out_dir / HF
