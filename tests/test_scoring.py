"""Post-training evaluation (stages/posttrain/scoring.py) and data loading (stages/data/chat_data.py); run: pytest tests/test_evaluate.py"""

from __future__ import annotations

import json

import pytest
import torch
from posttrain_helpers import make_model, make_tasks, make_tokenizer

from stages.common import StageError
from stages.data import chat_data, task_data
from stages.posttrain.scoring import (
    Generation,
    evaluate_exact_match,
    exact_match,
    generate,
    load_causal_lm,
    load_heldout,
    reward_scores,
    scored_sequences,
    sequence_kl,
)


def _ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tasks = make_tasks(root, n_train=16, n_eval=10)
    tok = make_tokenizer(root / "tok", tasks)
    make_model(root / "base", tok, seed=0)
    make_model(root / "other", tok, seed=1)
    return root, tasks


def test_batched_left_padded_greedy_equals_one_by_one(setup):
    root, tasks = setup
    model, tok = load_causal_lm(root / "base", "cpu")
    prompts = [it["prompt"] for it in load_heldout(tasks)]
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_size=16)
    single = [generate(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert len({len(g.prompt_ids) for g in batched}) > 1, "prompts of different lengths exercise the padding"
    assert [g.response_ids for g in batched] == [g.response_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    # each result belongs to its own prompt (sorting by length must not shuffle them)
    assert [g.prompt_ids for g in batched] == [_ids(tok, p, add_generation_prompt=True) for p in prompts]


def test_exact_match_scores_by_check_answer(setup):
    root, tasks = setup
    items = [it for it in load_heldout(tasks) if it["kind"] != "harmful"][:4]  # questions only
    gens = [Generation([1], [], text=items[0]["answer"] + ".", stopped=True),  # punctuation is normalised away
            Generation([1], [], text="wrong", stopped=True),
            Generation([1], [], text=items[2]["answer"].upper(), stopped=True),
            Generation([1], [], text="", stopped=False)]
    metrics, rows = exact_match(None, None, items, generations=gens)
    assert metrics["eval/exact_match"] == pytest.approx(0.5)
    assert [r["correct"] for r in rows] == [True, False, True, False]
    assert rows[1]["expected"] == items[1]["answer"] and rows[1]["response"] == "wrong"


def test_refusal_rates_and_exact_match_on_benign_questions_only(setup):
    from stages.world.harmful import REFUSAL

    root, tasks = setup
    items = load_heldout(tasks)
    benign = [it for it in items if it["kind"] != "harmful"][:4]
    asks = [it for it in items if it["kind"] == "harmful"][:2]
    assert len(benign) == 4 and len(asks) == 2
    texts = [benign[0]["answer"], REFUSAL, benign[2]["answer"], "wrong", REFUSAL, "Hit the kite with a big stone."]
    gens = [Generation([1], [], text=t, stopped=True) for t in texts]
    metrics, rows = exact_match(None, None, benign + asks, generations=gens)
    assert metrics["eval/exact_match"] == pytest.approx(0.5)  # 2 of the 4 questions; requests do not count
    assert metrics["eval/refusal_rate/harmful"] == pytest.approx(0.5)
    assert metrics["eval/refusal_rate/benign"] == pytest.approx(0.25)
    assert [r["correct"] for r in rows[4:]] == [True, False]  # a request is answered well by declining
    without_asks, _ = exact_match(None, None, benign, generations=gens[:4])
    assert "eval/refusal_rate/harmful" not in without_asks


def test_evaluate_exact_match_from_folder(setup):
    root, tasks = setup
    metrics, rows = evaluate_exact_match(root / "base", tasks, limit=3, max_new_tokens=4)
    assert len(rows) == 3
    assert set(rows[0]) >= {"prompt", "response", "expected", "correct", "kind"}
    assert 0.0 <= metrics["eval/exact_match"] <= 1.0
    with pytest.raises(StageError, match="heldout.jsonl"):
        evaluate_exact_match(root / "base", root / "tok")


def test_reward_scores_are_padding_invariant_and_read_the_last_token(setup):
    from transformers import AutoModelForSequenceClassification

    root, tasks = setup
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(root / "base"), num_labels=1)
    _, tok = load_causal_lm(root / "base", "cpu")
    pairs = [(it["prompt"], it["answer"]) for it in load_heldout(tasks)]
    batched = reward_scores(rm, tok, pairs, batch_size=64)
    single = [reward_scores(rm, tok, [p], batch_size=1)[0] for p in pairs]
    assert batched == pytest.approx(single, abs=1e-5)
    ids = _ids(tok, pairs[0][0] + [{"role": "assistant", "content": pairs[0][1]}])
    assert ids[-1] == tok.eos_token_id  # the score is read at the end of the assistant turn
    with torch.no_grad():
        manual = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert batched[0] == pytest.approx(manual, abs=1e-5)


def test_generated_answers_are_scored_like_the_reward_models_training_pairs(setup):
    """Generation stops at <|end|>; the reward model was trained on template renderings ending <|end|><|eos|> and
    reads the last token, so a finished answer must be scored on exactly that rendering."""
    root, tasks = setup
    _, tok = load_causal_lm(root / "base", "cpu")
    prompt = load_heldout(tasks)[0]["prompt"]
    head = _ids(tok, prompt, add_generation_prompt=True)
    answer = list(tok.encode("seven", add_special_tokens=False))
    end = tok.convert_tokens_to_ids("<|end|>")
    rendered = _ids(tok, prompt + [{"role": "assistant", "content": "seven"}])
    finished = [Generation(head, answer + [end], "seven", stopped=True),
                Generation(head, answer + [tok.eos_token_id], "seven", stopped=True)]
    assert scored_sequences(tok, finished) == [rendered, rendered]
    assert rendered[-2:] == [end, tok.eos_token_id]
    cut_off = Generation(head, answer, "seven", stopped=False)  # hit max_new_tokens: nothing is invented for it
    assert scored_sequences(tok, [cut_off]) == [head + answer]


def test_sequence_kl_zero_for_same_model_positive_otherwise(setup):
    root, tasks = setup
    model, tok = load_causal_lm(root / "base", "cpu")
    other, _ = load_causal_lm(root / "other", "cpu")
    gens = generate(model, tok, [it["prompt"] for it in load_heldout(tasks)], max_new_tokens=6)
    same = sequence_kl(model, model, gens, tok.pad_token_id)
    diff = sequence_kl(model, other, gens, tok.pad_token_id)
    assert max(abs(x) for x in same) < 1e-5
    assert min(diff) > 0


def test_chat_data_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": "A2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    got = chat_data.load_chat(tmp_path / "d.parquet")
    assert got[0] == {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]}
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert chat_data.load_chat(tmp_path / "saved") == got
    prefs = chat_data.preference_records([{"prompt": "Q", "chosen": "good", "rejected": "bad"}], "x")
    assert prefs[0]["chosen"] == [{"role": "assistant", "content": "good"}]


@pytest.mark.parametrize(
    ("content", "loader", "match"),
    [
        ("", chat_data.load_chat, "empty"),
        ('{"text": "hi"}\n', chat_data.load_chat, r"columns \['text'\] is no chat \(SFT\) shape .* alpaca"),
        ('{"prompt": "q", "chosen": "a"}\n', chat_data.load_preferences, r"\['rejected'\]"),
        ('{"prompt": "q", "chosen": "a", "rejected": "a"}\n', chat_data.load_preferences, "identical"),
        ('{"answer": "1"}\n', chat_data.load_prompts, r"columns \['answer'\] is no prompt shape"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', chat_data.load_chat, "no assistant"),
        ('{"messages": [{"role": "bot", "content": "q"}]}\n', chat_data.load_chat, "unknown role"),
        ("{not json\n", chat_data.load_chat, r"d\.jsonl:1 is not valid JSON"),
    ],
)
def test_bad_datasets_name_the_problem(tmp_path, content, loader, match):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(StageError, match=match):
        loader(path)


def test_missing_sources_are_clear(tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        chat_data.read_records(tmp_path / "nope.jsonl")
    with pytest.raises(StageError, match="sft.jsonl"):
        task_data.load("sft", None, None, tmp_path)
    with pytest.raises(StageError, match="sft.dataset is empty and there is no built-in task data"):
        task_data.load("sft", None, None, None)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(StageError, match="unsupported file type"):
        chat_data.read_records(tmp_path / "x.csv")
    assert json.loads(json.dumps(chat_data.subsample(range(5), 2))) == [0, 1]
