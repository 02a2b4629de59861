"""One truncation policy for every post-training dataset, applied before training so no trainer cuts or filters on
its own, and counted.

* Chat examples (SFT) and preference pairs (reward): the final assistant turn (each answer of a pair) is kept
  whole; the prompt before it is cut from the left, first whole turns (a leading system message stays), then the
  start of its earliest remaining message, so that the example fits; an example whose answer alone leaves no room
  for a prompt is dropped.
* RL and held-out prompts: kept when the prompt plus the tokens to generate fit, else dropped (a prompt cut short
  would be rewarded as if it were the question asked).

Lengths are those of the chat template's rendering, as the trainers see it. `Fit` holds what is kept and how many
examples were truncated and dropped; the stages log them as `data/truncated` and `data/dropped`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from stages.data.chat_data import Message

log = logging.getLogger(__name__)

MIN_PROMPT_TOKENS = 1  # of the earliest message's content that must survive a cut, else the example is dropped


@dataclass
class Fit:
    kept: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0

    def __add__(self, other: Fit) -> Fit:
        return Fit(self.kept + other.kept, self.truncated + other.truncated, self.dropped + other.dropped)

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        return {f"{prefix}truncated": float(self.truncated), f"{prefix}dropped": float(self.dropped)}


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def rendered_length(tok: Any, messages: list[Message], generation_prompt: bool = False) -> int:
    return len(_ids(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)))


def rendered_lengths(tok: Any, conversations: list[list[Message]], generation_prompt: bool = False) -> list[int]:
    """Lengths of many renderings at once (the batched call is several times faster than one at a time)."""
    if not conversations:
        return []
    out = tok.apply_chat_template(conversations, tokenize=True, add_generation_prompt=generation_prompt)
    return [len(x) for x in (out["input_ids"] if hasattr(out, "keys") else out)]


def _cut_left(tok: Any, prompt: list[Message], budget: int) -> list[Message] | None:
    """The prompt cut from the left until its rendering (with the generation prompt) takes at most `budget`
    tokens: whole turns first (a leading system message stays, and the rest starts with a user turn), then the start
    of the earliest remaining message; None if nothing fits."""
    system = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    turns = list(prompt[len(system):])

    def fits(candidate: list[Message]) -> bool:
        return rendered_length(tok, system + candidate, True) <= budget

    while len(turns) > 1 and not fits(turns):
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] == "assistant":
            turns = turns[1:]
    if fits(turns):
        return system + turns
    content = _ids(tok(turns[0]["content"], add_special_tokens=False))
    lo, hi = MIN_PROMPT_TOKENS, len(content) - 1  # tokens of the content kept, searched for the most that fit
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = [{**turns[0], "content": tok.decode(content[-mid:], skip_special_tokens=False)}, *turns[1:]]
        if fits(candidate):
            best, lo = system + candidate, mid + 1
        else:
            hi = mid - 1
    return best


def _split_final_answer(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last:]


def fit_chat(tok: Any, records: list[dict[str, Any]], max_length: int) -> Fit:
    """SFT examples ({"messages"}) that fit `max_length` tokens (see the module doc)."""
    fit = Fit()
    for r, n in zip(records, rendered_lengths(tok, [r["messages"] for r in records]), strict=True):
        msgs = r["messages"]
        if n <= max_length:
            fit.kept.append(r)
            continue
        prompt, answer = _split_final_answer(msgs)
        answer_len = rendered_length(tok, msgs) - rendered_length(tok, prompt, True) if prompt else max_length + 1
        cut = _cut_left(tok, prompt, max_length - answer_len) if prompt else None
        if cut is None or rendered_length(tok, cut + answer) > max_length:
            fit.dropped += 1
        else:
            fit.kept.append({**r, "messages": cut + answer})
            fit.truncated += 1
    return fit


def fit_pairs(tok: Any, pairs: list[dict[str, Any]], max_length: int) -> Fit:
    """Preference pairs whose prompt + chosen and prompt + rejected both fit `max_length` tokens."""
    fit = Fit()
    chosen = rendered_lengths(tok, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = rendered_lengths(tok, [p["prompt"] + p["rejected"] for p in pairs])
    for p, a, b in zip(pairs, chosen, rejected, strict=True):
        longest = max(a, b)
        if longest <= max_length:
            fit.kept.append(p)
            continue
        base = rendered_length(tok, p["prompt"], True)
        answer_len = longest - base
        cut = _cut_left(tok, p["prompt"], max_length - answer_len)
        if cut is None or max(rendered_length(tok, cut + p[s]) for s in ("chosen", "rejected")) > max_length:
            fit.dropped += 1
        else:
            fit.kept.append({**p, "prompt": cut})
            fit.truncated += 1
    return fit


def fit_prompts(tok: Any, prompts: list[dict[str, Any]], max_length: int, new_tokens: int) -> Fit:
    """Prompts ({"prompt"}) whose rendering plus `new_tokens` generated tokens fits `max_length`."""
    fit = Fit()
    for p, n in zip(prompts, rendered_lengths(tok, [p["prompt"] for p in prompts], True), strict=True):
        if n + new_tokens <= max_length:
            fit.kept.append(p)
        else:
            fit.dropped += 1
    return fit


def report(stage: str, what: str, fit: Fit, total: int, warn_share: float) -> None:
    """One warning line when more than `warn_share` of the examples were cut or dropped."""
    changed = fit.truncated + fit.dropped
    if total and changed / total > warn_share:
        log.warning("%s: %d of %d %s did not fit the context: %d cut from the left, %d dropped (above %s.data_warn_"
                    "share=%g)", stage, changed, total, what, fit.truncated, fit.dropped, stage, warn_share)
