"""Evaluation shared by the pretrain, SFT and PPO stages: batched greedy generation, exact match, reward scores, KL.

Public API:
  exact_match(model, tokenizer, items, checker=...) -> (metrics, rows)
      Greedy answers to held-out prompt items through the chat template with a generation prompt, judged by a
      `stages.data.task_data.Checker`. metrics: {"eval/exact_match": ..., "eval/exact_match/<kind>": ...}, and with the
      built-in world's checker eval/refusal_rate/harmful, eval/refusal_rate/benign on its harmful requests.
      rows: [{"prompt", "response", "expected", "correct", "kind"}].
  evaluate_exact_match(model_dir, tasks_dir, ...): the same on the built-in held-out items of a tasks folder.
  generate(model, tokenizer, prompts, ...) -> list[Generation]   (prompts are message lists)
  reward_scores(reward_model, tokenizer, sequences, ...) -> list[float]
      `sequences` are token-id lists, or (prompt messages, response text) pairs rendered by the chat template.
  scored_sequences(tokenizer, generations) -> token-id lists for reward_scores, each finished answer ending in the
      template's end-of-turn tail as in the reward model's training data.
  sequence_kl(policy, reference, generations, ...) -> list[float]   exact per-token KL summed over each response.

Generation is batched with left padding (prompts sorted by length so batches pad little) and uses the KV cache.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common import StageError, stage_device
from stages.data.chat_data import Message, prompt_text
from stages.data.task_data import Checker, builtin_checker, builtin_heldout


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including the first stop token (if one was produced)
    text: str  # the response decoded without special tokens
    stopped: bool  # whether a stop token ended it (else it hit max_new_tokens)


def load_tokenizer(model_dir: str | Path, padding_side: str = "left") -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise StageError(f"could not load the tokenizer from {model_dir} ({e}); the model folder must include "
                         "tokenizer.json and tokenizer_config.json.") from e
    if tok.pad_token_id is None:
        raise StageError(f"the tokenizer in {model_dir} has no pad token; set `pad_token` in tokenizer_config.json.")
    if not tok.chat_template:
        raise StageError(f"the tokenizer in {model_dir} has no chat template; rebuild it with the tokenizer stage.")
    tok.padding_side = padding_side
    return tok


def load_causal_lm(model_dir: str | Path, device: str | torch.device = "auto") -> tuple[Any, Any]:
    """(model in eval mode on `device`, left-padding tokenizer) from a transformers-native folder."""
    from transformers import AutoModelForCausalLM

    if not (Path(model_dir) / "config.json").exists():
        raise StageError(f"{model_dir} is not a transformers model folder (no config.json); pass an `hf` output.")
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(stage_device(str(device), "device"))
    model.eval()
    return model, tok


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS, plus the end-of-turn token when the vocabulary has one: a chat turn may end at either."""
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id and end not in ids:
        ids.append(end)
    return [i for i in ids if i is not None]


