"""Writes the files of examples/own-data (run: python examples/own-data/make_data.py): a small kitchen-and-timetable
world, in the shapes public datasets come in, for trying the pipeline on data that is not the built-in world's."""
import gzip, json, random
from pathlib import Path

OUT = Path(__file__).resolve().parent
rng = random.Random(7)
FOODS = ["rice", "flour", "sugar", "butter", "oats", "lentils", "pasta", "cheese", "beans", "coffee"]
PEOPLE = ["Ana", "Tom", "Lena", "Omar", "Priya", "Jon", "Mei", "Kofi", "Sara", "Ivan"]
TOWNS = ["Elmford", "Brackwater", "Stonebridge", "Harrowgate", "Millbrook", "Ashby", "Fernhill", "Oakridge"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}

def q_scale():
    food, base, n = rng.choice(FOODS), rng.choice([100, 150, 200, 250, 300]), rng.choice([2, 4])
    k = rng.choice([2, 3])
    return (f"A recipe for {n} people uses {base} grams of {food}. How many grams of {food} are needed for {n * k} people?",
            f"{base * k} grams", f"{base * k + rng.choice([50, 100, -50])} grams")

def q_minutes():
    h = rng.randint(2, 9)
    return f"How many minutes are in {h} hours?", f"{h * 60} minutes", f"{h * 60 + rng.choice([10, 30, -20])} minutes"

def q_grams():
    kg = rng.randint(2, 9)
    return f"How many grams are in {kg} kilograms?", f"{kg * 1000} grams", f"{kg * 100} grams"

def q_train():
    town, start, dur = rng.choice(TOWNS), rng.randint(6, 12), rng.randint(2, 5)
    return (f"The train to {town} leaves at {start} o'clock and the trip takes {dur} hours. When does it arrive?",
            f"At {start + dur} o'clock", f"At {start + dur + 1} o'clock")

def q_cost():
    who, food, n, price = rng.choice(PEOPLE), rng.choice(FOODS), rng.randint(2, 6), rng.randint(2, 9)
    return (f"{who} buys {n} bags of {food} at {price} euros a bag. How much does {who} pay?",
            f"{n * price} euros", f"{n * price + price} euros")

KINDS = [q_scale, q_minutes, q_grams, q_train, q_cost]

def item():
    return rng.choice(KINDS)()

def prose():
    who, town, food = rng.choice(PEOPLE), rng.choice(TOWNS), rng.choice(FOODS)
    h, kg = rng.randint(2, 9), rng.randint(2, 9)
    parts = [
        f"{who} lives in {town} and cooks with {food} most evenings.",
        f"There are sixty minutes in an hour, so {WORDS[h]} hours make {h * 60} minutes.",
        f"A kilogram holds a thousand grams; {WORDS[kg]} kilograms weigh {kg * 1000} grams.",
        f"The market in {town} sells {food} by the bag, and a bag costs {rng.randint(2, 9)} euros.",
        f"When a recipe feeds twice as many people, every amount in it doubles.",
        f"The morning train from {town} is often late when it rains.",
        f"{who} keeps the {food} in a glass jar on the top shelf.",
        f"To scale a recipe, divide each amount by the people it serves and multiply by the people you feed.",
    ]
    rng.shuffle(parts)
    return " ".join(parts[: rng.randint(3, 6)])

def write_jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if gz:
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)

corpus = OUT / "corpus"
corpus.mkdir(parents=True, exist_ok=True)
(corpus / "kitchen-notes.txt").write_text("\n\n".join(prose() for _ in range(1500)) + "\n")
chats = []
for _ in range(800):
    q, a, _ = item()
    chats.append({"text": f"Human: {q}\n\nAssistant: {a}."})
write_jsonl(corpus / "chat-logs.jsonl.gz", chats, gz=True)

seen = set()
def unique(n):
    out = []
    while len(out) < n:
        q, a, w = item()
        if q not in seen:
            seen.add(q); out.append((q, a, w))
    return out

# SFT: Alpaca shape; held-out SFT: conversational messages
write_jsonl(OUT / "sft.jsonl", [{"instruction": q, "input": "", "output": f"{a}."} for q, a, _ in unique(400)])
write_jsonl(OUT / "sft_eval.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{a}."}]}
                                     for q, a, _ in unique(40)])
# preferences: Human/Assistant transcripts (the prompt is the shared beginning); held-out: explicit prompt
def pref(q, a, w):
    bad = rng.choice([f"{w}.", "I am not sure, work it out yourself."])
    return {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}.", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}
write_jsonl(OUT / "preferences.jsonl", [pref(*t) for t in unique(300)])
write_jsonl(OUT / "preferences_eval.jsonl", [{"prompt": q, "chosen": f"{a}.", "rejected": f"{w}."} for q, a, w in unique(40)])
# RL prompts with the answer a program can check; 10 % are held out by hash
write_jsonl(OUT / "rl_prompts.jsonl", [{"prompt": q, "answer": a} for q, a, _ in unique(300)])
