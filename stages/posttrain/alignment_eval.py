"""What alignment bought, on held-out prompts answered greedily by the SFT policy and the aligned one.

On any data: the reward model's mean score and gain, the win rate of the aligned answers over the SFT answers by
the reward model (which the aligned policy was trained against, so the win rate is labelled with its judge) and,
when the reward stage trained one, by the judge (a second reward model trained on held-out pairs neither the reward
model nor PPO saw); KL to the SFT policy; response length, share cut off by the token limit, distinct-2. Every
mean has its standard error. Where the prompts have expected answers, exact match (the task data's checker).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.data.chat_data import prompt_text
from stages.data.task_data import Checker
from stages.posttrain.heldout_metrics import generation_stats, mean_se, paired_gain, win_rate


@dataclass
class Models:
    """The policy being trained, its frozen SFT reference, the frozen reward model and judge, on one device."""

    policy: Any
    ref: Any
    reward: Any
    reward_dir: Path
    device: torch.device
    judge: Any = None


def evaluate_alignment(models: Models, tok: Any, heldout: list[dict], checker: Checker | None, *, batch_size: int,
                       max_new_tokens: int, n_samples: int) -> tuple[dict[str, float], list[dict]]:
    """eval/* metrics of the aligned policy against its SFT reference, and sample rows (see the module doc)."""
    from stages.posttrain.scoring import exact_match, generate, reward_scores, scored_sequences, sequence_kl

    prompts = [it["prompt"] for it in heldout]
    after = generate(models.policy, tok, prompts, progress=True, batch_size=batch_size, max_new_tokens=max_new_tokens)
    before = generate(models.ref, tok, prompts, progress=True, batch_size=batch_size, max_new_tokens=max_new_tokens)

    def scores(model: Any) -> tuple[list[float], list[float]]:
        return (reward_scores(model, tok, scored_sequences(tok, after), batch_size=batch_size),
                reward_scores(model, tok, scored_sequences(tok, before), batch_size=batch_size))

    r_after, r_before = scores(models.reward)
    kl, kl_se = mean_se(sequence_kl(models.policy, models.ref, after, tok.pad_token_id, batch_size=batch_size))
    metrics = {"eval/reward_mean": mean_se(r_after)[0], "eval/sft_reward_mean": mean_se(r_before)[0],
               "eval/kl": kl, "eval/kl_se": kl_se, "eval/eos_rate": sum(g.stopped for g in after) / len(after),
               **paired_gain("eval/reward_gain", r_after, r_before),
               **win_rate("eval/win_rate/reward_model", r_after, r_before),
               **generation_stats("eval/", after), **generation_stats("eval/sft_", before)}
    j_after = j_before = None
    if models.judge is not None:
        j_after, j_before = scores(models.judge)
        metrics.update(win_rate("eval/win_rate/judge", j_after, j_before))
        metrics.update(paired_gain("eval/judge_reward_gain", j_after, j_before))
    rows_after = rows_before = None
    if checker is not None:
        em_after, rows_after = exact_match(models.policy, tok, heldout, checker=checker, generations=after)
        em_before, rows_before = exact_match(models.ref, tok, heldout, checker=checker, generations=before)
        metrics.update(em_after)
        metrics.update({k.replace("eval/", "eval/sft_", 1): v for k, v in em_before.items()})
        benign = [i for i, it in enumerate(heldout) if it.get("kind") != checker.refusal_kind]
        metrics.update(paired_gain("eval/exact_match_gain", [float(rows_after[i]["correct"]) for i in benign],
                                   [float(rows_before[i]["correct"]) for i in benign]))
    samples = []
    for i, it in enumerate(heldout[:n_samples]):
        row = {"prompt": prompt_text(it["prompt"]), "response_before": before[i].text,
               "response_after": after[i].text, "expected": it.get("answer"),
               "reward_before": r_before[i], "reward_after": r_after[i]}
        if j_after is not None and j_before is not None:
            row["judge_before"], row["judge_after"] = j_before[i], j_after[i]
        if rows_after is not None and rows_before is not None:
            row["correct_before"], row["correct"] = rows_before[i]["correct"], rows_after[i]["correct"]
        samples.append(row)
    return metrics, samples
