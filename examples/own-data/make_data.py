"""Writes the files of examples/own-data (run: python examples/own-data/make_data.py): a small kitchen-and-timetable
world, in the shapes public datasets come in, for trying the pipeline on data that is not the built-in world's.

Every question appears in one file only, so no held-out question is in any training text (the contamination
check finds none)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent
rng = random.Random(7)
FOODS = ["rice", "flour", "sugar", "butter", "oats", "lentils", "pasta", "cheese", "beans", "coffee"]
PEOPLE = ["Ana", "Tom", "Lena", "Omar", "Priya", "Jon", "Mei", "Kofi", "Sara", "Ivan"]
TOWNS = ["Elmford", "Brackwater", "Stonebridge", "Harrowgate", "Millbrook", "Ashby", "Fernhill", "Oakridge"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


# Questions of at most 12 words: a question shorter than the contamination check's 13 words is one n-gram of its
# own length, so only its exact copy counts, and none is copied between files.
def q_scale() -> tuple[str, str, str]:
    food, base, n, k = rng.choice(FOODS), rng.choice([100, 150, 200, 250, 300]), rng.choice([2, 4]), rng.choice([2, 3])
    return (f"A recipe for {n} uses {base} g of {food}. {food.capitalize()} for {n * k}?", f"{base * k} g",
            f"{base * k + rng.choice([50, 100, -50])} g")


def q_minutes() -> tuple[str, str, str]:
    h = rng.randint(2, 9)
    return f"How many minutes are in {h} hours?", f"{h * 60} minutes", f"{h * 60 + rng.choice([10, 30, -20])} minutes"


def q_grams() -> tuple[str, str, str]:
    kg = rng.randint(2, 9)
    return f"How many grams are in {kg} kilograms?", f"{kg * 1000} grams", f"{kg * 100} grams"


def q_train() -> tuple[str, str, str]:
    town, start, dur = rng.choice(TOWNS), rng.randint(6, 12), rng.randint(2, 5)
    return (f"Leaving {town} at {start} o'clock, a {dur} hour trip arrives when?", f"At {start + dur} o'clock",
            f"At {start + dur + 1} o'clock")


def q_cost() -> tuple[str, str, str]:
    who, food, n, price = rng.choice(PEOPLE), rng.choice(FOODS), rng.randint(2, 6), rng.randint(2, 9)
    return f"{who} buys {n} bags of {food} at {price} euros each. Total?", f"{n * price} euros", \
        f"{n * price + price} euros"


KINDS = [q_scale, q_minutes, q_grams, q_train, q_cost]
seen: set[str] = set()


def unique(n: int) -> list[tuple[str, str, str]]:
    out = []
    for _ in range(100 * n):
        q, a, w = rng.choice(KINDS)()
        if q not in seen:
            seen.add(q)
            out.append((q, a, w))
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} new questions left")


def prose() -> str:
    who, town, food = rng.choice(PEOPLE), rng.choice(TOWNS), rng.choice(FOODS)
    h, kg = rng.randint(2, 9), rng.randint(2, 9)
    parts = [
        f"{who} lives in {town} and cooks with {food} most evenings.",
        f"There are sixty minutes in an hour, so {WORDS[h]} hours make {h * 60} minutes.",
        f"A kilogram holds a thousand grams; {WORDS[kg]} kilograms weigh {kg * 1000} grams.",
        f"The market in {town} sells {food} by the bag, and a bag costs {rng.randint(2, 9)} euros.",
        "When a recipe feeds twice as many people, every amount in it doubles.",
        f"The morning train from {town} is often late when it rains.",
        f"{who} keeps the {food} in a glass jar on the top shelf.",
        "To scale a recipe, divide each amount by the people it serves and multiply by the people you feed.",
    ]
    rng.shuffle(parts)
    return " ".join(parts[: rng.randint(3, 6)])


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def pair(q: str, a: str, w: str) -> dict:
    """A preference pair as a public human-preference dataset stores it: two Human/Assistant transcripts."""
    bad = rng.choice([f"{w}.", "I am not sure, work it out yourself."])
    return {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}.", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}


def main() -> None:
    # held-out sets first: SFT held out as conversational `messages`, preference pairs with an explicit prompt
    write_jsonl(OUT / "sft_eval.jsonl", [{"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": f"{a}."}]}
                                         for q, a, _ in unique(40)])
    write_jsonl(OUT / "preferences_eval.jsonl", [{"prompt": q, "chosen": f"{a}.", "rejected": f"{w}."}
                                                 for q, a, w in unique(40)])
    write_jsonl(OUT / "sft.jsonl", [{"instruction": q, "input": "", "output": f"{a}."} for q, a, _ in unique(400)])
    write_jsonl(OUT / "preferences.jsonl", [pair(*t) for t in unique(300)])
    # RL prompts with the answer a program can check; 10 % are held out by hash
    write_jsonl(OUT / "rl_prompts.jsonl", [{"prompt": q, "answer": a} for q, a, _ in unique(300)])
    corpus = OUT / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "kitchen-notes.txt").write_text("\n\n".join(prose() for _ in range(1500)) + "\n")
    write_jsonl(corpus / "chat-logs.jsonl.gz", [{"text": f"Human: {q}\n\nAssistant: {a}."} for q, a, _ in unique(600)],
                gz=True)


if __name__ == "__main__":
    main()
