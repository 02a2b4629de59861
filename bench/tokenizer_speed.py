"""Tokenizer throughput: our tokenizer stage against calling Hugging Face `tokenizers` directly.

1. Encoding (the main ratio, target >= 0.8): ours = the stage's encode path (stream Parquet shards, encode on all
   cores, write uint16 token shards with EOS between documents); baseline = `encode_batch_fast` on the same
   texts already in memory, in batches of the same size, same tokenizer and cores (nothing read or written).
2. Training (`train_ratio`, target >= 0.9): ours = `llm.tokenizer.train_bpe` streaming the train split from
   Parquet; baseline = a `tokenizers` BpeTrainer with the same settings on the texts in memory.

    python -m bench.tokenizer_speed [--quick] [--json] [--docs N] [--vocab 2048] [--repeats 3]

The corpus is the built-in one (ingested once, untimed). With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would skew the timing

from tokenizers import pre_tokenizers, trainers

from bench.common import add_repeat_args, alternate
from llm import data as token_data
from llm.tokenizer import SPECIAL_TOKENS, Tokenizer, new_bpe, train_bpe
from stages import ingest
from stages import tokenizer as tok_stage
from stages.data import corpus_reader


class _NoBar:
    def update(self, n: int) -> None:
        pass


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_repeat_args(ap, "~2.5 MB corpus, 2 repeats: under a minute on 2 cores")
    ap.add_argument("--docs", type=int, default=None, help="built-in documents (default 80000; 10000 with --quick)")
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    return ap.parse_args()


def time_training(corpus_dir: Path, manifest: dict, train_texts: list[str], cfg: Any, repeats: int) -> dict:
    """Best seconds of our streamed `train_bpe` and of a BpeTrainer on the texts in memory."""

    def ours() -> None:
        train_bpe(tok_stage.train_texts(corpus_dir, manifest, cfg.train_max_bytes), cfg.vocab_size,
                  cfg.min_frequency, length=manifest["rows"]["train"], show_progress=False)

    def direct() -> None:
        tok = new_bpe()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(train_texts, trainer=trainer)

    return alternate({"direct": direct, "ours": ours}, repeats)


def time_encoding(tok: Tokenizer, corpus_dir: Path, manifest: dict, all_texts: list[str], cfg: Any, work: Path,
                  repeats: int) -> dict:
    """Best seconds of the stage's encode path (Parquet -> token shards) and of encode_batch_fast in memory."""
    out = work / "tokens"

    def ours() -> None:
        out.mkdir()
        dtype = token_data.dtype_for_vocab(tok.vocab_size)
        for split in ("train", "val"):
            w = token_data.ShardWriter(out, split, dtype, cfg.shard_max_tokens)
            tok_stage.encode_split(tok, corpus_dir, manifest, split, w, cfg, _NoBar())
            w.close()
        shutil.rmtree(out)

    def direct() -> None:  # the same batch size as ours (one giant batch measured slower here)
        step = cfg.encode_batch_docs
        for i in range(0, len(all_texts), step):
            tok.backend.encode_batch_fast(all_texts[i : i + step], add_special_tokens=False)

    return alternate({"direct": direct, "ours": ours}, repeats)


def report(result: dict[str, Any], as_json: bool) -> None:
    print(f"corpus: {result['text_mb']} MB, {result['tokens']} tokens, vocab {result['vocab']}, {os.cpu_count()} CPUs")
    print(f"{'encode: tokenizers encode_batch_fast':<44}{result['direct_tokens_per_s']:>12,} tokens/s")
    print(f"{'encode: ours (Parquet -> token shards)':<44}{result['ours_tokens_per_s']:>12,} tokens/s")
    print(f"encode ratio ours/direct: {result['ratio']:.3f} (target >= 0.8)")
    print(f"{'train: tokenizers BpeTrainer (in memory)':<44}{result['direct_train_s']:>10.3f} s")
    print(f"{'train: ours (streamed from Parquet)':<44}{result['ours_train_s']:>10.3f} s")
    print(f"train ratio direct/ours: {result['train_ratio']:.3f} (target >= 0.9)")
    if as_json:
        print(json.dumps(result))


def main() -> None:
    args = parse_args()
    n_docs = args.docs or (10000 if args.quick else 80000)
    repeats = args.repeats or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        work = Path(tmp)
        src = ingest.BuiltinSource(n_documents=n_docs, n_sft=10, n_pref=10, n_heldout=5, n_rl_prompts=5)
        corpus_dir = ingest.run(ingest.Config(sources=[src]), None, work).outputs["corpus"]
        manifest = corpus_reader.read_manifest(corpus_dir)
        train_texts = [t for b in corpus_reader.iter_texts(corpus_dir, "train", manifest) for t in b]
        all_texts = [t for b in corpus_reader.iter_texts(corpus_dir, None, manifest) for t in b]
        cfg = tok_stage.Config(vocab_size=args.vocab)
        train_t = time_training(corpus_dir, manifest, train_texts, cfg, repeats)
        tok = Tokenizer.from_hf(train_bpe(train_texts, cfg.vocab_size, cfg.min_frequency, show_progress=False))
        n_tokens = sum(len(e.ids) + 1 for e in tok.backend.encode_batch_fast(all_texts, add_special_tokens=False))
        enc_t = time_encoding(tok, corpus_dir, manifest, all_texts, cfg, work, repeats)
    result = {
        "bench": "tokenize",
        "text_mb": round(sum(len(t.encode()) for t in all_texts) / 1e6, 2),
        "tokens": n_tokens,
        "vocab": tok.vocab_size,
        "cpus": os.cpu_count(),
        "direct_tokens_per_s": round(n_tokens / enc_t["direct"]),
        "ours_tokens_per_s": round(n_tokens / enc_t["ours"]),
        "ratio": round(enc_t["direct"] / enc_t["ours"], 3),
        "target": 0.8,
        "direct_train_s": round(train_t["direct"], 3),
        "ours_train_s": round(train_t["ours"], 3),
        "train_ratio": round(train_t["direct"] / train_t["ours"], 3),
        "train_target": 0.9,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
