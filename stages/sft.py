"""SFT stage: supervised fine-tuning of the base model on chat data with TRL's SFTTrainer, full or LoRA.

inputs:  model (transformers-native dir with tokenizer + chat template), tasks (built-in task folder; optional when
         `dataset` is set, but then no exact-match evaluation is possible)
outputs: hf (instruction-tuned model folder with tokenizer; LoRA weights merged in)
metrics: eval/exact_match (held-out prompts, greedy), eval/exact_match_before (the input model), eval/loss
         (held-out chat loss on assistant tokens), train/* per logging step.

Loss is on assistant tokens only: the tokenizer's chat template marks them with {% generation %}.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stages import hf_training as hft
from stages import reuse
from stages.chat_data import load_chat, resolve_eval_source, resolve_source
from stages.common import NullTracker, StageError, StageResult, Tracker, require_path, stage_device
from stages.model_card import settings_of, source_of, write_model_card

log = logging.getLogger(__name__)


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1, description="LoRA rank (size of the low-rank update).")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' for every linear layer but the head.",
    )


# ------------------------------------------------------------------------------------------------------ config
class Config(hft.ScheduleSettings, hft.DeviceSettings, hft.HeldoutEvalSettings):
    """Supervised fine-tuning on chat data (assistant tokens only), full or LoRA."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field(None, description="Training chat data: a .jsonl/.parquet file or folder with "
                                "`messages` or `prompt`+`completion` columns, a saved dataset folder, or a Hugging "
                                "Face dataset name ('name' or 'name:split'). Empty = the built-in sft.jsonl from "
                                "the tasks input.")
    eval_dataset: str | None = Field(
        None, description="Held-out chat data for eval/loss (same formats). Empty = the built-in sft_eval.jsonl."
    )
    method: Literal["full", "lora"] = Field("full", description="'full' fine-tunes every weight; 'lora' trains "
                                            "low-rank adapters (merged into the output).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (used when method is lora).")
    # On the built-in task the step count matters more than the rate; 6 epochs at 1e-3 come close to the best held-out
    # exact match while keeping the CPU demo short.
    epochs: float = Field(6.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(32, ge=1, description="Sequences per device per step.")
    max_length: int | None = Field(
        None, ge=8, description="Truncate (or pack) sequences to this many tokens; empty = the model's context."
    )
    packing: bool = Field(False, description="Pack several short conversations into each sequence (faster on GPU).")
    assistant_only_loss: bool = Field(True, description="Train on assistant tokens only (needs {% generation %} "
                                      "markers in the chat template).")
    seed: int = Field(0, description="Random seed (data order, LoRA init).")
    logging_steps: int = Field(5, ge=1, description="Log training metrics every N steps.")
    checkpoint_steps: int = Field(
        50, ge=0, description="Save a resumable Trainer checkpoint every N optimizer steps (0 = off); rerunning the "
        "stage after a crash resumes from the newest complete one (the two newest are kept).",
    )


# ------------------------------------------------------------------------------------------------------- stage
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
        **{**hft.common_training_args(work, cfg.seed, cfg.logging_steps), **hft.checkpoint_args(cfg.checkpoint_steps)},
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
        callbacks=[hft.tracker_callback(tracker)],
    )


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    from transformers import AutoModelForCausalLM

    from stages.evaluate import exact_match, load_tokenizer, optional_heldout

    model_dir = require_path(inputs.get("model", ""), "input `model` (the pretrained model's hf folder)")
    tasks_dir = hft.optional_tasks(inputs)
    out_dir = Path(out_dir)

    # validate the data before any model work
    train_src = resolve_source(cfg.dataset, tasks_dir, "sft.jsonl", "sft.dataset")
    train_rows = load_chat(train_src)
    eval_src = resolve_eval_source(cfg.eval_dataset, tasks_dir, "sft_eval.jsonl")
    eval_rows = load_chat(eval_src) if eval_src is not None else None
    heldout = optional_heldout(tasks_dir, cfg.eval_limit)

    key = hft.work_key(cfg, {"model": model_dir, "tasks": tasks_dir}, [train_src, eval_src])
    if (done := hft.finished(out_dir, key)) is not None:
        return done

    tok = load_tokenizer(model_dir, padding_side="right")
    if cfg.assistant_only_loss:
        hft.check_assistant_mask(tok, train_rows[0]["messages"], str(model_dir))
    device = stage_device(cfg.device, "sft.device")
    prec = hft.precision_args(device, cfg.precision)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ctx = hft.context_length(model)
    if cfg.max_length is not None and ctx is not None and cfg.max_length > ctx:
        raise StageError(f"sft.max_length={cfg.max_length} exceeds the model's context of {ctx} tokens; lower it.")
    model.to(device)

    gen_kw = {"batch_size": cfg.eval_batch_size, "max_new_tokens": cfg.max_new_tokens}
    before_metrics, before_rows = exact_match(model, tok, heldout, **gen_kw) if heldout else ({}, [])

    work = out_dir / ".trainer"
    resumed_step, resume = hft.resume_point(work, key) or (0, None)
    trainer = build_trainer(cfg, model, tok, train_rows, eval_rows, work, cfg.max_length or ctx or 1024, prec, tracker)
    if resume is not None:
        log.info("sft: resuming from %s", resume)
    train_out = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    metrics: dict[str, float] = {"train/loss_final": float(train_out.training_loss),
                                 "train/resumed_from_step": float(resumed_step)}
    if eval_rows:
        metrics["eval/loss"] = float(trainer.evaluate()["eval_loss"])

    model = hft.merge_lora(trainer.model)
    hf = hft.save_trained(model, tok, out_dir, model_dir)

    samples: list[dict[str, Any]] = []
    if heldout:
        after_metrics, after_rows = exact_match(model, tok, heldout, **gen_kw)
        metrics.update(after_metrics)
        metrics["eval/exact_match_before"] = before_metrics["eval/exact_match"]
        samples = sample_table(before_rows, after_rows, cfg.n_samples)
    tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=trainer.state.global_step)
    write_model_card(hf, "sft", "the pretrain stage's base model", source_of(cfg.dataset, "the built-in chat data "
                     "(tasks/sft.jsonl)"), metrics, settings_of(cfg, ("method", "epochs", "learning_rate", "seed")))
    result = StageResult(outputs={"hf": hf}, metrics=metrics, samples=samples)
    reuse.mark_finished(out_dir, key, result)
    return result
