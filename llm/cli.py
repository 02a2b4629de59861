"""`llm-pipeline generate` and `llm-pipeline export`: registered into the console script by flows/cli.py.

REF is a checkpoint folder (ours) or a transformers folder; `resolve_ref` (passed in by the orchestration layer)
also turns MLflow run ids and `models:/name/version` into such a folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint import TOKENIZER_DIR
from llm.device import resolve_device
from llm.hf import load_any
from llm.utils import FLAG_METAVAR, parse_flag

ResolveRef = Callable[[str], Path]


class TextTokenizer:
    """encode/decode/chat with the project's tokenizer, or the bare `tokenizers` file if llm.tokenizer is absent."""

    def __init__(self, folder: Path) -> None:
        self.chat: Callable[[list[dict]], list[int]] | None = None
        try:
            from llm.tokenizer import Tokenizer

            tok = Tokenizer.from_dir(folder)
            self.encode, self.decode = tok.encode, tok.decode
            self.chat = lambda msgs: tok.apply_chat_template(msgs, add_generation_prompt=True)
            raw = tok.token_to_id
        except (ImportError, ValueError):  # no llm.tokenizer, or a foreign tokenizer without our special tokens
            from tokenizers import Tokenizer as RawTokenizer

            raw_tok = RawTokenizer.from_file(str(folder / "tokenizer.json"))
            self.encode = lambda text: raw_tok.encode(text, add_special_tokens=False).ids
            self.decode = lambda ids: raw_tok.decode(list(ids), skip_special_tokens=False)
            raw = raw_tok.token_to_id
        self.bos_id, self.pad_id = raw("<|bos|>"), raw("<|pad|>")
        self.stop_ids = [i for i in (raw("<|eos|>"), raw("<|end|>")) if i is not None]


def tokenizer_folder(model_dir: Path) -> Path | None:
    for cand in (model_dir / TOKENIZER_DIR, model_dir):
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


def cmd_generate(args: argparse.Namespace, resolve_ref: ResolveRef) -> int:
    from llm.generate import stream

    folder = resolve_ref(args.model)
    try:
        device = resolve_device(args.device, "--device")
    except ValueError as e:
        print(f"llm-pipeline generate: error: {e}", file=sys.stderr)
        return 2
    model, cfg = load_any(folder, device=device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    tok_dir = tokenizer_folder(folder)
    if tok_dir is None:
        print(f"llm-pipeline generate: error: no tokenizer.json in {folder} or {folder / TOKENIZER_DIR}; "
              "save the checkpoint with tokenizer_dir=...", file=sys.stderr)
        return 2
    tok = TextTokenizer(tok_dir)
    if args.chat:
        if tok.chat is None:
            print("llm-pipeline generate: error: --chat needs llm.tokenizer", file=sys.stderr)
            return 2
        prompt = tok.chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(args.prompt)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    new: list[int] = []
    shown = ""
    ended = False  # by the model (a stop token), not by --max-new-tokens
    start = time.perf_counter()
    for step in stream(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id or 0, seed=args.seed,
                       compile=args.compile):
        t = step[0]
        if t is None or t in tok.stop_ids:
            ended = t is not None
            break
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            print(text[len(shown):], end="", flush=True)
            shown = text
    elapsed = time.perf_counter() - start
    print(tok.decode(new)[len(shown):])
    print(f"[{len(new)} tokens in {elapsed:.2f}s, {len(new) / max(elapsed, 1e-9):.1f} tok/s, {cfg.family}, "
          f"{device}, {'ended by the model' if ended else 'stopped at --max-new-tokens'}]", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace, resolve_ref: ResolveRef) -> int:
    from llm.checkpoint import save_model
    from llm.hf import export_hf

    folder = resolve_ref(args.model)
    model, _ = load_any(folder)
    tok_dir = Path(args.tokenizer) if args.tokenizer else tokenizer_folder(folder)
    if args.format == "hf":
        out = export_hf(model, args.out, tokenizer_dir=tok_dir)
        if (folder / "README.md").is_file():  # the model card the stage wrote travels with the model
            shutil.copy2(folder / "README.md", out / "README.md")
    else:
        out = save_model(args.out, model, tokenizer_dir=tok_dir)
    print(f"wrote {args.format} model to {out}" + (f" (tokenizer from {tok_dir})" if tok_dir else " (no tokenizer)"))
    return 0


def register(subparsers: Any, resolve_ref: ResolveRef | None = None) -> None:
    """Add `generate` and `export` to an argparse subparsers object; each sets `func(args) -> exit code`."""
    resolve: ResolveRef = resolve_ref or Path
    ref_help = "a checkpoint folder or a transformers model folder (or an MLflow run id / models:/name/version)"

    p = subparsers.add_parser("generate", help="generate text from a model")
    p.add_argument("--model", required=True, metavar="REF", help=ref_help)
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set with this mass")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--compile", type=parse_flag, metavar=FLAG_METAVAR, default="auto",
                   help="static KV cache + torch.compile: auto = on CUDA only; true also pays off on CPU for long "
                   "answers (tiny model: 2-3x the tokens/s after a few seconds of compiling)")
    p.set_defaults(func=lambda a: cmd_generate(a, resolve))

    p = subparsers.add_parser("export", help="export a model to a transformers-native folder")
    p.add_argument("--model", required=True, metavar="REF", help=ref_help)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced atomically)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: the model's own)")
    p.add_argument("--format", choices=("hf", "checkpoint"), default="hf",
                   help="hf: transformers-native (GPT2/Llama/DeepseekV3); checkpoint: this project's format")
    p.set_defaults(func=lambda a: cmd_export(a, resolve))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m llm.cli ...`) for machines without the orchestration layer."""
    parser = argparse.ArgumentParser(prog="python -m llm.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
