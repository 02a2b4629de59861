"""The promotion gate: every final model version is registered; the alias `champion` moves to it only when its
alignment did not cost what the user set as acceptable, otherwise it gets `candidate` and the reasons."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

CHAMPION, CANDIDATE = "champion", "candidate"
NOT_GATED = ("heldout_text",)  # the corpus's held-out split: reported by the check, not gated (stages.contamination)
TAG_PROMOTION = "llm.promotion"  # on the model version: "champion", or "candidate: <failed gates>"


@dataclass
class Verdict:
    alias: str
    failed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return self.alias if not self.failed else f"{self.alias}: " + "; ".join(self.failed)


def contaminated(metrics: Mapping[str, float], max_rate: float) -> list[str]:
    """Evaluation sets whose share of items overlapping training text (the contamination stage's `contamination/<set>/rate`
    metrics) is above `max_rate`, described."""
    out = []
    for key in sorted(k for k in metrics if k.startswith("contamination/") and k.endswith("/rate")):
        name = key.split("/")[1]
        if name in NOT_GATED:
            continue
        if metrics[key] > max_rate:
            items = metrics.get(f"contamination/{name}/items", 0)
            out.append(f"contaminated: {int(items)} {name} items ({metrics[key]:.1%}) share a word sequence with "
                       f"training text (pipeline.promotion_max_contamination={max_rate:g}; the contamination run's "
                       "contamination/report.json names them)")
    return out


def judge(metrics: Mapping[str, float], max_exact_match_drop: float, max_kl: float,
          contamination: Mapping[str, float] | None = None, max_contamination: float = 0.0,
          min_win_rate: float = 0.0) -> Verdict:
    """The final stage's held-out metrics against the gates: exact match not lower than the SFT policy's by more
    than `max_exact_match_drop` (when the held-out prompts have expected answers), KL to the SFT policy under
    `max_kl`, the aligned policy's win rate over the SFT policy by the held-out judge (a reward model PPO never
    trained against; when the reward stage trained one) not below `min_win_rate` by more than two standard errors,
    and no evaluation set contaminated above `max_contamination` (a share of its items; `contamination` holds the
    contamination stage's metrics). Without a held-out set nothing vouches for the model: it fails."""
    failed = contaminated(contamination or {}, max_contamination)
    em, sft_em, kl = (metrics.get(k) for k in ("eval/exact_match", "eval/sft_exact_match", "eval/kl"))
    if (em is None or sft_em is None) and kl is None:
        failed.append("nothing measured on held-out prompts (no held-out set)")
    elif em is None or sft_em is None:
        pass  # held-out prompts without expected answers (a user's chat data): no exact match to hold the line
    elif em < sft_em - max_exact_match_drop:
        failed.append(f"exact match {em:.3f} is {sft_em - em:.3f} below the SFT policy's {sft_em:.3f} "
                      f"(pipeline.promotion_max_exact_match_drop={max_exact_match_drop:g})")
    win, win_se = metrics.get("eval/win_rate/judge"), metrics.get("eval/win_rate/judge_se", 0.0)
    if win is not None and win + 2 * win_se < min_win_rate:  # the held-out judge prefers the SFT answers
        failed.append(f"the held-out judge prefers the SFT policy's answers: win rate {win:.3f} ± {win_se:.3f} "
                      f"(pipeline.promotion_min_win_rate={min_win_rate:g}, within two standard errors)")
    if kl is None:
        failed.append("KL to the SFT policy not measured")
    elif kl > max_kl:
        failed.append(f"KL {kl:.3f} to the SFT policy is above pipeline.promotion_max_kl={max_kl:g}")
    return Verdict(CANDIDATE if failed else CHAMPION, failed)


def promote(client: Any, name: str, version: str, verdict: Verdict) -> None:
    """Point the verdict's alias at `version` and record the verdict on it (idempotent: a rerun that finds the
    version already registered sets the same alias again)."""
    client.set_registered_model_alias(name, verdict.alias, version)
    client.set_model_version_tag(name, version, TAG_PROMOTION, verdict.describe()[:5000])
    log.info("model %s version %s: %s", name, version, verdict.describe())