def encode_prompts(tokenizer: Any, prompts: Sequence[list[Message]]) -> list[list[int]]:
    out = tokenizer.apply_chat_template(list(prompts), add_generation_prompt=True, tokenize=True)
    # transformers returns a BatchEncoding for batched input in some versions, a list of lists in others
    return [list(x) for x in (out["input_ids"] if hasattr(out, "keys") else out)]


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _right_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[Message]],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> list[Generation]:
    """Answers to chat prompts, greedy by default, in the prompts' order."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=None,
        top_p=None,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    encoded = encode_prompts(tokenizer, prompts)
    results: list[Generation | None] = [None] * len(encoded)
    if do_sample:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    batches = _batches_by_length([len(e) for e in encoded], batch_size)
    for idx in tqdm(batches, desc="generate", disable=not progress, leave=False):
        ids, mask = _left_pad([encoded[i] for i in idx], tokenizer.pad_token_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        new = out[:, ids.shape[1] :].tolist()
        for row, i in zip(new, idx, strict=True):
            cut = next((k for k, t in enumerate(row) if t in stops), None)
            resp = row if cut is None else row[: cut + 1]
            results[i] = Generation(
                prompt_ids=encoded[i],
                response_ids=resp,
                text=tokenizer.decode(resp, skip_special_tokens=True).strip(),
                stopped=cut is not None,
            )
    model.train(was_training)
    return results  # type: ignore[return-value]


def exact_match(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    *,
    checker: Checker | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 24,
    generations: list[Generation] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Exact match of greedy answers on prompt items with an expected answer ({"prompt": messages, "answer",
    "kind"}), by kind when there are several. With a checker that has a `refusal_kind` (the built-in world's),
    items of that kind must be declined instead, and the refusal rates on them and on the rest are metrics too."""
    checker = checker or builtin_checker()
    if generations is None:
        generations = generate(model, tokenizer, [it["prompt"] for it in items], batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=True)
    declined = checker.refusal_kind
    by_kind: dict[str, list[bool]] = defaultdict(list)
    refused: dict[bool, list[bool]] = {True: [], False: []}  # must decline? -> declined?
    rows = []
    for it, g in zip(items, generations, strict=True):
        if it.get("answer") is None:
            raise StageError("exact match needs an `answer` for every held-out item; one lacks it.")
        kind = str(it.get("kind") or "all")
        ok = bool(checker.check(g.text, it["answer"], it.get("kind")))
        if declined is not None and checker.is_refusal is not None:
            refused[kind == declined].append(checker.is_refusal(g.text))
        if kind != declined:
            by_kind[kind].append(ok)
        rows.append({"prompt": prompt_text(it["prompt"]), "response": g.text, "expected": it["answer"],
                     "correct": ok, "kind": it.get("kind")})
    flat = [ok for oks in by_kind.values() for ok in oks]
    metrics = {"eval/exact_match": sum(flat) / max(len(flat), 1)}
    if len(by_kind) > 1:
        metrics.update({f"eval/exact_match/{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())})
    if refused[True]:
        metrics["eval/refusal_rate/harmful"] = sum(refused[True]) / len(refused[True])
        metrics["eval/refusal_rate/benign"] = sum(refused[False]) / max(len(refused[False]), 1)
    return metrics, rows


def load_heldout(tasks_dir: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The built-in world's held-out items from a tasks folder written by the ingest stage."""
    path = Path(tasks_dir) / "heldout.jsonl"
    if not path.exists():
        raise StageError(f"{path} not found; the `tasks` input must be the tasks folder written by ingest.")
    return builtin_heldout(Path(tasks_dir), limit)


def evaluate_exact_match(
    model_dir: str | Path,
    tasks_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 24,
    device: str = "auto",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy exact match of the model in `model_dir` on the built-in held-out items of `tasks_dir`."""
    items = load_heldout(tasks_dir, limit)
    model, tok = load_causal_lm(model_dir, device)
    return exact_match(model, tok, items, batch_size=batch_size, max_new_tokens=max_new_tokens)


def render_conversation(tokenizer: Any, prompt: list[Message], response: str | list[Message]) -> list[int]:
    resp = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    out = tokenizer.apply_chat_template(prompt + resp, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def turn_tail_ids(tokenizer: Any) -> list[int]:
    """The tokens the chat template writes after an assistant message's content (here `<|end|><|eos|>`).

    Found by rendering a probe conversation; falls back to [eos] for a template it cannot split.
    """
    probe = [{"role": "user", "content": "q"}]
    head = encode_prompts(tokenizer, [probe])[0]
    full = render_conversation(tokenizer, probe, "a")
    content = list(tokenizer.encode("a", add_special_tokens=False))
    if full[: len(head)] == head and full[len(head) : len(head) + len(content)] == content:
        return full[len(head) + len(content) :]
    return [tokenizer.eos_token_id]


def scored_sequences(tokenizer: Any, generations: Sequence[Generation]) -> list[list[int]]:
    """Prompt + response ids as a reward model should see them: a finished answer gets the chat template's whole
    end-of-turn tail (generation stops at the first stop token, `<|end|>`, but the reward model was trained on
    template-rendered pairs that end in `<|end|><|eos|>`, and it reads the last token). Unfinished answers are
    left as they are."""
    tail = turn_tail_ids(tokenizer)
    return [g.prompt_ids + (g.response_ids[:-1] + tail if g.stopped else g.response_ids) for g in generations]


@torch.no_grad()
def reward_scores(
    reward_model: Any,
    tokenizer: Any,
    sequences: Sequence[list[int] | tuple[list[Message], str | list[Message]]],
    *,
    batch_size: int = 64,
) -> list[float]:
    """Scalar reward of each sequence (token ids, or a (prompt, response) pair rendered by the chat template)."""
    if not sequences:
        return []
    seqs = [s if isinstance(s, list) else render_conversation(tokenizer, *s) for s in sequences]
    device = next(reward_model.parameters()).device
    # the scalar head reads the last non-pad token, so the pad id must be configured
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    was_training = reward_model.training
    reward_model.eval()
    scores: list[float] = [math.nan] * len(seqs)
    for idx in _batches_by_length([len(s) for s in seqs], batch_size):
        ids, mask = _right_pad([seqs[i] for i in idx], tokenizer.pad_token_id, device)
        logits = reward_model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        for i, v in zip(idx, logits, strict=True):
            scores[i] = v
    reward_model.train(was_training)
    return scores


@torch.no_grad()
def sequence_kl(
    policy: Any,
    reference: Any,
    generations: Sequence[Generation],
    pad_id: int,
    *,
    batch_size: int = 64,
) -> list[float]:
    """Sum over response tokens of KL(policy || reference) at each position, along the given responses.

    Exact per position (full vocabulary), so it is >= 0 and has no sampling noise, unlike a log-ratio estimate.
    """
    device = next(policy.parameters()).device
    kls = [0.0] * len(generations)
    for idx in _batches_by_length([len(g.prompt_ids) + len(g.response_ids) for g in generations], batch_size):
        seqs = [generations[i].prompt_ids + generations[i].response_ids for i in idx]
        ids, mask = _right_pad(seqs, pad_id, device)
        lp = torch.log_softmax(policy(input_ids=ids, attention_mask=mask).logits.float(), -1)
        lq = torch.log_softmax(reference(input_ids=ids, attention_mask=mask).logits.float(), -1)
        per_pos = (lp.exp() * (lp - lq)).sum(-1)  # (B, T): KL of the next-token distributions
        for row, i in enumerate(idx):
            g = generations[i]
            start = len(g.prompt_ids) - 1  # the position predicting the first response token
            kls[i] = float(per_pos[row, start : start + len(g.response_ids)].sum())
    return kls
