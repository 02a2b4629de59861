"""SFT stage: supervised fine-tuning of the base model on chat data with TRL's SFTTrainer, full or LoRA.

inputs:  model (transformers-native dir with tokenizer + chat template), tasks (built-in task folder; optional when
         `dataset` is set, but then no exact-match evaluation is possible)
outputs: hf (instruction-tuned model folder with tokenizer; LoRA weights merged in)
metrics: eval/exact_match (held-out prompts, greedy), eval/exact_match_before (the input model), eval/loss
         (held-out chat loss on assistant tokens), train/* per logging step.

Loss is on assistant tokens only: the tokenizer's chat template marks them with {% generation %}.
This module also holds the trainer plumbing the reward and PPO stages share (precision, tracker callback, caching).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from stages.chat_data import load_chat, resolve_eval_source, resolve_source
from stages.common import (
    NullTracker,
    StageError,
    StageResult,
    Tracker,
    atomic_dir,
    require_path,
    sha256_file,
    sha256_tree,
    write_json,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- shared trainer plumbing
class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1, description="LoRA rank (size of the low-rank update).")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' for every linear layer but the head.",
    )


def precision_args(device: str, precision: str) -> dict[str, Any]:
    """TrainingArguments keys for the device: TRL defaults to bf16=True, which a CPU run must switch off."""
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    on_cuda = dev.startswith("cuda")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device is {device!r} but CUDA is not available; set device: auto or cpu.")
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


def fingerprint(cfg: BaseModel, inputs: dict[str, Any], sources: list[Any]) -> str:
    """What decides a stage's output: its config, its input artifacts' content and its data sources."""
    import hashlib

    h = hashlib.sha256(cfg.model_dump_json().encode())
    for name in sorted(k for k, v in inputs.items() if v is not None):
        h.update(f"{name}={sha256_tree(inputs[name])}".encode())
    for s in sources:
        p = Path(str(s))
        h.update((sha256_file(p) if p.is_file() else sha256_tree(p) if p.is_dir() else str(s)).encode())
    return h.hexdigest()


def cached_result(out_dir: Path, fp: str) -> StageResult | None:
    """The stored result of an identical earlier run, if its output folder is complete."""
    path = out_dir / "result.json"
    if not path.exists() or not (out_dir / "hf" / "config.json").exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if saved.get("fingerprint") != fp:
        return None
    return StageResult(outputs={"hf": out_dir / "hf"}, metrics=saved["metrics"], samples=saved["samples"])


def save_result(out_dir: Path, fp: str, result: StageResult) -> None:
    write_json(out_dir / "result.json", {"fingerprint": fp, "metrics": result.metrics, "samples": result.samples})


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


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


def check_assistant_mask(tokenizer: Any, messages: list[dict[str, str]], where: str) -> None:
    """Fail before training when the chat template cannot mark assistant tokens (assistant-only loss needs it)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    if 1 not in out.get("assistant_masks", []):
        raise StageError(
            f"the chat template of the tokenizer in {where} marks no assistant tokens (it needs "
            "{% generation %}...{% endgeneration %} around assistant content); rebuild the tokenizer with the "
            "tokenizer stage, or set assistant_only_loss: false."
        )


def checkpoint_args(every: int) -> dict[str, Any]:
    """TrainingArguments keys for periodic resumable checkpoints (model, optimizer, scheduler, RNG, data position)."""
    if every <= 0:
        return {}
    return {"save_strategy": "steps", "save_steps": every, "save_total_limit": 2, "save_only_model": False}


def resume_point(work: Path, fp: str) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete Trainer checkpoint an interrupted run of the same stage inputs left in
    `work`.

    The Trainer writes `trainer_state.json` last, so a checkpoint without a readable one was cut off mid-write: it
    is removed. A work folder from a run with other inputs or config (another fingerprint) is discarded whole.
    Resuming loads optimizer/scheduler/RNG files with torch.load(weights_only=True) (transformers does so).
    """
    stamp = work / "fingerprint"
    if work.exists() and (not stamp.is_file() or stamp.read_text().strip() != fp):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fp)
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


def merge_lora(model: Any) -> Any:
    """Fold LoRA adapters into the base weights and return the plain transformers model."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


