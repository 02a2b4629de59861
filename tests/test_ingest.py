"""Ingestion stage (stages/ingest.py): built-in and file/HF sources, cleaning, dedup, split, shards + manifest, reproducibility, bad-record handling. Run: .venv/bin/pytest tests/test_ingest.py"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import ingest
from stages.common import StageError, sha256_file
from stages.data import cleaning, corpus_reader


def small_builtin(**kw):
    return ingest.BuiltinSource(n_documents=400, n_sft=30, n_pref=20, n_heldout=10, n_rl_prompts=10, **kw)


def rows(corpus_dir, split=None):
    return [t for b in corpus_reader.iter_texts(corpus_dir, split) for t in b]


def test_builtin_source(tmp_path):
    res = ingest.run(ingest.Config(sources=[small_builtin()], val_fraction=0.1), None, tmp_path)
    corpus_dir, tasks = res.outputs["corpus"], res.outputs["tasks"]
    m = corpus_reader.read_manifest(corpus_dir)
    assert m["rows"]["train"] + m["rows"]["val"] == 400 == res.metrics["rows"]
    assert 10 <= m["rows"]["val"] <= 80
    for s in m["shards"]:
        t = pq.read_table(corpus_dir / s["file"])
        assert t.schema.names == ["text", "id", "source"] and t.num_rows == s["rows"]
        assert pq.ParquetFile(corpus_dir / s["file"]).metadata.row_group(0).column(0).compression == "ZSTD"
        assert s["sha256"] == sha256_file(corpus_dir / s["file"])
    assert res.metrics["bytes"] == sum(len(t.encode()) for t in rows(corpus_dir))
    assert (tasks / "sft.jsonl").exists() and (tasks / "heldout.jsonl").exists()
    assert res.samples and res.samples[0]["source"] == "builtin"


def test_rerun_is_byte_identical_and_skips_work(tmp_path):
    cfg = ingest.Config(sources=[small_builtin(seed=2)])
    a = ingest.run(cfg, None, tmp_path / "a")
    b = ingest.run(cfg, None, tmp_path / "b")
    for name in ("corpus", "tasks"):
        files = sorted(p.name for p in a.outputs[name].iterdir())
        assert files == sorted(p.name for p in b.outputs[name].iterdir())
        for f in files:
            assert sha256_file(a.outputs[name] / f) == sha256_file(b.outputs[name] / f), f
    shard = a.outputs["corpus"] / "train-00000.parquet"
    before, digest = shard.stat().st_mtime_ns, sha256_file(shard)
    again = ingest.run(cfg, None, tmp_path / "a")
    assert shard.stat().st_mtime_ns == before and again.metrics == a.metrics
    ingest.run(ingest.Config(sources=[small_builtin(seed=3)]), None, tmp_path / "a")  # new config: redone
    assert sha256_file(shard) != digest


def test_files_sources_and_cleaning(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n\nsecond\r\nparagraph\x07 here\n\n  \n"
                                    "cafe\u0301 d\u00e9j\u00e0\n\nfirst paragraph\nstill first\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "a json doc", "other": 1}) + "\n\n" +
                                      json.dumps({"text": "second\u0000json doc"}) + "\n")
    pq.write_table(pa.table({"content": ["from parquet", "x", "a json doc"], "n": [1, 2, 3]}),
                   tmp_path / "c.parquet")
    cfg = ingest.Config(
        sources=[ingest.FilesSource(paths=[str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")]),
                 ingest.FilesSource(paths=[str(tmp_path / "c.parquet")], text_field="content")],
        min_chars=2, val_fraction=0.0)
    res = ingest.run(cfg, None, tmp_path / "out")
    got = rows(res.outputs["corpus"])
    assert got == ["first paragraph\nstill first", "second\nparagraph here", "caf\u00e9 d\u00e9j\u00e0",
                   "a json doc", "secondjson doc", "from parquet"]
    assert res.metrics["dropped/duplicate"] == 2 and res.metrics["dropped/too_short"] == 1
    assert res.metrics["records_read"] == 9
    assert "tasks" not in res.outputs
    sources = pq.read_table(res.outputs["corpus"] / "train-00000.parquet").column("source").to_pylist()
    assert sources[0].endswith("a.txt") and sources[-1].endswith("c.parquet")


def test_txt_units(tmp_path):
    (tmp_path / "a.txt").write_text("l1\nl2\n\nl3")
    for unit, want in [("line", ["l1", "l2", "l3"]), ("paragraph", ["l1\nl2", "l3"]), ("file", ["l1\nl2\n\nl3"])]:
        cfg = ingest.Config(sources=[ingest.FilesSource(paths=[str(tmp_path / "a.txt")], txt_unit=unit)],
                            val_fraction=0.0)
        assert rows(ingest.run(cfg, None, tmp_path / unit).outputs["corpus"]) == want


def test_split_is_by_content_hash(tmp_path):
    docs = [f"document number {i}" for i in range(300)]
    (tmp_path / "a.txt").write_text("\n".join(docs))
    (tmp_path / "b.txt").write_text("\n".join(reversed(docs)) + "\nanother one")
    src = dict(txt_unit="line")
    a = ingest.run(ingest.Config(sources=[ingest.FilesSource(paths=[str(tmp_path / "a.txt")], **src)],
                                 val_fraction=0.2), None, tmp_path / "oa").outputs["corpus"]
    b = ingest.run(ingest.Config(sources=[ingest.FilesSource(paths=[str(tmp_path / "b.txt")], **src)],
                                 val_fraction=0.2), None, tmp_path / "ob").outputs["corpus"]
    val_a, val_b = set(rows(a, "val")), set(rows(b, "val"))
    assert 30 < len(val_a) < 90 and val_a <= val_b and not val_a & set(rows(b, "train"))


def test_shards_are_bounded(tmp_path):
    cfg = ingest.Config(sources=[small_builtin()], shard_max_bytes=20_000, row_group_bytes=5_000, val_fraction=0.0)
    res = ingest.run(cfg, None, tmp_path)
    m = corpus_reader.read_manifest(res.outputs["corpus"])
    assert len(m["shards"]) >= 4
    assert all(s["text_bytes"] < 20_000 + 2_000 for s in m["shards"])
    assert [s["file"] for s in m["shards"]][:2] == ["train-00000.parquet", "train-00001.parquet"]
    assert pq.ParquetFile(res.outputs["corpus"] / "train-00000.parquet").num_row_groups >= 3


def test_hf_local_dataset_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"body": ["hello world", "a second row", "hello world"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = ingest.Config(sources=[ingest.HFSource(name=str(tmp_path / "ds"), text_field="body")], val_fraction=0.0)
    res = ingest.run(cfg, None, tmp_path / "out")
    assert rows(res.outputs["corpus"]) == ["hello world", "a second row"]
    folder = tmp_path / "raw"  # a plain data folder, read by the datasets library's packaged loaders
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "row one"}\n{"text": "row two"}\n')
    cfg = ingest.Config(sources=[ingest.HFSource(name=str(folder), max_rows=1)], val_fraction=0.0)
    assert rows(ingest.run(cfg, None, tmp_path / "out_raw").outputs["corpus"]) == ["row one"]
    bad = ingest.Config(sources=[ingest.HFSource(name=str(tmp_path / "ds"), text_field="text")])
    with pytest.raises(StageError, match="no column 'text'"):
        ingest.run(bad, None, tmp_path / "out2")


def test_bad_records_are_quarantined_below_the_threshold(tmp_path):
    good = [json.dumps({"text": f"doc {i}"}) for i in range(50)]
    lines = good[:10] + ["{not json"] + good[10:20] + [json.dumps({"body": "x"})] + good[20:] + ["[1, 2]"]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    src = ingest.FilesSource(paths=[str(tmp_path / "a.jsonl")])
    res = ingest.run(ingest.Config(sources=[src], max_bad_fraction=0.1), None, tmp_path / "ok")
    assert res.metrics["rows"] == 50 and res.metrics["bad_records"] == 3
    assert res.metrics["dropped/bad_json"] == 1 and res.metrics["dropped/missing_field"] == 2
    q = [json.loads(x) for x in (res.outputs["corpus"] / "quarantine.jsonl").read_text().splitlines()]
    assert [x["where"].rsplit(":", 1)[1] for x in q] == ["11", "22", "53"]
    with pytest.raises(StageError, match=r"a\.jsonl:11: bad_json.*max_bad_fraction"):
        ingest.run(ingest.Config(sources=[src]), None, tmp_path / "strict")
    assert not (tmp_path / "strict" / "corpus").exists()


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        ingest.Config(shard_size=3)
    with pytest.raises(ValueError, match="n_documents"):
        ingest.Config(sources=[{"type": "builtin", "n_documents": -1}])
    with pytest.raises(ValueError):
        ingest.Config(sources=[{"type": "s3", "paths": ["x"]}])
    cfg = ingest.Config.model_validate({"sources": [{"type": "files", "paths": ["a.txt"]}]})
    assert isinstance(cfg.sources[0], ingest.FilesSource)
    for model in (ingest.Config, ingest.BuiltinSource, ingest.FilesSource, ingest.HFSource):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"
    with pytest.raises(StageError, match="matches no file"):
        ingest.run(ingest.Config(sources=[ingest.FilesSource(paths=[str(tmp_path / "*.txt")])]), None, tmp_path)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(StageError, match="format"):
        ingest.run(ingest.Config(sources=[ingest.FilesSource(paths=[str(tmp_path / "x.csv")])]), None, tmp_path)


def test_clean_text():
    assert cleaning.clean_text(" a\r\nb\rc\x00\x1b[0m\u0085 ") == "a\nb\nc[0m"
    assert cleaning.clean_text("e\u0301") == "\u00e9"
    assert cleaning.clean_text("\ufb01", "NFKC") == "fi" and cleaning.clean_text("\ufb01") == "\ufb01"
    assert cleaning.clean_text("tab\tkept\nnewline") == "tab\tkept\nnewline"


def test_clean_batch_matches_clean_text_on_sliced_arrays():
    texts = ["plain ascii", " caf\u00e9 ", "a\r\nb", "x\x00y", "", "e\u0301t\u00e9", "\u0085nel", "tab\tok", "日本\r"]
    arr = pa.array(["junk"] * 3 + texts + ["junk"], pa.string()).slice(3, len(texts))
    assert cleaning.clean_batch(arr).to_pylist() == [cleaning.clean_text(t) for t in texts]
    assert cleaning.clean_batch(arr).to_pylist()[:4] == ["plain ascii", "caf\u00e9", "a\nb", "xy"]
    spaces = pa.array(["\u3000wide\u00a0", "   ", "\n\tx\n", "inner  space", "é", "", "ok "])
    assert cleaning.clean_batch(spaces).to_pylist() == ["wide", "", "x", "inner  space", "é", "", "ok"]


def test_changing_only_task_sizes_keeps_the_corpus(tmp_path):
    a = ingest.run(ingest.Config(sources=[small_builtin()]), None, tmp_path)
    shard = a.outputs["corpus"] / "train-00000.parquet"
    before = shard.stat().st_mtime_ns
    src = ingest.BuiltinSource(n_documents=400, n_sft=31, n_pref=20, n_heldout=10, n_rl_prompts=10)
    b = ingest.run(ingest.Config(sources=[src]), None, tmp_path)
    assert shard.stat().st_mtime_ns == before
    assert sum(1 for _ in open(b.outputs["tasks"] / "sft.jsonl")) == 31 + 5  # + questions the story does not answer


def test_planted_contamination_is_found_named_and_keeps_the_model_from_champion(tmp_path):
    from flows.promotion import judge
    from stages import contamination

    def check(corpus_run, out):
        return contamination.run(contamination.Config(), {"corpus": corpus_run.outputs["corpus"],
                                                          "tasks": corpus_run.outputs["tasks"]}, out)

    # no validation split: the leaked page must land in the training text the check reads
    clean_ingest = ingest.run(ingest.Config(sources=[small_builtin()], val_fraction=0.0), None, tmp_path / "clean")
    clean = check(clean_ingest, tmp_path / "c-clean")
    report = json.loads((clean.outputs["contamination"] / "report.json").read_text())
    assert set(report["sets"]) >= {"heldout", "sft_eval", "preferences_eval"} and report["ngram"] == 13
    held = [json.loads(line) for line in (clean_ingest.outputs["tasks"] / "heldout.jsonl").read_text().splitlines()]
    planted = next(r["prompt"] for r in held if r["kind"] in ("color", "owner"))  # a fact no training text states
    (tmp_path / "leak.txt").write_text(f"A page copied from the test set. {planted} The end.\n")

    leak = ingest.FilesSource(paths=[str(tmp_path / "leak.txt")])
    dirty_ingest = ingest.run(ingest.Config(sources=[small_builtin(), leak], val_fraction=0.0), None,
                              tmp_path / "dirty")
    dirty = check(dirty_ingest, tmp_path / "c-dirty")
    found = json.loads((dirty.outputs["contamination"] / "report.json").read_text())["sets"]["heldout"]
    before = clean.metrics["contamination/heldout/items"]
    assert dirty.metrics["contamination/heldout/items"] == before + 1 and planted in found["examples"]
    good = {"eval/exact_match": 0.7, "eval/sft_exact_match": 0.7, "eval/kl": 0.01}
    assert judge(good, 0.02, 0.5, clean.metrics, 0.0).alias == ("candidate" if before else "champion")
    verdict = judge(good, 0.02, 0.5, dirty.metrics, 0.0)
    assert verdict.alias == "candidate" and "heldout items" in verdict.describe()
    # the report card names the contaminated set and the gate that kept the model from `champion`
    from flows.report import contamination_table, render_markdown

    card = {"pipeline_run_id": "p", "registered_model": "models:/m/1", "promotion": verdict.describe(),
            "stages": [], "models": {}, "contamination": contamination_table(dirty.metrics)}
    text = render_markdown(card)
    items = dirty.metrics["contamination/heldout/items"]
    assert f"heldout {items:.0f} items" in text and "candidate" in text and "heldout items" in text, text
