"""Reward stage: a scalar reward model trained on preference pairs with TRL's RewardTrainer.

inputs:  model (the SFT model's hf dir), tasks (built-in task folder; optional when `dataset` is set)
outputs: hf (AutoModelForSequenceClassification, num_labels=1, pad_token_id set, with tokenizer + chat template),
         judge (the same kind of model trained on part of the held-out pairs, when there are judge_min_pairs)
metrics: eval/pairwise_accuracy (held-out pairs scored chosen > rejected; eval/pairwise_accuracy/<kind> per pair
         kind when the pairs have a `kind`: harmful, benign_vs_refusal, benign_vs_wrong on the built-in data;
         eval/pairwise_accuracy/margin_q1..q4 by quartile of the score gap), eval/reward_margin (mean chosen -
         rejected), each with `_se`; eval/pairwise_accuracy_before (the fresh scalar head, for comparison);
         eval/judge/* (the judge on the held-out pairs it did not train on); data/truncated, data/dropped;
         train/* per logging step.

The model starts from the SFT weights with a new scalar head; it scores a whole conversation at its last token,
the same way the PPO stage scores the policy's answers.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from stages.common import NullTracker, StageError, StageResult, Tracker, require_path, stage_device
from stages.data import task_data, truncation
from stages.data.chat_data import DatasetRef, prompt_text
from stages.data.task_data import hash_split
from stages.posttrain import hf_training as hft
from stages.posttrain.heldout_metrics import mean_se
from stages.posttrain.model_card import settings_of, source_of, write_model_card

JUDGE = "judge"  # output: the second reward model, trained on held-out pairs only


class Config(hft.ScheduleSettings, hft.DeviceSettings, hft.DataSettings):
    """Reward modeling on (prompt, chosen, rejected) preference pairs."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetRef | None = Field(
        None,
        description="Training preference pairs: a file, glob, folder or Hugging Face dataset with `chosen` and "
        "`rejected` (and `prompt`, unless the two conversations share it; transcripts too). Empty = the built-in "
        "world's preferences.jsonl.",
    )
    eval_dataset: DatasetRef | None = Field(
        None,
        description="Held-out preference pairs (same formats). Empty = the built-in preferences_eval.jsonl with the "
        "built-in data, else 10% of `dataset` chosen by hash and never trained on.",
    )
    # 4 epochs at 4e-4 score well on the built-in task's held-out pairs; a much higher rate wipes out what the SFT
    # model knows.
    epochs: float = Field(4.0, gt=0, description="Passes over the training pairs (ignored when max_steps > 0).")
    learning_rate: float = Field(4e-4, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(32, ge=1, description="Preference pairs per device per step.")
    max_length: int | None = Field(
        None, ge=8, description="Longest prompt + answer in tokens (longer pairs have their prompt cut from the left, "
        "the answers kept whole; stages.data.truncation); empty = the model's context."
    )
    center_rewards_coefficient: float | None = Field(
        0.01, ge=0, description="Penalty pulling rewards toward zero mean (keeps PPO's reward scale sane); empty = off."
    )
    seed: int = Field(0, description="Random seed (scalar head init, data order).")
    logging_steps: int = Field(5, ge=1, description="Log training metrics every N steps.")
    eval_batch_size: int = Field(64, ge=1, description="Sequences per batch when scoring held-out pairs.")
    n_samples: int = Field(8, ge=0, description="Rows in the sample table of scored held-out pairs.")
    judge_min_pairs: int = Field(200, ge=0, description="With at least this many held-out pairs, a second reward "
                                 "model, the judge, is trained on part of them (pairs neither the reward model nor "
                                 "PPO sees), so the aligned policy's win rate has a judge it was not trained "
                                 "against; 0 = never.")
    judge_eval_share: float = Field(0.3, gt=0, lt=1, description="Share of the held-out pairs (by hash) kept to "
                                    "measure the judge (eval/judge/pairwise_accuracy); it trains on the rest.")


def pairwise_eval(model: Any, tok: Any, pairs: list[dict], batch_size: int) -> tuple[dict[str, float], list[dict]]:
    """Accuracy (chosen scored above rejected) and mean margin on preference pairs."""
    from stages.posttrain.scoring import reward_scores

    seqs = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    scores = reward_scores(model, tok, seqs, batch_size=batch_size)
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    by_kind: dict[str, list[bool]] = {}
    for p, w in zip(pairs, wins, strict=True):
        if p.get("kind"):
            by_kind.setdefault(p["kind"], []).append(w)
    accuracy, accuracy_se = mean_se([float(w) for w in wins])
    margin, margin_se = mean_se(margins)
    metrics = {
        **{f"eval/pairwise_accuracy/{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "eval/pairwise_accuracy": accuracy, "eval/pairwise_accuracy_se": accuracy_se,
        "eval/reward_margin": margin, "eval/reward_margin_se": margin_se,
        "eval/reward_chosen_mean": sum(chosen) / len(chosen),
        "eval/reward_rejected_mean": sum(rejected) / len(rejected),
        **_by_margin_quartile(wins, margins),
    }
    rows = [
        {"prompt": prompt_text(p["prompt"]), "kind": p.get("kind"), "chosen": p["chosen"][-1]["content"],
         "rejected": p["rejected"][-1]["content"], "score_chosen": c, "score_rejected": r, "correct": w}
        for p, c, r, w in zip(pairs, chosen, rejected, wins, strict=True)
    ]
    return metrics, rows


def _by_margin_quartile(wins: list[bool], margins: list[float]) -> dict[str, float]:
    """Accuracy in each quartile of the score gap |chosen - rejected| (q1 smallest): a reward model whose confident
    judgements are its right ones gets more accurate from q1 to q4."""
    if len(wins) < 8:
        return {}
    order = sorted(range(len(wins)), key=lambda i: abs(margins[i]))
    out = {}
    for q in range(4):
        part = order[q * len(order) // 4:(q + 1) * len(order) // 4]
        out[f"eval/pairwise_accuracy/margin_q{q + 1}"] = sum(wins[i] for i in part) / len(part)
    return out


def _train_judge(cfg: Config, model_dir: Path, tok: Any, held: list[dict], max_length: int, out_dir: Path,
                 prec: dict, device: Any) -> tuple[Path | None, dict[str, float]]:
    """The judge: a second reward model from the same SFT model, trained on part of the held-out pairs (which
    neither the reward model nor PPO sees) and measured on the rest; none with too few held-out pairs."""
    from transformers import AutoModelForSequenceClassification, set_seed

    if not cfg.judge_min_pairs or len(held) < cfg.judge_min_pairs:
        return None, {}
    t0 = time.monotonic()
    train, measure = hash_split(held, cfg.judge_eval_share)
    set_seed(cfg.seed + 1)
    judge = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    judge.config.pad_token_id = tok.pad_token_id
    judge.to(device)
    trainer, _ = _train(cfg, judge, tok, train, "the held-out pairs", max_length, out_dir / ".judge-trainer", prec,
                        NullTracker())
    hft.save_hf(trainer.model.eval(), tok, out_dir / JUDGE, model_dir)
    shutil.rmtree(out_dir / ".judge-trainer", ignore_errors=True)
    scores, _ = pairwise_eval(trainer.model, tok, measure, cfg.eval_batch_size)
    metrics = {f"eval/judge/{k.removeprefix('eval/')}": v for k, v in scores.items()
               if k.startswith(("eval/pairwise_accuracy", "eval/reward_margin"))}
    return out_dir / JUDGE, {**metrics, "eval/judge/train_pairs": float(len(train)),
                             "time/judge_s": time.monotonic() - t0}


def _train(cfg: Config, model: Any, tok: Any, pairs: list[dict], where: Any, max_length: int | None, work: Path,
           prec: dict, tracker: Tracker) -> tuple[Any, float]:
    """Train the scalar head and body on `pairs` (read from `where`); returns the trainer (its model, its step) and
    the final loss."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(
        **hft.common_training_args(work, cfg.seed, cfg.logging_steps), **prec,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_length=max_length, center_rewards_coefficient=cfg.center_rewards_coefficient, disable_dropout=True,
    )
    columns = ("prompt", "chosen", "rejected")  # `kind` is for the evaluation only
    data = Dataset.from_list([{c: p[c] for c in columns} for p in pairs])
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                            callbacks=[hft.tracker_callback(tracker)])
    if len(trainer.train_dataset) == 0:
        raise StageError(f"every pair in {where} is longer than max_length={args.max_length} tokens; raise it.")
    return trainer, float(trainer.train().training_loss)


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    from transformers import AutoModelForSequenceClassification, set_seed

    from stages.posttrain.scoring import load_tokenizer

    model_dir = require_path(inputs.get("model", ""), "input `model` (the SFT stage's hf folder)")
    tasks_dir = hft.optional_tasks(inputs)
    out_dir = Path(out_dir)
    data = task_data.load("reward", cfg.dataset, cfg.eval_dataset, tasks_dir)
    train_pairs, eval_pairs = data.train, data.eval

    tok = load_tokenizer(model_dir, padding_side="right")
    device = stage_device(cfg.device, "reward.device")
    prec = hft.precision_args(device, cfg.precision)
    set_seed(cfg.seed)  # the scalar head is freshly initialised
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    ctx = hft.context_length(model)
    if cfg.max_length is not None and ctx is not None and cfg.max_length > ctx:
        raise StageError(f"reward.max_length={cfg.max_length} exceeds the model's context of {ctx} tokens.")
    model.to(device)
    max_length = cfg.max_length or ctx or 1024
    fit, held_fit = truncation.fit_pairs(tok, train_pairs, max_length), truncation.fit_pairs(tok, eval_pairs, max_length)
    truncation.report("reward", "preference pairs", fit + held_fit, len(train_pairs) + len(eval_pairs),
                      cfg.data_warn_share)
    if not fit.kept or not held_fit.kept:
        raise StageError(f"no {'training' if not fit.kept else 'held-out'} preference pair fits reward.max_length / "
                         f"the model's context of {max_length} tokens, even with its prompt cut; shorten the answers.")
    train_pairs, eval_pairs = fit.kept, held_fit.kept
    before, _ = pairwise_eval(model, tok, eval_pairs, cfg.eval_batch_size)

    trainer, loss = _train(cfg, model, tok, train_pairs, data.train_source, max_length, out_dir / ".trainer", prec,
                           tracker)
    model = trainer.model
    hf = hft.save_trained(model, tok, out_dir, model_dir)

    metrics, rows = pairwise_eval(model, tok, eval_pairs, cfg.eval_batch_size)
    metrics["eval/pairwise_accuracy_before"] = before["eval/pairwise_accuracy"]
    metrics["train/loss_final"] = loss
    metrics.update((fit + held_fit).metrics())
    judge, judge_metrics = _train_judge(cfg, model_dir, tok, eval_pairs, max_length, out_dir, prec, device)
    metrics.update(judge_metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=trainer.state.global_step)
    write_model_card(hf, "reward", "the SFT stage's model, with a new scalar head", source_of(data.train_source),
                     metrics, settings_of(cfg, ("epochs", "learning_rate", "seed")))
    outputs = {"hf": hf, **({JUDGE: judge} if judge is not None else {})}
    return StageResult(outputs=outputs, metrics=metrics, samples=rows[: cfg.n_samples])
