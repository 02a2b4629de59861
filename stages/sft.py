"""SFT stage: supervised fine-tuning of the base model on chat data with TRL's SFTTrainer, full or LoRA.

inputs:  model (transformers-native dir with tokenizer + chat template), tasks (built-in task folder; optional when
         `dataset` is set, but then no exact-match evaluation is possible)
outputs: hf (instruction-tuned model folder with tokenizer; LoRA weights merged in), heldout (chat.jsonl: the held-out
         conversations, which the evaluate stage scores the base, SFT and aligned models on)
metrics: eval/exact_match (held-out prompts, greedy), eval/exact_match_before (the input model), eval/loss
         (held-out chat loss on assistant tokens), train/* per logging step.

Loss is on assistant tokens only: the tokenizer's chat template marks them with {% generation %}.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stages.common import (
    NullTracker,
    StageError,
    StageResult,
    Tracker,
    atomic_dir,
    require_path,
    stage_device,
)
from stages.data import task_data, truncation
from stages.data.chat_data import DatasetRef
from stages.posttrain import hf_training as hft
from stages.posttrain.model_card import settings_of, source_of, write_model_card

log = logging.getLogger(__name__)
HELDOUT = "heldout"  # output: the held-out conversations, after the truncation policy


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
class Config(hft.ScheduleSettings, hft.DeviceSettings, hft.HeldoutEvalSettings, hft.DataSettings):
    """Supervised fine-tuning on chat data (assistant tokens only), full or LoRA."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetRef | None = Field(None, description="Training chat data: a file, glob, folder or Hugging Face "
                                       "dataset in any chat shape (messages, prompt + completion, Alpaca, ShareGPT, "
                                       "Human/Assistant transcripts). Empty = the built-in world's sft.jsonl.")
    eval_dataset: DatasetRef | None = Field(
        None, description="Held-out chat data for eval/loss (same formats). Empty = the built-in sft_eval.jsonl "
        "with the built-in data, else 10% of `dataset` chosen by hash and never trained on."
    )
    method: Literal["full", "lora"] = Field("full", description="'full' fine-tunes every weight; 'lora' trains "
                                            "low-rank adapters (merged into the output).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (used when method is lora).")
    # On the built-in task the step count matters more than the rate; these keep the CPU demo short (docs/FINDINGS.md,
    # "SFT and reward model length").
    epochs: float = Field(6.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(32, ge=1, description="Sequences per device per step.")
    max_length: int | None = Field(
        None, ge=8, description="Longest example in tokens (longer ones are cut from the left of the prompt, the "
        "final answer kept whole: stages.data.truncation); the pack length with packing; empty = the model's context."
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


def _fit(cfg: Config, tok: Any, train: list[dict], held: list[dict],
         max_length: int) -> tuple[list[dict], list[dict], dict[str, float]]:
    """The training and held-out examples under the truncation policy, and its counts as metrics."""
    fit, held_fit = truncation.fit_chat(tok, train, max_length), truncation.fit_chat(tok, held, max_length)
    truncation.report("sft", "chat examples", fit + held_fit, len(train) + len(held), cfg.data_warn_share)
    if not fit.kept:
        raise StageError(f"no SFT example fits sft.max_length / the model's context of {max_length} tokens, even with "
                         "its prompt cut; shorten the answers or raise the context.")
    return fit.kept, held_fit.kept, (fit + held_fit).metrics()


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    from transformers import AutoModelForCausalLM

    from stages.posttrain.scoring import exact_match, load_tokenizer

    model_dir = require_path(inputs.get("model", ""), "input `model` (the pretrained model's hf folder)")
    tasks_dir = hft.optional_tasks(inputs)
    out_dir = Path(out_dir)

    # validate the data before any model work
    data = task_data.load("sft", cfg.dataset, cfg.eval_dataset, tasks_dir)
    train_rows, eval_rows = data.train, data.eval
    # the built-in world's exact match and refusals say something only about a model trained on its data
    heldout = task_data.builtin_heldout(tasks_dir, cfg.eval_limit) if data.builtin else []

    key = hft.job_key(cfg, {"model": model_dir, "tasks": tasks_dir if data.builtin else None}, data.sources)

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
    max_length = cfg.max_length or ctx or 1024
    train_rows, eval_rows, fit_metrics = _fit(cfg, tok, train_rows, eval_rows, max_length)

    gen_kw = {"batch_size": cfg.eval_batch_size, "max_new_tokens": cfg.max_new_tokens}
    before_metrics, before_rows = exact_match(model, tok, heldout, **gen_kw) if heldout else ({}, [])

    work = out_dir / ".trainer"
    resumed_step, resume = hft.resume_point(work, key) or (0, None)
    trainer = build_trainer(cfg, model, tok, train_rows, eval_rows, work, max_length, prec, tracker)
    if resume is not None:
        log.info("sft: resuming from %s", resume)
    train_out = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    metrics: dict[str, float] = {"train/loss_final": float(train_out.training_loss),
                                 "train/resumed_from_step": float(resumed_step), **fit_metrics}
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
    write_model_card(hf, "sft", "the pretrain stage's base model", source_of(data.train_source), metrics,
                     settings_of(cfg, ("method", "epochs", "learning_rate", "seed")))
    with atomic_dir(out_dir / HELDOUT) as tmp:  # what the evaluate stage scores the three models' answers on
        (tmp / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in eval_rows),
                                        encoding="utf-8")
    return StageResult(outputs={"hf": hf, HELDOUT: out_dir / HELDOUT}, metrics=metrics, samples=samples)
