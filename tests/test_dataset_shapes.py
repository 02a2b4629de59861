"""The format layer (stages/data/chat_data.py, stages/data/dataset_files.py): every dataset shape public data comes in
normalises to the same records as the project's own conversational rows; column maps; compressed and globbed files;
and the public datasets the GPU configs name, read offline from fixtures of their shape.
Run: .venv/bin/pytest tests/test_dataset_shapes.py"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest
import yaml

from stages.common import StageError
from stages.data import chat_data
from stages.data.chat_data import DatasetRef, load_chat, load_preferences, load_prompts

ROOT = Path(__file__).resolve().parents[1]
QA = [("What is 2 + 3?", "5"), ("Name a red fruit.", "A cherry."), ("Translate 'chat' to English.", "Cat.")]
SYSTEM = "You answer briefly."


def _jsonl(path: Path, rows: list[dict], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _messages(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_every_chat_shape_normalises_to_the_same_messages(tmp_path):
    expected = load_chat(_jsonl(tmp_path / "messages.jsonl", [{"messages": _messages(q, a)} for q, a in QA]))
    shapes = {
        "prompt_completion": [{"prompt": q, "completion": a} for q, a in QA],
        "alpaca": [{"instruction": q, "input": "", "output": a} for q, a in QA],
        "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA],
        "transcript": [{"text": f"\n\nHuman: {q}\n\nAssistant: {a}"} for q, a in QA],
    }
    for name, rows in shapes.items():
        assert load_chat(_jsonl(tmp_path / f"{name}.jsonl", rows)) == expected, name
    # Alpaca's `input` joins the instruction; ShareGPT's system turn is kept
    got = chat_data.chat_records([{"instruction": "Add.", "input": "2 and 3", "output": "5"}], "x")
    assert got[0]["messages"][0] == {"role": "user", "content": "Add.\n\n2 and 3"}
    convo = [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    assert chat_data.chat_records([{"conversations": convo}], "x")[0]["messages"][0] == {"role": "system",
                                                                                       "content": SYSTEM}


def test_every_preference_shape_normalises_to_the_same_pairs(tmp_path):
    explicit = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
                 "rejected": [{"role": "assistant", "content": "I don't know."}]} for q, a in QA]
    expected = load_preferences(_jsonl(tmp_path / "explicit.jsonl", explicit))
    shapes = {
        # TRL's implicit prompt: whole conversations sharing the user turn
        "implicit": [{"chosen": _messages(q, a), "rejected": _messages(q, "I don't know.")} for q, a in QA],
        # public human-preference transcripts: the prompt is the shared beginning
        "transcript": [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}",
                        "rejected": f"\n\nHuman: {q}\n\nAssistant: I don't know."} for q, a in QA],
        # strings with an explicit prompt
        "strings": [{"prompt": q, "chosen": a, "rejected": "I don't know."} for q, a in QA],
        # an explicit prompt that the answers' conversations repeat (as some binarised datasets store them)
        "repeated": [{"prompt": q, "chosen": _messages(q, a), "rejected": _messages(q, "I don't know.")}
                     for q, a in QA],
    }
    for name, rows in shapes.items():
        assert load_preferences(_jsonl(tmp_path / f"{name}.jsonl", rows)) == expected, name
    # a multi-turn transcript: the prompt is every turn before the answers differ
    two = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 + 3?\n\nAssistant: "
    pair = chat_data.preference_records([{"chosen": two + "5", "rejected": two + "6"}], "x")[0]
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"]
    assert pair["chosen"] == [{"role": "assistant", "content": "5"}]


def test_every_prompt_shape_normalises_to_the_same_prompts(tmp_path):
    expected = load_prompts(_jsonl(tmp_path / "prompt.jsonl", [{"prompt": q} for q, _ in QA]))
    shapes = {
        "messages": [{"prompt": [{"role": "user", "content": q}]} for q, _ in QA],  # TRL's conversational prompt
        "chat": [{"messages": _messages(q, a)} for q, a in QA],  # the answer is what the policy writes
        "alpaca": [{"instruction": q, "output": a} for q, a in QA],
        "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA],
        "transcript": [{"prompt": f"\n\nHuman: {q}\n\nAssistant:"} for q, _ in QA],
        "pairs": [{"chosen": _messages(q, a), "rejected": _messages(q, "no")} for q, a in QA],
    }
    for name, rows in shapes.items():
        assert load_prompts(_jsonl(tmp_path / f"{name}.jsonl", rows)) == expected, name


def test_a_column_map_reads_an_unknown_shape_and_without_one_the_error_names_what_it_found(tmp_path):
    rows = [{"question": q, "reply": a} for q, a in QA]
    path = _jsonl(tmp_path / "qa.jsonl", rows)
    expected = load_chat(_jsonl(tmp_path / "m.jsonl", [{"messages": _messages(q, a)} for q, a in QA]))
    mapped = DatasetRef(path=str(path), format="prompt_completion", columns={"prompt": "question", "completion": "reply"})
    assert load_chat(mapped) == expected
    assert load_chat(DatasetRef(path=str(path), columns={"instruction": "question", "output": "reply"})) == expected
    with pytest.raises(StageError, match=r"columns \['question', 'reply'\] is no chat \(SFT\) shape .*messages "
                                         r"\(messages\); sharegpt \(conversations\).*alpaca \(instruction \+ output\)"):
        load_chat(path)
    with pytest.raises(StageError, match=r"format 'alpaca' needs column\(s\) \['instruction', 'output'\]"):
        load_chat(DatasetRef(path=str(path), format="alpaca"))
    # a config names a dataset by a plain string or by the mapping
    assert DatasetRef.model_validate("x.jsonl") == DatasetRef(path="x.jsonl")


@pytest.mark.parametrize(("suffix", "opener"), [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_and_globbed_dataset_files(tmp_path, suffix, opener):
    rows = [{"instruction": q, "output": a} for q, a in QA]
    plain = load_chat(_jsonl(tmp_path / "plain.jsonl", rows))
    for i in range(2):
        _jsonl(tmp_path / f"part-{i}.jsonl{suffix}", rows, opener)
    assert load_chat(tmp_path / f"part-0.jsonl{suffix}") == plain
    assert load_chat(str(tmp_path / f"part-*.jsonl{suffix}")) == plain + plain  # a glob: its files in sorted order
    broken = tmp_path / f"broken.jsonl{suffix}"
    broken.write_bytes((tmp_path / f"part-0.jsonl{suffix}").read_bytes()[:-12])
    with pytest.raises(StageError, match=r"broken\.jsonl.*damaged after line \d"):
        load_chat(broken)
    with pytest.raises(StageError, match="matches no"):
        load_chat(str(tmp_path / "nothing-*.jsonl"))


def test_the_gpu_configs_public_datasets_read_offline_from_fixtures_of_their_shape(tmp_path):
    """UltraChat 200k (`prompt`, `prompt_id`, `messages`), Anthropic HH-RLHF (`chosen`/`rejected` transcripts) and
    TRL's UltraFeedback prompts (conversational `prompt`), saved as dataset folders and read by the same code the
    stages and the config check use for the hub."""
    from datasets import Dataset

    from stages.data.input_checks import check_task_data

    fixtures = {
        "sft": [{"prompt": q, "prompt_id": str(i), "messages": _messages(q, a)} for i, (q, a) in enumerate(QA * 4)],
        "reward": [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: no"}
                   for q, a in QA * 4],
        "ppo": [{"prompt": [{"content": q, "role": "user"}]} for q, _ in QA * 30],
    }
    for name in ("gpt2-124m", "llama-124m"):
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        for stage, rows in fixtures.items():
            folder = tmp_path / name / stage
            Dataset.from_list(rows).save_to_disk(str(folder))
            from flows.config import validate_config

            section = validate_config({**cfg, stage: {**cfg[stage], "dataset": str(folder), "eval_dataset": None}},
                                      name)
            assert check_task_data(stage, getattr(section, stage), builtin_tasks=False) == [], (name, stage)
            loaded = chat_data.LOADERS[{"sft": "chat", "reward": "preference", "ppo": "prompt"}[stage]](str(folder))
            assert len(loaded) == len(rows)


def test_hub_names_with_sliced_splits_are_not_globs():
    from stages.data.dataset_files import is_hub_name, local_files

    for name in ("HuggingFaceH4/ultrachat_200k:train_sft[:50000]", "Anthropic/hh-rlhf:test[:1000]", "imdb",
                 "trl-lib/ultrafeedback-prompt"):
        assert is_hub_name(name) and local_files(name) is None, name
    for path in ("data/*.jsonl", "part-[01].jsonl", "./chat", "chat.jsonl.gz", "examples/own-data/sft.jsonl"):
        assert not is_hub_name(path), path


def test_an_unreachable_hub_fails_at_once_naming_the_dataset(monkeypatch):
    import time

    from stages.data import dataset_files

    monkeypatch.setattr(dataset_files, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.monotonic()
    with pytest.raises(StageError, match=r"'someone/never-cached-prompts' .*cannot be reached"):
        dataset_files.read_records("someone/never-cached-prompts:train[:10]", limit=4)
    assert time.monotonic() - t0 < 20, "the client's retries were not skipped"
