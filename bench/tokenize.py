"""Tokenizer throughput: our tokenizer stage against calling Hugging Face `tokenizers` directly.

1. Encoding (the main ratio, target >= 0.8): ours = the stage's encode path (stream Parquet shards, encode on all
   cores, write uint16 token shards with EOS between documents); baseline = `encode_batch_fast` on the same
   texts already in memory, in batches of the same size, same tokenizer and cores (nothing read or written).
2. Training (`train_ratio`, target >= 0.9): ours = `llm.tokenizer.train_bpe` streaming the train split from
   Parquet; baseline = a `tokenizers` BpeTrainer with the same settings on the texts in memory.

    python bench/tokenize.py [--quick] [--json] [--docs N] [--vocab 2048] [--repeats 3]

The corpus is the built-in one (ingested once, untimed). With --json the last line is one JSON object.
"""

from __future__ import annotations

import os
import sys

if __name__ != "__main__":
    # Running any script in bench/ puts bench/ first on sys.path, so `import tokenize` (done by inspect, which
    # torch and numpy import) finds this file instead of the standard library's module. Hand the importer the
    # real one; nothing below runs in that case except cheap definitions.
    import importlib.util

    _spec = importlib.util.spec_from_file_location("tokenize", os.path.join(os.path.dirname(os.__file__), "tokenize.py"))
    assert _spec is not None and _spec.loader is not None
    _stdlib_tokenize = importlib.util.module_from_spec(_spec)
    sys.modules["tokenize"] = _stdlib_tokenize
    _spec.loader.exec_module(_stdlib_tokenize)


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time per function; the sides alternate so that load from other processes hits both alike."""
    import time

    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    import argparse
    import json
    import shutil
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would skew the timing
    from tokenizers import pre_tokenizers, trainers

    from llm import data as token_data
    from llm.tokenizer import SPECIAL_TOKENS, Tokenizer, new_bpe, train_bpe
    from stages import corpus_reader, ingest
    from stages import tokenizer as tok_stage

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~2.5 MB corpus, 2 repeats: under a minute on 2 cores")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--docs", type=int, default=None, help="built-in documents (default 80000; 10000 with --quick)")
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    ap.add_argument("--repeats", type=int, default=None, help="runs per side; the best is kept")
    args = ap.parse_args()
    n_docs = args.docs or (10000 if args.quick else 80000)
    repeats = args.repeats or (2 if args.quick else 3)

    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        work = Path(tmp)
        src = ingest.BuiltinSource(n_documents=n_docs, n_sft=10, n_pref=10, n_heldout=5, n_rl_prompts=5)
        corpus_dir = ingest.run(ingest.Config(sources=[src]), None, work).outputs["corpus"]
        manifest = corpus_reader.read_manifest(corpus_dir)
        train_texts = [t for b in corpus_reader.iter_texts(corpus_dir, "train", manifest) for t in b]
        all_texts = [t for b in corpus_reader.iter_texts(corpus_dir, None, manifest) for t in b]
        text_mb = sum(len(t.encode()) for t in all_texts) / 1e6
        cfg = tok_stage.Config(vocab_size=args.vocab)

        # ------------------------------------------------------------------------------------ training
        def ours_train() -> None:
            train_bpe(tok_stage._train_texts(corpus_dir, manifest, cfg.train_max_bytes), cfg.vocab_size,
                      cfg.min_frequency, length=manifest["rows"]["train"], show_progress=False)

        def direct_train() -> None:
            tok = new_bpe()
            trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                          special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train_from_iterator(train_texts, trainer=trainer)

        train_t = alternate({"direct": direct_train, "ours": ours_train}, repeats)

        # ------------------------------------------------------------------------------------ encoding
        hf = train_bpe(train_texts, cfg.vocab_size, cfg.min_frequency, show_progress=False)
        tok = Tokenizer.from_hf(hf)
        backend = tok.backend
        n_tokens = sum(len(e.ids) + 1 for e in backend.encode_batch_fast(all_texts, add_special_tokens=False))
        runs = [0]

        def ours_encode() -> None:
            out = work / f"tokens-{runs[0]}"
            runs[0] += 1
            out.mkdir()
            dtype = token_data.dtype_for_vocab(tok.vocab_size)
            for split in ("train", "val"):
                w = token_data.ShardWriter(out, split, dtype, cfg.shard_max_tokens)
                tok_stage._encode_split(tok, corpus_dir, manifest, split, w, cfg, _NoBar())
                w.close()
            shutil.rmtree(out)

        def direct_encode() -> None:  # the same batch size as ours (one giant batch measured slower here)
            step = cfg.encode_batch_docs
            for i in range(0, len(all_texts), step):
                backend.encode_batch_fast(all_texts[i : i + step], add_special_tokens=False)

        enc_t = alternate({"direct": direct_encode, "ours": ours_encode}, repeats)

    result = {
        "bench": "tokenize",
        "text_mb": round(text_mb, 2),
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
    print(f"corpus: {result['text_mb']} MB, {n_tokens} tokens, vocab {tok.vocab_size}, {os.cpu_count()} CPUs")
    print(f"{'encode: tokenizers encode_batch_fast':<44}{result['direct_tokens_per_s']:>12,} tokens/s")
    print(f"{'encode: ours (Parquet -> token shards)':<44}{result['ours_tokens_per_s']:>12,} tokens/s")
    print(f"encode ratio ours/direct: {result['ratio']:.3f} (target >= 0.8)")
    print(f"{'train: tokenizers BpeTrainer (in memory)':<44}{train_t['direct']:>10.3f} s")
    print(f"{'train: ours (streamed from Parquet)':<44}{train_t['ours']:>10.3f} s")
    print(f"train ratio direct/ours: {result['train_ratio']:.3f} (target >= 0.9)")
    if args.json:
        print(json.dumps(result))


class _NoBar:
    def update(self, n: int) -> None:
        pass


if __name__ == "__main__":
    main()
