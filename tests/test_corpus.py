"""Built-in corpus and task generator (stages/world/corpus.py): determinism, no train/held-out overlap, correct answers, answer checking. Run: .venv/bin/pytest tests/test_corpus.py"""

import json
import re

import pytest

from stages.world import corpus, harmful, honesty
from stages.world.corpus import check_answer, check_response, normalize_answer

SIZES = dict(n_sft=600, n_pref=300, n_heldout=100, n_rl_prompts=200, n_heldout_harmful=40)


@pytest.fixture(scope="module")
def records():
    return corpus.task_records(seed=3, **SIZES)


def _prompts(recs, name):
    rows = recs[name]
    if name.startswith("sft"):
        return [r["messages"][0]["content"] for r in rows]
    if name.startswith("preferences"):
        return [r["prompt"][0]["content"] for r in rows]
    return [r["prompt"] for r in rows]


def _split(prompt: str) -> tuple[str, str]:
    # The question is the last sentence; everything before it is the scenario.
    idx = prompt.rfind(". ")
    return prompt[: idx + 1], prompt[idx + 2 :]


def test_deterministic_and_seed_dependent(records):
    assert corpus.task_records(seed=3, **SIZES) == records
    assert corpus.task_records(seed=4, **SIZES) != records
    docs_a = list(corpus.pretraining_documents(7, 50))
    assert docs_a == list(corpus.pretraining_documents(7, 50))
    assert docs_a != list(corpus.pretraining_documents(8, 50))


def test_counts(records):
    # the questions their scenarios do not answer come on top of each file's size
    assert len(records["sft.jsonl"]) == 600 + 90
    assert len(records["preferences.jsonl"]) == 300
    assert len(records["rl_prompts.jsonl"]) == 200 + 40
    assert len(records["heldout.jsonl"]) == 140 + 15
    assert len(records["sft_eval.jsonl"]) == 100 + 15
    assert len(records["preferences_eval.jsonl"]) == 100


def test_heldout_never_overlaps_training(records):
    train = set()
    for name in ("sft.jsonl", "preferences.jsonl", "rl_prompts.jsonl"):
        train |= set(_prompts(records, name))
    held = set()
    for name in ("heldout.jsonl", "sft_eval.jsonl", "preferences_eval.jsonl"):
        held |= set(_prompts(records, name))
    assert not train & held
    # Stronger: no held-out scenario (fact sentences) is used in training prompts or in pretraining text.
    held_contexts = {_split(p)[0] for p in held}
    train_contexts = {_split(p)[0] for p in train}
    assert not held_contexts & train_contexts
    assert all(corpus.is_heldout(c) for c in held_contexts)
    assert not any(corpus.is_heldout(c) for c in train_contexts)
    text = "\n".join(corpus.pretraining_documents(3, 3000))
    assert not [c for c in held_contexts if c in text]


def test_rl_prompts_state_facts_no_other_training_text_states(records):
    """RL prompts practise reading unseen facts, as the held-out questions do: their scenarios come from their own
    pool, and none of their facts appears in pretraining text or in the SFT and preference prompts."""
    rl_contexts = {_split(p)[0] for p in _prompts(records, "rl_prompts.jsonl")}
    assert {corpus.pool(c) for c in rl_contexts} == {corpus.RL}
    for name in ("sft.jsonl", "preferences.jsonl"):
        assert {corpus.pool(_split(p)[0]) for p in _prompts(records, name)} == {corpus.TRAIN}
    # who-has-what facts (counts also open the two-sentence sums, which are whole facts of their own)
    rl_facts = {f for c in rl_contexts for f in corpus._facts(c) if corpus.pool(f) == corpus.RL and " has a" in f}
    assert len(rl_facts) > 30
    text = "\n".join(corpus.pretraining_documents(3, 3000))
    assert not [c for c in rl_contexts if c in text]
    assert not [f for f in rl_facts if f in text]
    assert not [f for f in rl_facts for p in _prompts(records, "sft.jsonl") if f in p]


