"""PPO stage: align the SFT policy to the reward model with TRL's PPO (or its maintained GRPO / RLOO trainers).

inputs:  policy (SFT hf dir), reward_model (reward stage hf dir), judge (optional: the reward stage's second reward
         model, trained on held-out pairs only), tasks (the built-in task data, for datasets left empty)
outputs: hf (the aligned policy, transformers-native, with tokenizer + chat template)
metrics (held-out prompts: ppo.eval_dataset, the built-in heldout.jsonl, or 10 % of ppo.dataset by hash; greedy
answers of the aligned and the SFT policy; stages.posttrain.alignment_eval):
  eval/reward_mean, eval/sft_reward_mean, eval/reward_gain (+- _se)   the reward model's scores
  eval/win_rate/reward_model (+- _se)   aligned answer scored above the SFT answer by the reward model (ties half);
  eval/win_rate/judge (+- _se)          the same by the judge, when there is one
  eval/kl (+- _se)      sum over answer tokens of KL(policy || SFT reference), averaged over prompts
  eval/response_tokens, eval/cut_off_rate, eval/distinct_2 (and eval/sft_*)   what the answers look like
  eval/exact_match (+ per kind, eval/sft_*, eval/exact_match_gain +- _se)   where prompts have expected answers;
  eval/refusal_rate/harmful, eval/refusal_rate/benign   with the built-in world's harmful requests
  data/truncated, data/dropped          prompts the truncation policy dropped (they do not fit the context)
  train/*               TRL's per-update metrics (objective/kl, objective/scores, loss/policy_avg, ...)

algorithm: ppo  = trl.experimental.ppo.PPOTrainer (policy, frozen reference, reward model, value model initialised
                  from the reward model). trl 1.12.0 is the last release that ships it.
           grpo / rloo = trl's GRPOTrainer / RLOOTrainer with the reward model and, when program_reward_weight > 0,
                  a program-checked reward (the task data's checker against the prompt's `answer`).
Resume: TRL's PPO loop keeps its rollout/optimizer state in memory and cannot resume from a checkpoint, so an
interrupted run of this stage restarts from scratch; a finished run is reused when nothing changed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from stages.common import NullTracker, StageError, StageResult, Tracker, read_json, require_path, stage_device
from stages.data import task_data, truncation
from stages.data.builtin import HARMFUL_KIND, UNKNOWN_KIND
from stages.data.chat_data import DatasetRef
from stages.posttrain import hf_training as hft
from stages.posttrain.alignment_eval import Models, evaluate_alignment
from stages.posttrain.model_card import settings_of, source_of, write_model_card

# GRPO / RLOO learn from the reward spread within a group of samples, with no value model, so they need other
# settings than PPO: fields the user leaves unset take these values when `algorithm` is grpo or rloo. Why each
# value, and why each algorithm leaves one built-in kind out: docs/FINDINGS.md, "Current defaults and why".
GROUP_DEFAULTS: dict[str, Any] = {"learning_rate": 3e-5, "kl_coef": 0.1, "temperature": 1.0, "num_ppo_epochs": 1,
                                  "total_episodes": 16384, "exclude_kinds": [HARMFUL_KIND]}


class Config(hft.DeviceSettings, hft.HeldoutEvalSettings, hft.DataSettings):
    """Online RL from the reward model: PPO (default), GRPO or RLOO."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["ppo", "grpo", "rloo"] = Field(
        "ppo", description="ppo: TRL's PPO with a value model; grpo / rloo: TRL's critic-free online trainers."
    )
    dataset: DatasetRef | None = Field(
        None,
        description="RL prompts: a file, glob, folder or Hugging Face dataset with a `prompt` (string, messages or "
        "transcript; or messages / conversations / Alpaca rows, whose last answer is left out) and an optional "
        "`answer` and `kind`. Empty = the built-in world's rl_prompts.jsonl.",
    )
    eval_dataset: DatasetRef | None = Field(
        None,
        description="Held-out prompts (same formats) answered greedily by the SFT and the aligned policy for the "
        "eval/* metrics. Empty = the built-in heldout.jsonl with the built-in data, else 10% of `dataset` chosen "
        "by hash and never trained on.",
    )
    total_episodes: int = Field(1024, ge=1, description="Prompts rolled out in total (PPO) / completions (GRPO, RLOO; "
                                "default 16384).")
    batch_size: int = Field(64, ge=1, description="Prompts per rollout batch, i.e. per PPO update "
                            "(completions per step for GRPO/RLOO).")
    num_mini_batches: int = Field(2, ge=1, description="PPO: minibatches each rollout batch is split into "
                                  "(one optimizer step each).")
    num_ppo_epochs: int = Field(4, ge=1, description="Optimisation passes over each rollout batch (GRPO/RLOO "
                                "default: 1).")
    # PPO: a strong KL penalty keeps the drift towards the reward model's near-miss blind spot small while refusals,
    # worth far more reward per unit of KL, are still learnt (docs/FINDINGS.md, "An alignment target with headroom").
    learning_rate: float = Field(1.5e-5, gt=0, description="Peak learning rate (AdamW) for the policy (and value "
                                 "model); GRPO/RLOO default: 3e-5.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name: linear, cosine, constant, ...")
    kl_coef: float = Field(1.0, ge=0, description="Weight of the KL penalty to the SFT reference (GRPO/RLOO: "
                         "beta, default 0.1).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="PPO: per-token KL estimator (k1 unbiased, k3 "
                                              "lower variance).")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip range (GRPO/RLOO: epsilon).")
    vf_coef: float = Field(0.1, ge=0, description="PPO: weight of the value loss.")
    cliprange_value: float = Field(0.2, gt=0, description="PPO: value prediction clip range.")
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda.")
    whiten_rewards: bool = Field(False, description="PPO: whiten rewards per batch (needs minibatches of >= 8).")
    response_length: int = Field(16, ge=1, description="Most tokens generated per answer during training.")
    # PPO: below 1 the rollouts stay near the greedy answers the evaluation scores; at 1.0 a small model's samples are
    # mostly noise.
    temperature: float = Field(0.7, gt=0, description="Sampling temperature of the rollouts (GRPO/RLOO "
                                                    "default: 1.0).")
    stop_token: Literal["eos"] | None = Field(
        "eos", description="'eos': answers end at the tokenizer's EOS (the chat turn's end); empty = never stop early."
    )
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="Subtracted from the score of an answer that never produced EOS; empty = off."
    )
    num_generations: int = Field(8, ge=2, description="GRPO/RLOO: completions sampled per prompt (the group).")
    program_reward_weight: float = Field(
        0.0, ge=0, description="GRPO/RLOO: weight of a 0/1 program-checked reward (needs `answer` on the prompts); "
        "0 = reward model only."
    )
    reward_model_weight: float = Field(
        1.0, ge=0, description="GRPO/RLOO: weight of the reward model's score; 0 = the program-checked reward alone "
        "(reinforcement learning from verifiable rewards)."
    )
    exclude_kinds: list[str] = Field(
        default_factory=lambda: [UNKNOWN_KIND], description="RL prompts whose `kind` is one of these are left out. "
        "Built-in kinds: PPO leaves out 'unknown' (questions the story does not answer, the program reward's "
        "target), GRPO/RLOO 'harmful' (the requests, the reward model's target)."
    )
    seed: int = Field(0, description="Random seed (rollout sampling, data order).")
    logging_steps: int = Field(1, ge=1, description="Log training metrics every N updates.")

    @model_validator(mode="after")
    def _check_batches(self) -> Config:
        if self.algorithm != "ppo":
            for name, value in GROUP_DEFAULTS.items():
                if name not in self.model_fields_set:
                    setattr(self, name, list(value) if isinstance(value, list) else value)
        if self.algorithm == "ppo" and self.batch_size % self.num_mini_batches:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of num_mini_batches="
                             f"{self.num_mini_batches}")
        if self.algorithm != "ppo" and self.reward_model_weight == 0 and self.program_reward_weight == 0:
            raise ValueError("reward_model_weight and program_reward_weight are both 0: there is no reward; set one")
        if self.algorithm != "ppo" and self.batch_size % self.num_generations:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of num_generations="
                             f"{self.num_generations} for {self.algorithm}")
        return self


