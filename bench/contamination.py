"""Throughput of the contamination check (stages.contamination.check): MB of training text scanned per second for
13-word overlaps with evaluation sets, on generated text with a few planted copies (which it must find).

    python -m bench.contamination [--mb 64] [--eval-items 3000] [--json]   (--quick: 8 MB)
"""

from __future__ import annotations

import argparse
import json
import random
import time

from stages.contamination import check

VOCAB = [f"w{i}" for i in range(20_000)]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choices(VOCAB, k=n_words))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=64.0, help="MB of training text")
    p.add_argument("--eval-items", type=int, default=3000, help="evaluation items (20-60 words each)")
    p.add_argument("--quick", action="store_true", help="8 MB")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(argv)
    mb = 8.0 if args.quick else args.mb
    rng = random.Random(0)
    items = [_text(rng, rng.randint(20, 60)) for _ in range(args.eval_items)]
    docs, size, planted = [], 0, set()
    while size < mb * 1e6:
        doc = _text(rng, 300)
        if len(docs) % 1000 == 0:  # a planted 30-word copy of an evaluation item
            planted.add(len(docs) // 1000 % len(items))
            doc += " " + " ".join(items[len(docs) // 1000 % len(items)].split()[:30])
        docs.append(doc)
        size += len(doc.encode())
    t0 = time.perf_counter()
    report = check({"eval": items}, docs, 13)
    seconds = time.perf_counter() - t0
    out = {"mb": size / 1e6, "seconds": seconds, "mb_per_s": size / 1e6 / seconds,
           "eval_items": len(items), "found": report["eval"]["items"], "planted": len(planted)}
    print(f"contamination check: {out['mb']:.1f} MB of training text in {seconds:.1f} s = {out['mb_per_s']:.1f} MB/s "
          f"({len(items)} evaluation items; {out['found']} found of {len(planted)} planted)")
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