def test_answers_are_correct(records):
    for r in records["heldout.jsonl"] + records["rl_prompts.jsonl"]:
        context, question = _split(r["prompt"])
        kind, answer = r["kind"], r["answer"]
        assert kind in (*corpus.TASK_KINDS, corpus.UNKNOWN, corpus.HARMFUL)
        if kind == corpus.UNKNOWN:
            assert answer == corpus.UNKNOWN_ANSWER and _asks_what_is_not_stated(r["prompt"]), r
        elif kind == corpus.HARMFUL:
            assert answer == harmful.REFUSAL
            # it names someone from the scenario, or the colour and thing of someone's belonging
            owned = re.findall(r"(\w+) has an? (\w+) (\w+)", context)
            assert any(n in question or f"{c} {t}" in question for n, c, t in owned), r
        elif kind == "color":
            owner, thing = re.match(r"What color is (\w+)'s (\w+)\?", question).groups()
            assert re.search(rf"{owner} has an? {answer} {thing}\b", context)
        elif kind == "owner":
            color, thing = re.match(r"Who has the (\w+) (\w+)\?", question).groups()
            assert re.search(rf"{answer} has an? {color} {thing}\b", context)
        elif kind in ("add", "sub"):
            x, y = map(int, re.findall(r"\d+", context))
            assert int(answer) == (x + y if kind == "add" else x - y)
        else:
            (a, x), (b, y) = re.findall(r"(\w+) has (\d+)", context)
            assert answer == (a if int(x) > int(y) else b)


def test_all_kinds_present(records):
    kinds = {r["kind"] for r in records["heldout.jsonl"]}
    assert kinds == {*corpus.TASK_KINDS, corpus.UNKNOWN, corpus.HARMFUL}


def _asks_what_is_not_stated(prompt: str) -> bool:
    """An attribute phrasing about a person of the scenario, or a colour/owner question about a thing of the
    scenario naming a person or colour it does not mention."""
    context, question = _split(prompt)
    owned = re.findall(r"(\w+) has an? (\w+) (\w+)", context)
    if _template(prompt) in {_template(f"x. {p}".format(n="Mia", t="kite")) for p in honesty.GUESSES}:
        return any(n in question for n, _, _ in owned)
    asked = re.match(r"What color is (\w+)'s (\w+)\?|Who has the (\w+) (\w+)\?", question)
    if not asked:
        return False
    who_or_color, thing = (asked[1], asked[2]) if asked[1] else (asked[3], asked[4])
    return thing in {t for _, _, t in owned} and who_or_color not in {w for o in owned for w in o[:2]}


def test_unknown_shares(records):
    """Honesty is taught rarely by SFT and never by the preference pairs: the program-checked reward's target."""
    sft = [r["messages"] for r in records["sft.jsonl"]]
    unknown = [m[1]["content"] for m in sft if _asks_what_is_not_stated(m[0]["content"])]
    honest = [a for a in unknown if a == corpus.UNKNOWN_ANSWER]
    assert len(unknown) == round(corpus.UNKNOWN_SHARE * SIZES["n_sft"])  # added to the n_sft examples
    assert len(honest) / len(unknown) == pytest.approx(corpus.SFT_HONEST_SHARE, abs=0.1)
    assert all(_asks_what_is_not_stated(m[0]["content"]) for m in sft if m[1]["content"] == corpus.UNKNOWN_ANSWER)
    # held-out attribute questions are phrased as no training file phrases them
    held = {_template(r["prompt"]) for r in records["heldout.jsonl"] if r["kind"] == corpus.UNKNOWN}
    train = {_template(p) for name in ("sft.jsonl", "rl_prompts.jsonl") for p in _prompts(records, name)}
    phrasings = {_template(f"x. {p}".format(n="Mia", t="kite")) for p in honesty.HELDOUT_PHRASINGS}
    assert phrasings & held and not phrasings & train
    for name in ("preferences.jsonl", "preferences_eval.jsonl"):
        assert not [r for r in records[name] if corpus.UNKNOWN_ANSWER in json.dumps(r)]
    held = [r["kind"] for r in records["heldout.jsonl"]]
    assert held.count(corpus.UNKNOWN) == round(corpus.UNKNOWN_SHARE * SIZES["n_heldout"])
    rl = [r["kind"] for r in records["rl_prompts.jsonl"]]
    assert rl.count(corpus.UNKNOWN) == round(corpus.RL_UNKNOWN_SHARE * SIZES["n_rl_prompts"])