def check_same_tokenizer(policy_tok: Any, reward_tok: Any, policy_dir: Path, reward_dir: Path) -> None:
    """The reward model reads the policy's token ids directly, so the two vocabularies must be identical."""
    problems = []
    if policy_tok.get_vocab() != reward_tok.get_vocab():
        problems.append("different vocabularies")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(policy_tok, name) != getattr(reward_tok, name):
            problems.append(f"different {name} ({getattr(policy_tok, name)} vs {getattr(reward_tok, name)})")
    if policy_tok.chat_template != reward_tok.chat_template:
        problems.append("different chat templates")
    if problems:
        raise StageError(
            f"the policy ({policy_dir}) and the reward model ({reward_dir}) use different tokenizers: "
            f"{', '.join(problems)}; train the reward model from this SFT model (reward stage input `model`)."
        )


def program_reward_for(checker: task_data.Checker) -> Any:
    """The program-checked reward for GRPO / RLOO: 1.0 when the checker accepts a completion for the prompt's
    `answer` (the built-in world's also rewards refusing a harmful request), else 0.0."""

    def program_reward(completions: list, answer: list, kind: list | None = None, **kwargs: Any) -> list[float]:
        kinds = kind or [None] * len(answer)
        out = []
        for c, a, k in zip(completions, answer, kinds, strict=True):
            text = c[-1]["content"] if isinstance(c, list) else str(c)
            out.append(float(checker.check(text, a, k or None)) if a else 0.0)
        return out

    return program_reward


