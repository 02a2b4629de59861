"""What a stage's cache key knows of the files and datasets its config points at (flows/external.py), and the
built-in world as one optional data source (stories and task data chosen apart).
Run: .venv/bin/pytest tests/test_external_inputs.py"""

from __future__ import annotations

import os

import pytest

from flows import external
from flows.cache_key import cache_key
from flows.config import load_config
from stages import ingest
from stages.data.readers import BuiltinSource, FilesSource


def test_an_edit_in_place_changes_the_fingerprint_and_nothing_else_does(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    cfg = load_config(None, [f"sft.dataset={data}", f"ingest.sources=[{{type: files, paths: ['{tmp_path}/*.txt']}}]"])
    (tmp_path / "a.txt").write_text("one document\n")
    before_sft, before_ingest = external.fingerprints(cfg.sft), external.fingerprints(cfg.ingest)
    assert set(before_sft) == {"dataset"} and set(before_ingest) == {"sources.0"}
    assert external.fingerprints(cfg.sft) == before_sft  # stable
    st = data.stat()
    data.write_text('{"prompt": "q", "completion": "b"}\n')  # same size, same name
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime: small files go by content
    assert external.fingerprints(cfg.sft) != before_sft
    (tmp_path / "b.txt").write_text("a new file the glob now matches\n")
    assert external.fingerprints(cfg.ingest) != before_ingest
    key = cache_key("sft", cfg.sft, {}, "code", external.fingerprints(cfg.sft))
    assert key != cache_key("sft", cfg.sft, {}, "code", before_sft)


def test_a_large_file_is_sampled_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(external, "FULL_HASH_BYTES", 1 << 20)
    monkeypatch.setattr(external, "SAMPLE_BYTES", 1 << 10)
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (3 << 20))
    first = external._file_fingerprint(big)
    assert first.startswith("size:") and ":sample:" in first
    with open(big, "r+b") as f:  # an edit inside a sampled window changes it
        f.seek((3 << 20) // 2)
        f.write(b"y")
    assert external._file_fingerprint(big) != first


def test_a_hub_dataset_is_known_by_the_commit_it_resolves_to(monkeypatch):
    cfg = load_config(None, ["ppo.dataset=someone/prompts:train"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    offline = external.hub_revision
    commits = iter(["aaa111", "bbb222"])
    monkeypatch.setattr(external, "hub_revision", lambda name, revision=None: next(commits))
    assert external.fingerprints(cfg.ppo) == {"dataset": "someone/prompts@aaa111"}
    assert external.fingerprints(cfg.ppo) == {"dataset": "someone/prompts@bbb222"}  # a new commit: a new key
    pinned = load_config(None, ["ppo.dataset={path: someone/prompts, revision: v1.0}"])
    assert external.fingerprints(pinned.ppo) == {"dataset": "someone/prompts@v1.0"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline("someone/prompts") is None  # offline: the name alone, said in a warning


def test_evaluate_include_path_is_an_external_input(tmp_path):
    (tmp_path / "task.yaml").write_text("task: mine\n")
    cfg = load_config(None, [f"evaluate.include_path={tmp_path}"])
    before = external.fingerprints(cfg.evaluate)
    (tmp_path / "task.yaml").write_text("task: mine2\n")
    assert set(before) == {"include_path"} and external.fingerprints(cfg.evaluate) != before


def test_the_built_in_stories_and_task_data_are_separate_choices(tmp_path):
    own = tmp_path / "own.txt"
    own.write_text("A paragraph of the user's own text, long enough to keep.\n\nAnd a second one of them.\n")
    tasks_only = ingest.Config(sources=[FilesSource(paths=[str(own)]), BuiltinSource(stories=False, n_sft=4,
                                        n_pref=4, n_heldout=2, n_rl_prompts=4, n_documents=50)])
    res = ingest.run(tasks_only, None, tmp_path / "a")
    assert res.metrics["rows"] == 2 and (res.outputs["tasks"] / "sft.jsonl").exists()  # no story in the corpus
    stories_only = ingest.Config(sources=[BuiltinSource(tasks=False, n_documents=50)])
    res = ingest.run(stories_only, None, tmp_path / "b")
    assert "tasks" not in res.outputs and res.metrics["rows"] > 40
    with pytest.raises(ValueError, match="no source gives pretraining text"):
        ingest.Config(sources=[BuiltinSource(stories=False)])
    # the task sizes and switches change the tasks folder only, never the corpus key
    assert ingest._corpus_key(tasks_only) == ingest._corpus_key(ingest.Config(sources=[FilesSource(paths=[str(own)])]))