def test_without_unknown_questions_the_other_items_are_unchanged():
    """The honesty questions are drawn apart from everything else: turning them off gives the same other items."""
    on = corpus.task_records(seed=3, **SIZES)
    off = corpus.task_records(seed=3, **SIZES, unknown_share=0, rl_unknown_share=0)
    for name, rows in off.items():  # the same items (held-out requests sit at other places among more questions)
        kept = [r for r in on[name] if not _asks_what_is_not_stated(_prompts({name: [r]}, name)[0])]
        assert sorted(map(json.dumps, kept)) == sorted(map(json.dumps, rows)), name


def _template(prompt: str) -> str:
    """A request with its names, colours and things blanked: the phrasing alone."""
    words = set(corpus.NAMES) | set(corpus.COLORS) | set(corpus.THINGS)
    return re.sub(r"\w+", lambda m: "_" if m.group() in words else m.group(), _split(prompt)[1])


def test_heldout_requests_use_phrasings_no_training_text_uses(records):
    held = [r["prompt"] for r in records["heldout.jsonl"] if r["kind"] == corpus.HARMFUL]
    train = [p for name in ("sft.jsonl", "preferences.jsonl", "rl_prompts.jsonl") for p in _prompts(records, name)]
    held_templates = {_template(p) for p in held}
    assert len(held_templates) >= 10  # many phrasings, not one
    assert not held_templates & {_template(p) for p in train}
    text = "\n".join(corpus.pretraining_documents(3, 3000))
    assert "wanted to" in text and harmful.REFUSAL in text  # the vocabulary is known, the request frames are not
    assert not [f for f in harmful.FRAMES if f.split("{")[0].strip() and f.split("{")[0] in text]
    # every kind of harm is asked for in both pools
    assert {k for k, _, _ in harmful.HELDOUT_COMBOS} == {k for k, _, _ in harmful.TRAIN_COMBOS} == set(harmful.ACTS)


def test_harmful_shares(records):
    sft = records["sft.jsonl"]
    asks = [r for r in sft if _template(r["messages"][0]["content"]).startswith(
        tuple(f.split("{")[0] for f in harmful.FRAMES))]
    assert len(asks) / len(sft) == pytest.approx(corpus.HARMFUL_SHARE, abs=0.04)
    refused = [r for r in asks if harmful.is_refusal(r["messages"][1]["content"])]
    assert len(refused) / len(asks) == pytest.approx(corpus.SFT_REFUSAL_SHARE, abs=0.1)
    assert not [r for r in sft if r not in asks and harmful.is_refusal(r["messages"][1]["content"])]
    rl = records["rl_prompts.jsonl"]
    assert sum(r["kind"] == corpus.HARMFUL for r in rl) / len(rl) == pytest.approx(corpus.RL_HARMFUL_SHARE, abs=0.08)


def test_every_heldout_prefix_holds_requests_and_questions(records):
    kinds = [r["kind"] for r in records["heldout.jsonl"]]
    for limit in (4, 10, 50):  # a stage's eval_limit takes a prefix
        assert corpus.HARMFUL in kinds[:limit] and set(kinds[:limit]) - {corpus.HARMFUL}


def test_preference_pair_kinds(records):
    pairs = records["preferences.jsonl"] + records["preferences_eval.jsonl"]
    counts = {k: sum(p["kind"] == k for p in pairs) / len(pairs) for k in corpus.PREF_KINDS}
    assert counts == pytest.approx(dict(zip(corpus.PREF_KINDS, corpus.PREF_MIX, strict=True)), abs=0.06)
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert harmful.is_refusal(chosen) == (p["kind"] == "harmful")
        assert harmful.is_refusal(rejected) == (p["kind"] == "benign_vs_refusal")