def _check_reward_model(reward_dir: Path) -> None:
    rm_cfg = read_json(reward_dir / "config.json", "reward model config", "the reward stage")
    if rm_cfg.get("num_labels", len(rm_cfg.get("id2label", {}) or {0: 0})) != 1 or not any(
        a.endswith("ForSequenceClassification") for a in rm_cfg.get("architectures", [])
    ):
        raise StageError(f"{reward_dir} is not a scalar reward model (needs a *ForSequenceClassification with "
                         "num_labels=1); pass the reward stage's `hf` output as `reward_model`.")


def _load_models(cfg: Config, policy_dir: Path, reward_dir: Path, judge_dir: Path | None, pad_token_id: int,
                 device: torch.device) -> Models:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    set_seed(cfg.seed)
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir)).to(device)
    ref = AutoModelForCausalLM.from_pretrained(str(policy_dir)).to(device)
    scorers = [AutoModelForSequenceClassification.from_pretrained(str(d), num_labels=1).to(device)
               for d in (reward_dir, judge_dir) if d is not None]
    for m in (ref, *scorers):
        m.config.pad_token_id = pad_token_id
        m.eval().requires_grad_(False)
    return Models(policy, ref, scorers[0], reward_dir, device, scorers[1] if judge_dir is not None else None)


def _train_ppo(cfg: Config, tok: Any, models: Models, prompts: list[dict], eval_prompts: list[dict], work: Path,
               prec: dict, tracker: Tracker) -> int:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from stages.posttrain.scoring import encode_prompts

    def tokenized(rows: list[dict]) -> Any:
        return Dataset.from_dict({"input_ids": encode_prompts(tok, [r["prompt"] for r in rows])})

    # The value model starts from the reward model: both read a whole answer and return one number.
    value = AutoModelForSequenceClassification.from_pretrained(str(models.reward_dir), num_labels=1).to(models.device)
    value.config.pad_token_id = tok.pad_token_id
    args = PPOConfig(
        **hft.common_training_args(work, cfg.seed, cfg.logging_steps), **prec,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        # rollout batch = per-device batch with no accumulation: each minibatch is then one optimizer step
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=cfg.num_mini_batches, num_ppo_epochs=cfg.num_ppo_epochs, total_episodes=cfg.total_episodes,
        local_rollout_forward_batch_size=cfg.batch_size, response_length=cfg.response_length,
        temperature=cfg.temperature, stop_token=cfg.stop_token, missing_eos_penalty=cfg.missing_eos_penalty,
        kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, cliprange=cfg.cliprange, vf_coef=cfg.vf_coef,
        cliprange_value=cfg.cliprange_value, gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=cfg.whiten_rewards,
        num_sample_generations=0,  # held-out evaluation happens after training, on our own metrics
        per_device_eval_batch_size=min(cfg.eval_batch_size, max(1, len(eval_prompts))),
    )
    return hft.fit(PPOTrainer, tracker, args=args, processing_class=tok, model=models.policy, ref_model=models.ref,
                   reward_model=models.reward, value_model=value, train_dataset=tokenized(prompts),
                   eval_dataset=tokenized(eval_prompts or prompts[:1]))


def _train_group(cfg: Config, tok: Any, reward_tok: Any, models: Models, prompts: list[dict], work: Path,
                 prec: dict, tracker: Tracker, checker: task_data.Checker) -> int:
    from datasets import Dataset

    if cfg.algorithm == "grpo":
        from trl import GRPOConfig as AlgoConfig
        from trl import GRPOTrainer as AlgoTrainer
    else:
        from trl import RLOOConfig as AlgoConfig
        from trl import RLOOTrainer as AlgoTrainer

    funcs: list[Any] = []
    weights: list[float] = []
    procs: list[Any] = []
    if cfg.reward_model_weight > 0:
        funcs.append(models.reward)
        weights.append(cfg.reward_model_weight)
        procs.append(reward_tok)
    if cfg.program_reward_weight > 0:
        if not all(p["answer"] for p in prompts):
            raise StageError("program_reward_weight > 0 needs an `answer` on every RL prompt; the dataset lacks some.")
        funcs.append(program_reward_for(checker))
        weights.append(cfg.program_reward_weight)
        procs.append(None)
    data = Dataset.from_list([{"prompt": p["prompt"], "answer": p["answer"] or "", "kind": p["kind"] or ""}
                              for p in prompts])
    common = hft.common_training_args(work, cfg.seed, cfg.logging_steps)
    common["remove_unused_columns"] = False  # the program reward reads the `answer` and `kind` columns
    args = AlgoConfig(
        **common, **prec,
        epsilon=cfg.cliprange, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        per_device_train_batch_size=cfg.batch_size, num_generations=cfg.num_generations,
        max_completion_length=cfg.response_length, temperature=cfg.temperature, beta=cfg.kl_coef,
        num_iterations=cfg.num_ppo_epochs, max_steps=math.ceil(cfg.total_episodes / cfg.batch_size),
        reward_weights=weights, log_completions=False,
    )
    return hft.fit(AlgoTrainer, tracker, model=models.policy, reward_funcs=funcs, args=args, train_dataset=data,
                   processing_class=tok, reward_processing_classes=procs)