# ------------------------------------------------------------------------------------------------------ config
class Config(BaseModel):
    """Supervised fine-tuning on chat data (assistant tokens only), full or LoRA."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field(
        None,
        description="Training chat data: a .jsonl/.parquet file or folder with `messages` or `prompt`+`completion` "
        "columns, a saved dataset folder, or a Hugging Face dataset name ('name' or 'name:split'). "
        "Empty = the built-in sft.jsonl from the tasks input.",
    )
    eval_dataset: str | None = Field(
        None, description="Held-out chat data for eval/loss (same formats). Empty = the built-in sft_eval.jsonl."
    )
    method: Literal["full", "lora"] = Field("full", description="'full' fine-tunes every weight; 'lora' trains "
                                            "low-rank adapters (merged into the output).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (used when method is lora).")
    # built-in task, tiny preset: 6 epochs at 1e-3 reach 0.55 held-out exact match (10 epochs: 0.57 in 1.7x the
    # time, and PPO after it kept exact match level, where after 6 it cost 0.05); fewer epochs at a higher lr
    # (4 at 2e-3 / 5e-3) fell to 0.1-0.25, so the step count is what matters here. 6 keeps the CPU demo short.
    epochs: float = Field(6.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps to run; > 0 overrides epochs.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name: cosine, linear, constant, ...")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Fraction of steps spent warming up the lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(32, ge=1, description="Sequences per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int | None = Field(
        None, ge=8, description="Truncate (or pack) sequences to this many tokens; empty = the model's context."
    )
    packing: bool = Field(False, description="Pack several short conversations into each sequence (faster on GPU).")
    assistant_only_loss: bool = Field(True, description="Train on assistant tokens only (needs {% generation %} "
                                      "markers in the chat template).")
    seed: int = Field(0, description="Random seed (data order, LoRA init).")
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu' or 'cuda[:N]'.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto' = bf16 mixed precision on CUDA GPUs that support it, fp32 on CPU."
    )
    logging_steps: int = Field(5, ge=1, description="Log training metrics every N steps.")
    eval_limit: int | None = Field(None, ge=1, description="Evaluate on at most this many held-out prompts.")
    eval_batch_size: int = Field(64, ge=1, description="Prompts per batch during evaluation.")
    max_new_tokens: int = Field(24, ge=1, description="Longest answer generated during evaluation.")
    n_samples: int = Field(8, ge=0, description="Rows in the before/after sample table.")
    checkpoint_steps: int = Field(
        50, ge=0, description="Save a resumable Trainer checkpoint every N optimizer steps (0 = off); rerunning the "
        "stage after a crash resumes from the newest complete one (the two newest are kept).",
    )


# ------------------------------------------------------------------------------------------------------- stage
def _context_length(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def sample_table(before: list[dict], after: list[dict], n: int) -> list[dict[str, Any]]:
    rows = []
    for b, a in list(zip(before, after, strict=False))[:n]:
        rows.append({"prompt": a["prompt"], "response_before": b["response"], "response_after": a["response"],
                     "expected": a["expected"], "correct_before": b["correct"], "correct": a["correct"]})
    return rows


def build_trainer(cfg: Config, model: Any, tok: Any, train_rows: list[dict], eval_rows: list[dict] | None,
                  work: Path, max_length: int, prec: dict[str, Any], tracker: Tracker = NullTracker()) -> Any:
    """TRL's SFTTrainer set up from the stage config (LoRA-wrapped when method is lora)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(cfg.seed)  # SFTTrainer draws the LoRA init before the Trainer seeds anything: runs must repeat
    peft_config = None
    if cfg.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    args = SFTConfig(
        **{**common_training_args(work, cfg.seed, cfg.logging_steps), **checkpoint_args(cfg.checkpoint_steps)},
        **prec,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=max_length,
        packing=cfg.packing,
        assistant_only_loss=cfg.assistant_only_loss,
        dataset_num_proc=None,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[tracker_callback(tracker)],
    )


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    from transformers import AutoModelForCausalLM

    from stages.evaluate import exact_match, load_heldout, load_tokenizer

    model_dir = require_path(inputs.get("model", ""), "input `model` (the pretrained model's hf folder)")
    tasks = inputs.get("tasks")
    tasks_dir = require_path(tasks, "input `tasks`") if tasks is not None else None
    out_dir = Path(out_dir)

    # validate the data before any model work
    train_src = resolve_source(cfg.dataset, tasks_dir, "sft.jsonl", "sft.dataset")
    train_rows = load_chat(train_src)
    eval_src = resolve_eval_source(cfg.eval_dataset, tasks_dir, "sft_eval.jsonl")
    eval_rows = load_chat(eval_src) if eval_src is not None else None
    heldout = load_heldout(tasks_dir, cfg.eval_limit) if tasks_dir and (tasks_dir / "heldout.jsonl").exists() else []

    fp = fingerprint(cfg, {"model": model_dir, "tasks": tasks_dir}, [train_src, eval_src])
    if (cached := cached_result(out_dir, fp)) is not None:
        return cached

    tok = load_tokenizer(model_dir, padding_side="right")
    if cfg.assistant_only_loss:
        check_assistant_mask(tok, train_rows[0]["messages"], str(model_dir))
    prec = precision_args(cfg.device, cfg.precision)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ctx = _context_length(model)
    if cfg.max_length is not None and ctx is not None and cfg.max_length > ctx:
        raise StageError(f"sft.max_length={cfg.max_length} exceeds the model's context of {ctx} tokens; lower it.")
    max_length = cfg.max_length or ctx or 1024
    if not prec["use_cpu"]:
        model.to("cuda" if cfg.device == "auto" else cfg.device)

    gen_kw = {"batch_size": cfg.eval_batch_size, "max_new_tokens": cfg.max_new_tokens}
    before_metrics, before_rows = exact_match(model, tok, heldout, **gen_kw) if heldout else ({}, [])

    work = out_dir / ".trainer"
    resumed_step, resume = resume_point(work, fp) or (0, None)
    trainer = build_trainer(cfg, model, tok, train_rows, eval_rows, work, max_length, prec, tracker)
    if resume is not None:
        log.info("sft: resuming from %s", resume)
    train_out = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    metrics: dict[str, float] = {"train/loss_final": float(train_out.training_loss),
                                 "train/resumed_from_step": float(resumed_step)}
    if eval_rows:
        ev = trainer.evaluate()
        metrics["eval/loss"] = float(ev["eval_loss"])

    model = merge_lora(trainer.model)
    model.eval()
    save_hf(model, tok, out_dir / "hf", model_dir)
    shutil.rmtree(work, ignore_errors=True)

    samples: list[dict[str, Any]] = []
    if heldout:
        after_metrics, after_rows = exact_match(model, tok, heldout, **gen_kw)
        metrics.update(after_metrics)
        metrics["eval/exact_match_before"] = before_metrics["eval/exact_match"]
        samples = sample_table(before_rows, after_rows, cfg.n_samples)
    tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=trainer.state.global_step)
    result = StageResult(outputs={"hf": out_dir / "hf"}, metrics=metrics, samples=samples)
    save_result(out_dir, fp, result)
    return result