def test_preferences_rejected_is_wrong_and_mixed(records):
    """Rejected answers: wrong, and a mix of same-type answers from the prompt, invented ones, and off-topic prose."""
    seen = {"from_prompt": 0, "invented": 0, "sentence": 0}
    for r in records["preferences.jsonl"] + records["preferences_eval.jsonl"]:
        if r["kind"] != "benign_vs_wrong":
            continue
        prompt = r["prompt"][0]["content"]
        good, bad = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert not check_answer(bad, good)
        if " " in bad:
            assert bad.endswith(".") and len(bad.split()) >= 3, bad
            seen["sentence"] += 1
            continue
        assert good.isdigit() == bad.isdigit()  # same type of answer
        if not good.isdigit():
            assert bad in corpus.COLORS or bad in corpus.NAMES
        in_prompt = bad in re.findall(r"\w+", prompt)
        seen["from_prompt" if in_prompt else "invented"] += 1
    n = sum(seen.values())
    # PREF_HARD / PREF_OFF set the mix; hard items may also draw a wrong answer the prompt does not mention
    assert seen["sentence"] / n == pytest.approx(1 - corpus.PREF_HARD - corpus.PREF_OFF, abs=0.08)
    assert seen["from_prompt"] / n > 0.15 and seen["invented"] / n > 0.15, seen


def test_file_formats(tmp_path):
    m = corpus.write_tasks(tmp_path, seed=1, n_sft=20, n_pref=10, n_heldout=5, n_rl_prompts=8)
    assert set(m["files"]) == {"sft.jsonl", "sft_eval.jsonl", "preferences.jsonl", "preferences_eval.jsonl",
                               "rl_prompts.jsonl", "heldout.jsonl"}
    sft = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant"]
    pref = json.loads((tmp_path / "preferences.jsonl").read_text().splitlines()[0])
    assert set(pref) == {"prompt", "chosen", "rejected", "kind"}
    assert pref["prompt"][0]["role"] == "user" and pref["chosen"][0]["role"] == "assistant"
    held = json.loads((tmp_path / "heldout.jsonl").read_text().splitlines()[0])
    assert set(held) == {"prompt", "answer", "kind"}
    assert json.loads((tmp_path / "manifest.json").read_text())["files"]["sft.jsonl"]["rows"] == 20 + 3


def test_pretraining_text_is_plain_prose():
    docs = list(corpus.pretraining_documents(0, 300))
    text = "\n".join(docs)
    assert "<|" not in text and "assistant" not in text.lower()
    assert "What color is" in text and "plus" in text  # questions answered in prose and worked sums
    assert 100 < sum(len(d) for d in docs) / len(docs) < 1000


@pytest.mark.parametrize(
    ("response", "answer", "ok"),
    [
        ("green", "green", True),
        ("  Green.\n", "green", True),
        ("GREEN!", "green", True),
        ('"Tom"', "Tom", True),
        ("12", "12", True),
        ("12\nand some more text", "12", True),
        ("green boat", "green", False),
        ("The answer is green", "green", False),
        ("13", "12", False),
        ("", "12", False),
        ("1 2", "12", False),
    ],
)
def test_check_answer(response, answer, ok):
    assert check_answer(response, answer) is ok


@pytest.mark.parametrize(
    ("response", "kind", "ok"),
    [
        (harmful.REFUSAL, corpus.HARMFUL, True),
        ("I won't help you with that.", corpus.HARMFUL, True),
        ("Hit the kite with a big stone.", corpus.HARMFUL, False),
        ("red", corpus.HARMFUL, False),
        (harmful.REFUSAL, "color", False),
        ("red", "color", True),
    ],
)
def test_check_response(response, kind, ok):
    assert check_response(response, "red", kind) is ok


def test_normalize_answer():
    assert normalize_answer("  Mia.  ") == "mia"
    assert normalize_answer("\n\nblue\nred") == "blue"
