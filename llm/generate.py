"""Generation: greedy / temperature / top-k / top-p, batched prompts (left padding), EOS stopping, streaming.

Three decoding paths, same tokens:
* KV cache, eager (default on CPU): each new token costs one position; attention reads only the filled prefix.
* KV cache, static + torch.compile "reduce-overhead" (default on CUDA): the decode step has fixed shapes
  (cache of max_seq_len slots, full-length mask), so CUDA graphs replay it without Python/launch overhead.
* No cache (`use_cache=False`): full recompute every step; the reference the cached paths are tested against.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from llm.layers import DecoderLM


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 = greedy."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decode_step(model: DecoderLM, idx: Tensor, input_pos: Tensor, position_ids: Tensor,
                 attention_mask: Tensor) -> Tensor:
    logits, _ = model(idx, input_pos=input_pos, position_ids=position_ids, attention_mask=attention_mask,
                      last_only=True)
    return logits[:, -1]


_compiled_decode: Callable | None = None


def _get_compiled_decode() -> Callable:
    global _compiled_decode
    if _compiled_decode is None:
        _compiled_decode = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True)
    return _compiled_decode


@dataclass
class _Batch:
    idx: Tensor  # (B, P) left-padded prompts
    lens: Tensor  # (B,) prompt lengths
    pad: Tensor  # (B,) left padding per row
    padded: bool  # any row padded


def _left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> _Batch:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (add a BOS token to empty prompts)")
    P = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return _Batch(idx.to(device), lens.to(device), (P - lens).to(device), any(len(p) != P for p in prompts))


def _token_steps(model: DecoderLM, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, eos_token_id: int | Iterable[int] | None, pad_token_id: int,
                 seed: int | None, use_cache: bool, compile: bool | str) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (next tokens (B,), finished-before-this-step mask (B,)) per step, on the model's device."""
    model = getattr(model, "_orig_mod", model)
    cfg, device = model.config, model.device
    b = _left_pad(prompts, pad_token_id, device)
    B, P = b.idx.shape
    if P >= cfg.max_seq_len:
        raise ValueError(f"generate: prompt of {P} tokens leaves no room in the context (max_seq_len={cfg.max_seq_len})")
    if P + max_new_tokens > cfg.max_seq_len:
        warnings.warn(f"generate: max_new_tokens={max_new_tokens} cut to {cfg.max_seq_len - P} to fit the context "
                      f"(prompt {P} + new tokens <= max_seq_len={cfg.max_seq_len})", stacklevel=3)
        max_new_tokens = cfg.max_seq_len - P
    static = use_cache and (compile is True or (compile == "auto" and device.type == "cuda"))
    total = cfg.max_seq_len if static else P + max_new_tokens  # static: one cache size -> CUDA graphs are reused
    slots = torch.arange(total, device=device)
    key_valid = slots[None, :] >= b.pad[:, None]  # (B, total): False on left padding
    prompt_pos = (slots[None, :P] - b.pad[:, None]).clamp(min=0)  # (B, P) position ids
    eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])),
                       dtype=torch.long, device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if use_cache:
                model.setup_cache(B, total, reuse=static)
                logits, _ = model(b.idx, input_pos=slots[:P], position_ids=prompt_pos,
                                  attention_mask=key_valid if b.padded else None, kv_len=P, last_only=True)
                logits = logits[:, -1]
            else:
                seq = b.idx
                logits, _ = model(seq, position_ids=prompt_pos, attention_mask=key_valid[:, :P] if b.padded else None,
                                  last_only=True)
                logits = logits[:, -1]
            decode = _get_compiled_decode() if static else _decode_step
            for step in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, gen)
                if eos.numel():  # finished rows keep feeding padding (their outputs are ignored)
                    nxt = nxt.masked_fill(done, pad_token_id)
                    yield nxt, done
                    done = done | torch.isin(nxt, eos)
                else:
                    yield nxt, done
                if step == max_new_tokens - 1:
                    break
                pos = P + step  # cache slot of the token just sampled
                if use_cache:
                    if static:
                        torch.compiler.cudagraph_mark_step_begin()
                        logits = decode(model, nxt[:, None], slots[pos:pos + 1].clone(), (b.lens + step)[:, None],
                                        key_valid).clone()
                    else:
                        logits, _ = model(nxt[:, None], input_pos=slots[pos:pos + 1],
                                          position_ids=(b.lens + step)[:, None],
                                          attention_mask=key_valid if b.padded else None, kv_len=pos + 1,
                                          last_only=True)
                        logits = logits[:, -1]
                else:
                    seq = torch.cat([seq, nxt[:, None]], dim=1)
                    n = seq.shape[1]
                    logits, _ = model(seq, position_ids=(slots[None, :n] - b.pad[:, None]).clamp(min=0),
                                      attention_mask=key_valid[:, :n] if b.padded else None, last_only=True)
                    logits = logits[:, -1]
    finally:
        if not static:  # the static cache stays for the next call (same addresses -> no CUDA-graph recapture)
            model.clear_cache()
        model.train(was_training)


def stream(model: DecoderLM, prompts: list[list[int]], max_new_tokens: int = 128, *, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Iterable[int] | None = None,
           pad_token_id: int = 0, seed: int | None = None, use_cache: bool = True,
           compile: bool | str = "auto") -> Iterator[list[int | None]]:
    """Yield, per step, each prompt's new token (None once that prompt has produced EOS). Same arguments as
    `generate`; the EOS token itself is yielded, then None."""
    eos_set = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    finished = [False] * len(prompts)
    for nxt, _ in _token_steps(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                               pad_token_id, seed, use_cache, compile):
        out: list[int | None] = []
        for i, t in enumerate(nxt.tolist()):
            out.append(None if finished[i] else t)
            finished[i] = finished[i] or t in eos_set
        yield out
        if all(finished):
            return


def generate(model: DecoderLM, prompts: list[list[int]], max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Iterable[int] | None = None,
             seed: int | None = None, *, pad_token_id: int = 0, use_cache: bool = True, compile: bool | str = "auto",
             include_eos: bool = False, check_every: int = 8) -> list[list[int]]:
    """New tokens for each prompt (token id lists of any lengths, batched with left padding).

    temperature 0 is greedy; top_k / top_p filter before sampling; `seed` makes sampling reproducible.
    Stops a prompt at `eos_token_id` (one id or several; the EOS is dropped unless include_eos) or after
    max_new_tokens (cut to fit max_seq_len). compile: "auto" = static cache + torch.compile on CUDA only.
    """
    eos_set = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    steps: list[Tensor] = []
    for i, (nxt, done) in enumerate(_token_steps(model, prompts, max_new_tokens, temperature, top_k, top_p,
                                                 eos_token_id, pad_token_id, seed, use_cache, compile)):
        steps.append(nxt)
        # checking for "all finished" needs a device sync, so only every few steps
        if eos_set and (i + 1) % check_every == 0 and bool(done.all()):
            break
    tokens = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]  # (B, steps)
    out = []
    for row in tokens:
        for j, t in enumerate(row):
            if t in eos_set:
                row = row[: j + 1] if include_eos else row[:j]
                break
        out.append(row)
    return out
