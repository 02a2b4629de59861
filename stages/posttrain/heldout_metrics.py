"""Held-out metrics that mean the same on any data, each with its standard error: bits per byte of text and of
chat responses, win rates, paired gains, and what greedy answers look like (length, cut off, distinct-2).

Bits per byte is the canonical one of the project: the negative log-likelihood of every token of the held-out text
(each document scored from a beginning-of-sequence token, in windows of the model's context), in bits, over its
UTF-8 bytes; the evaluate stage's lm-eval task `heldout_text` computes
the same quantity through lm-eval and is tested to agree. For chat, only the assistant turns' tokens are scored, and
only their bytes counted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

LN2 = math.log(2)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def paired_gain(name: str, after: Sequence[float], before: Sequence[float]) -> dict[str, float]:
    """Mean per-item difference and its standard error (`<name>_se`): paired over the same items, they say whether a
    difference is real."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    if not diffs:
        return {}
    mean, se = mean_se(diffs)
    return {name: mean, f"{name}_se": se} if len(diffs) > 1 else {name: mean}


def win_rate(name: str, after: Sequence[float], before: Sequence[float]) -> dict[str, float]:
    """Share of items where `after` scores above `before` (ties count half), with its standard error."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(after, before, strict=True)]
    if not wins:
        return {}
    mean, se = mean_se(wins)
    return {name: mean, f"{name}_se": se}


def generation_stats(prefix: str, generations: Sequence[Any]) -> dict[str, float]:
    """Response length in tokens, share cut off by the token limit, and distinct-2 (distinct token bigrams over all
    bigrams of the answers: near 0 when a policy repeats itself)."""
    if not generations:
        return {}
    lengths = [len(g.response_ids) for g in generations]
    bigrams = [tuple(g.response_ids[i:i + 2]) for g in generations for i in range(len(g.response_ids) - 1)]
    mean_len, se_len = mean_se([float(n) for n in lengths])
    return {f"{prefix}response_tokens": mean_len, f"{prefix}response_tokens_se": se_len,
            f"{prefix}cut_off_rate": sum(not g.stopped for g in generations) / len(generations),
            f"{prefix}distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0}


def ratio_se(nats: Sequence[float], nbytes: Sequence[int]) -> tuple[float, float]:
    """Bits per byte over documents (sum of nats over sum of bytes, in bits) and its standard error by the delta
    method for a ratio of sums."""
    total_bytes = sum(nbytes)
    if not total_bytes:
        return math.nan, math.nan
    bpb = sum(nats) / total_bytes / LN2
    n = len(nats)
    if n < 2:
        return bpb, 0.0
    resid = [x / LN2 - bpb * b for x, b in zip(nats, nbytes, strict=True)]
    var = n / (n - 1) * sum(r * r for r in resid) / total_bytes ** 2
    return bpb, math.sqrt(var)


@torch.no_grad()
def _window_nats(model: Any, ids: list[int], scored: list[bool], ctx: int) -> float:
    """Sum of -log p over the tokens marked `scored` of a sequence longer than the context: windows of `ctx`
    predicted tokens, each window's input the `ctx` tokens before them (so a window's first prediction sees one
    token of the previous window), as lm-eval's rolling log-likelihood does."""
    device = next(model.parameters()).device
    total, p = 0.0, 1
    while p < len(ids):
        inp = ids[p - 1:p - 1 + ctx]
        target = ids[p:p + len(inp)]
        logp = torch.log_softmax(model(input_ids=torch.tensor([inp], device=device)).logits[0].float(), -1)
        picked = logp[:len(target)].gather(1, torch.tensor(target, device=device)[:, None])[:, 0]
        total -= float((picked * torch.tensor(scored[p:p + len(target)], device=device)).sum())
        p += len(target)
    return total


@torch.no_grad()
def sequence_nats(model: Any, seqs: Sequence[tuple[list[int], list[bool]]], ctx: int, pad_id: int,
                  batch_size: int = 32) -> list[float]:
    """-log p summed over the scored tokens of each (ids, scored) sequence (ids[0] is only context): sequences that
    fit the context in right-padded batches, longer ones window by window."""
    device = next(model.parameters()).device
    out = [0.0] * len(seqs)
    short = sorted((i for i, (ids, _) in enumerate(seqs) if len(ids) <= ctx), key=lambda i: len(seqs[i][0]))
    for b in range(0, len(short), batch_size):
        idx = short[b:b + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        score = torch.zeros((len(idx), width), dtype=torch.float32)
        for row, i in enumerate(idx):
            n = len(seqs[i][0])
            ids[row, :n] = torch.tensor(seqs[i][0])
            mask[row, :n] = 1
            score[row, :n] = torch.tensor(seqs[i][1], dtype=torch.float32)
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        picked = logp[:, :-1].gather(2, ids[:, 1:, None].to(device))[..., 0]
        nats = -(picked * score[:, 1:].to(device)).sum(1)
        for row, i in enumerate(idx):
            out[i] = float(nats[row])
    for i, (ids_, scored) in enumerate(seqs):
        if len(ids_) > ctx:
            out[i] = _window_nats(model, ids_, scored, ctx)
    return out


def _eval_mode(model: Any) -> bool:
    was = model.training
    model.eval()
    return was


def text_bpb(model: Any, tok: Any, texts: Sequence[str], ctx: int) -> tuple[float, float]:
    """Bits per byte of plain texts, each scored from a BOS token (see the module doc)."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seqs = []
    for text in texts:
        ids = [bos, *tok(text, add_special_tokens=False)["input_ids"]]
        seqs.append((ids, [False] + [True] * (len(ids) - 1)))
    was = _eval_mode(model)
    nats = sequence_nats(model, seqs, ctx, tok.pad_token_id or 0)
    model.train(was)
    return ratio_se(nats, [len(t.encode("utf-8")) for t in texts])


def response_bpb(model: Any, tok: Any, conversations: Sequence[list[dict[str, str]]], ctx: int) -> tuple[float, float]:
    """Bits per byte of the assistant turns of chat conversations that fit the context: their tokens scored in
    context (the chat template's {% generation %} markers say which are the assistant's, the end of each turn
    included), their content's bytes counted."""
    seqs, nbytes = [], []
    for msgs in conversations:
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        if len(ids) <= ctx and any(mask):
            seqs.append((ids, mask))
            nbytes.append(sum(len(m["content"].encode("utf-8")) for m in msgs if m["role"] == "assistant"))
    was = _eval_mode(model)
    nats = sequence_nats(model, seqs, ctx, tok.pad_token_id or 0)
    model.train(was)
    return ratio_se(nats, nbytes)