def fit_prompt_sets(cfg: Config, tok: Any, ctx: int | None, prompts: list[dict], heldout: list[dict],
                    src: str) -> tuple[list[dict], list[dict], dict[str, float]]:
    """The RL and held-out prompts that leave room for the answer in the policy's context (stages.data.truncation
    drops the rest and counts them), checked to be enough to train on."""
    ctx = ctx or 1 << 30
    fit = truncation.fit_prompts(tok, prompts, ctx, cfg.response_length)
    held_fit = truncation.fit_prompts(tok, heldout, ctx, cfg.max_new_tokens)
    truncation.report("ppo", "prompts", fit + held_fit, len(prompts) + len(heldout), cfg.data_warn_share)
    need = cfg.batch_size if cfg.algorithm == "ppo" else 1
    if len(fit.kept) < need and not fit.dropped:
        raise StageError(f"{src} has {len(prompts)} RL prompts, fewer than ppo.batch_size={cfg.batch_size}; lower "
                         "batch_size or add prompts.")
    if len(fit.kept) < need:
        raise StageError(f"{len(fit.kept)} of the {len(prompts)} RL prompts of {src} fit the policy's context of "
                         f"{ctx} tokens with ppo.response_length={cfg.response_length} tokens to answer, fewer than "
                         f"ppo.batch_size={need}; use shorter prompts, a smaller response_length or batch_size.")
    return fit.kept, held_fit.kept, (fit + held_fit).metrics()


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    from stages.posttrain.scoring import load_tokenizer

    policy_dir = require_path(inputs.get("policy", ""), "input `policy` (the SFT stage's hf folder)")
    reward_dir = require_path(inputs.get("reward_model", ""), "input `reward_model` (the reward stage's hf folder)")
    judge_dir = require_path(inputs["judge"], "input `judge`") if inputs.get("judge") else None
    tasks_dir = hft.optional_tasks(inputs)
    out_dir = Path(out_dir)

    # everything a user can get wrong is checked before any model is trained
    data = task_data.load("ppo", cfg.dataset, cfg.eval_dataset, tasks_dir, cfg.eval_limit)
    src = data.train_source
    prompts = [p for p in data.train if p.get("kind") not in cfg.exclude_kinds]
    if not prompts:
        raise StageError(f"every prompt of {src} is of a kind in ppo.exclude_kinds={cfg.exclude_kinds}; set "
                         "ppo.exclude_kinds=[] or add prompts of other kinds.")
    tok = load_tokenizer(policy_dir, padding_side="left")
    reward_tok = load_tokenizer(reward_dir, padding_side="right")
    check_same_tokenizer(tok, reward_tok, policy_dir, reward_dir)
    _check_reward_model(reward_dir)
    prompts, heldout, fit_metrics = fit_prompt_sets(cfg, tok, hft.folder_context(policy_dir), prompts, data.eval, src)
    checker = data.checker

    device = stage_device(cfg.device, "ppo.device")
    prec = hft.precision_args(device, cfg.precision)
    models = _load_models(cfg, policy_dir, reward_dir, judge_dir, tok.pad_token_id, device)

    work = out_dir / ".trainer"
    if cfg.algorithm == "ppo":
        steps = _train_ppo(cfg, tok, models, prompts, heldout, work, prec, tracker)
    else:
        train_checker = task_data.builtin_checker() if data.builtin else task_data.GENERIC_CHECKER
        steps = _train_group(cfg, tok, reward_tok, models, prompts, work, prec, tracker, train_checker)
    hf = hft.save_trained(models.policy, tok, out_dir, policy_dir)

    metrics, samples = evaluate_alignment(models, tok, heldout, checker, batch_size=cfg.eval_batch_size,
                                          max_new_tokens=cfg.max_new_tokens, n_samples=cfg.n_samples) \
        if heldout else ({}, [])
    if heldout:
        tracker.log_metrics(metrics, step=steps)
    metrics.update(fit_metrics)
    write_model_card(hf, "ppo", "the SFT stage's policy, rewarded by the reward stage's model",
                     source_of(src), metrics,
                     settings_of(cfg, ("algorithm", "total_episodes", "learning_rate", "kl_coef", "seed")))
    return StageResult(outputs={"hf": hf}, metrics=metrics, samples=samples)
