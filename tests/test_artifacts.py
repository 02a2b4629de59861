"""One copy of every output (issue 31) on fake stages: outputs stored once at their run's own location under the
artifact root and read in place, `--force` never touching an earlier run's outputs, the clean-up command keeping
what registered versions and kept runs need, and an object-store root (fsspec's in-memory store) read through the
bounded, verified cache. The S3 test is tests/test_artifacts_s3.py. Run: .venv/bin/pytest tests/test_artifacts.py"""

from __future__ import annotations

import uuid
from pathlib import Path

import flows_fakes as ff
import pytest

from flows.artifacts import check_location
from flows.lineage import fetch_artifact, input_refs, resolve_upstream
from flows.local_copies import Cache
from flows.outputs import TAG_LOCATION, load_record, stored_problem
from flows.stage_runner import run_stage
from flows.tracking import setup_tracking
from stages.common import StageError

SPECS = ff.fake_specs()
BY_NAME = {s.name: s for s in SPECS}


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ff.reset()


def _files(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_outputs_are_stored_once_and_read_in_place(tmp_path: Path) -> None:
    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd)
    ing = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    tok = run_stage(BY_NAME["tokenizer"], ff.FakeConfig(), sec, upstream={"ingest": ing.run_id})
    tr = setup_tracking(sec.experiment, wd)
    run = tr.client.get_run(ing.run_id)
    location = Path(run.data.tags[TAG_LOCATION])
    assert location == (wd / "artifacts" / "ingest" / ing.run_id).resolve()
    assert sorted(p.name for p in location.iterdir()) == ["corpus", "tasks"]
    # MLflow holds the record (where, and a sha256 per file), not a copy of the data
    assert not list((wd / "mlartifacts").rglob("data.txt")) and not (wd / "inputs").exists()
    record = load_record(tr, run)
    assert set(record.outputs["corpus"].files) == {"data.txt"} and record.outputs["corpus"].sha256 == \
        ing.output_hashes["corpus"]
    # the downstream stage read the upstream output where it is stored, after checking it
    assert fetch_artifact(tr, ing.run_id, "corpus", ing.output_hashes["corpus"], wd) == location / "corpus"
    ref = next(r for r in input_refs(BY_NAME["tokenizer"], resolve_upstream(tr, BY_NAME["tokenizer"],
                                                                           upstream={"ingest": ing.run_id})))
    assert ref.uri == f"{location}/corpus"
    assert stored_problem(tr, tr.client.get_run(tok.run_id)) is None
    # a location pointed at another folder of this machine is never followed
    tr.client.set_tag(tok.run_id, TAG_LOCATION, str(tmp_path))
    assert "one of them was altered" in stored_problem(tr, tr.client.get_run(tok.run_id))
    with pytest.raises(StageError, match="not a location of a 'tokenizer' run"):
        check_location(str(tmp_path), "tokenizer", tok.run_id)


def test_force_leaves_the_earlier_runs_outputs_intact_and_verifiable(tmp_path: Path) -> None:
    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd)
    first = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    tr = setup_tracking(sec.experiment, wd)
    first_loc = Path(tr.client.get_run(first.run_id).data.tags[TAG_LOCATION])
    before = _files(first_loc)
    forced = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec, force=True)
    assert ff.CALLS == ["ingest", "ingest"] and forced.run_id != first.run_id
    forced_loc = Path(tr.client.get_run(forced.run_id).data.tags[TAG_LOCATION])
    assert forced_loc != first_loc and _files(forced_loc) == before, "same bytes, a new location"
    assert _files(first_loc) == before and stored_problem(tr, tr.client.get_run(first.run_id)) is None
    for name, art in first.outputs.items():  # still verifiable from a work dir that never saw it
        fetch_artifact(tr, first.run_id, art, first.output_hashes[name], tmp_path / "elsewhere")
    assert run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec).run_id == forced.run_id, "the newest is reused"


def _chain(sec, value: int, upstream: dict[str, str] | None = None) -> dict[str, str]:
    """ingest -> tokenizer -> pretrain runs (pretrain's config `value`), upstream runs given or made."""
    runs = dict(upstream or {})
    for spec in SPECS[:3]:
        if spec.name not in runs:
            cfg = ff.FakeConfig(value=value if spec.name == "pretrain" else 1)
            runs[spec.name] = run_stage(spec, cfg, sec, upstream={u: runs[u] for u in spec.upstream_stages}).run_id
    return runs


def test_gc_keeps_what_registered_versions_and_kept_runs_need_and_removes_the_rest(tmp_path: Path, capsys) -> None:
    from flows.cleanup import plan
    from flows.cli import main

    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd)
    old = _chain(sec, 1)
    registered = _chain(sec, 2, upstream={"ingest": old["ingest"]})  # reuses old's tokenizer run (same key)
    newest = _chain(sec, 3, upstream={"ingest": old["ingest"], "tokenizer": old["tokenizer"]})
    stale_ingest = run_stage(BY_NAME["ingest"], ff.FakeConfig(value=9), sec).run_id
    latest_ingest = run_stage(BY_NAME["ingest"], ff.FakeConfig(value=1), sec, force=True).run_id
    tr = setup_tracking(sec.experiment, wd)
    c = tr.client
    c.create_registered_model("m")
    c.create_model_version("m", "runs:/x/hf", run_id=registered["pretrain"],
                           tags={"llm.stage_run": registered["pretrain"]})
    failed = c.create_run(tr.experiment_id, tags={"llm.stage": "pretrain"}).info.run_id  # killed mid-store
    (wd / "artifacts" / "pretrain" / failed / "hf").mkdir(parents=True)
    (wd / "artifacts" / "pretrain" / failed / "hf" / "part.bin").write_bytes(b"x" * 100)
    c.set_terminated(failed, "FAILED")
    foreign = wd / "artifacts" / "ingest" / uuid.uuid4().hex  # a run of another tracking store
    foreign.mkdir(parents=True)

    items = {Path(i.where).name: i for i in plan(sec, c, keep=1) if i.kind == "output"}
    must_keep = {registered["pretrain"], old["tokenizer"], old["ingest"],  # the registered run and its lineage
                 newest["pretrain"], latest_ingest, foreign.name}  # the last run of each stage; another store's
    assert {r for r, i in items.items() if i.keep} == must_keep, {r: i.reason for r, i in items.items()}
    assert {r for r, i in items.items() if not i.keep} == {old["pretrain"], stale_ingest, failed}
    assert "registered as m version 1" in items[registered["pretrain"]].reason

    args = ["gc", "--set", f"pipeline.work_dir={wd}", "--set", "pipeline.experiment=llm-pipeline", "--keep", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nothing removed: pass --yes" in out and all((wd / "artifacts" / "pretrain" / r).exists()
                                                         for r in (old["pretrain"], failed))
    assert main([*args, "--yes"]) == 0
    assert "removed 3 items" in capsys.readouterr().out
    for rid, item in items.items():
        assert Path(item.where).exists() == item.keep, rid
    for rid in must_keep - {foreign.name}:
        assert stored_problem(tr, c.get_run(rid)) is None, rid
    assert "outputs were removed (by llm-pipeline gc" in stored_problem(tr, c.get_run(stale_ingest))
    ff.CALLS.clear()  # a removed run is never reused: its stage computes again
    assert not run_stage(BY_NAME["ingest"], ff.FakeConfig(value=9), sec).reused and ff.CALLS == ["ingest"]


def _memory_root() -> str:
    return f"memory://bucket-{uuid.uuid4().hex[:8]}/root"


def test_object_store_root_reads_through_a_bounded_verified_cache(tmp_path: Path) -> None:
    import fsspec

    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd, artifact_root=_memory_root(), artifact_cache_gb=2e-7)  # 200 bytes: two fake outputs
    ing = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    tr = setup_tracking(sec.experiment, wd)
    location = tr.client.get_run(ing.run_id).data.tags[TAG_LOCATION]
    assert location.startswith("memory://") and location.endswith(f"/ingest/{ing.run_id}")
    fs = fsspec.filesystem("memory")
    assert fs.cat_file(f"{location}/corpus/data.txt").startswith(b"corpus:")
    assert not (wd / "stages" / "ingest").exists() or not list((wd / "stages" / "ingest").iterdir())
    cache = Cache(wd, 200)
    # the stage's own outputs became cache entries; reading one costs no download and is verified
    corpus = fetch_artifact(tr, ing.run_id, "corpus", ing.output_hashes["corpus"], wd)
    assert corpus == cache.entry(ing.output_hashes["corpus"]) and (corpus / "data.txt").is_file()
    # a cached copy changed since it was fetched is fetched again
    (corpus / "data.txt").write_text("changed\n")
    assert fetch_artifact(tr, ing.run_id, "corpus", ing.output_hashes["corpus"], wd) == corpus
    assert (corpus / "data.txt").read_text().startswith("corpus:")
    # other work dirs fetch it; the bound holds: each new entry pushes out the least recently used ones
    for i in range(4):
        run_stage(BY_NAME["ingest"], ff.FakeConfig(value=10 + i), sec)
    entries = cache.entries()
    assert sum(n for _, n, _ in entries) <= 200 and len(entries) == 2, cache.report()
    assert "outputs" in cache.report() and "GB of" in cache.report()
    fetch_artifact(tr, ing.run_id, "corpus", ing.output_hashes["corpus"], tmp_path / "other")
    assert Cache(tmp_path / "other", int(1e9)).entries()[0][0] == ing.output_hashes["corpus"]


def test_a_damaged_object_is_found_before_reuse_and_the_stage_recomputes(tmp_path: Path) -> None:
    import fsspec

    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd, artifact_root=_memory_root())
    first = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    tr = setup_tracking(sec.experiment, wd)
    location = tr.client.get_run(first.run_id).data.tags[TAG_LOCATION]
    fs = fsspec.filesystem("memory")
    good = fs.cat_file(f"{location}/corpus/data.txt")
    fs.pipe_file(f"{location}/corpus/data.txt", good[:-2] + b"X\n")  # same size, other bytes
    with pytest.raises(StageError, match=r"data\.txt \(sha256 \w+, recorded \w+\) does not match the sha256"):
        fetch_artifact(tr, first.run_id, "corpus", first.output_hashes["corpus"], tmp_path / "fresh")
    assert not list((tmp_path / "fresh" / "cache").glob("*/data.txt")), "a bad download is never kept"
    second = run_stage(BY_NAME["ingest"], ff.FakeConfig(), sec)
    assert not second.reused and ff.CALLS == ["ingest", "ingest"]
    assert "rewritten with other bytes" in tr.client.get_run(first.run_id).data.tags["llm.artifacts_damaged"]
    assert second.output_hashes == first.output_hashes


@pytest.mark.parametrize("root", ["local", "object store"])
def test_a_single_file_output_is_stored_and_read_back(tmp_path: Path, root: str) -> None:
    import sys
    import types

    from flows.specs import StageSpec
    from llm.files import sha256_file
    from stages.common import StageResult

    def run(cfg, inputs, out_dir, tracker):
        (out_dir / "report.json").write_text('{"ok": 1}\n')
        return StageResult(outputs={"report": out_dir / "report.json"})

    sys.modules["fake_stages.single"] = types.SimpleNamespace(Config=ff.FakeConfig, run=run)
    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd, **({"artifact_root": _memory_root()} if root == "object store" else {}))
    out = run_stage(StageSpec("single", "fake_stages.single"), ff.FakeConfig(), sec)
    assert out.outputs == {"report": "report/report.json"}
    tr = setup_tracking(sec.experiment, wd)
    path = fetch_artifact(tr, out.run_id, "report/report.json", out.output_hashes["report"], tmp_path / "reader")
    assert path.name == "report.json" and path.read_text() == '{"ok": 1}\n'
    assert sha256_file(path) == out.output_hashes["report"]  # a file's hash is its own, as before
    assert "report/report.json" in {a.path for a in tr.client.list_artifacts(out.run_id, "report")}


def test_the_registered_model_is_stored_once_and_resolves_verified(tmp_path: Path, monkeypatch) -> None:
    from flows.cli import resolve_ref
    from flows.pipeline_runner import register_final_model

    wd = ff.work_dir(tmp_path)
    sec = ff.section(wd)
    outs: dict = {}
    for spec in SPECS:
        outs[spec.name] = run_stage(spec, ff.FakeConfig(), sec,
                                    upstream={u: outs[u].run_id for u in spec.upstream_stages})
    tr = setup_tracking(sec.experiment, wd)
    parent = tr.client.create_run(tr.experiment_id).info.run_id
    assert register_final_model(tr, "m", parent, outs["ppo"], wd) == ("1", True)
    stored = Path(tr.client.get_run(outs["ppo"].run_id).data.tags[TAG_LOCATION]) / "hf" / "model.safetensors"
    (copy,) = (wd / "mlartifacts").rglob("model/model.safetensors")  # MLflow's own copy, for models:/ URIs
    assert copy.stat().st_ino == stored.stat().st_ino, "the same bytes stored once (a hard link)"
    monkeypatch.setenv("LLM_PIPELINE_WORK_DIR", str(wd))
    assert resolve_ref("models:/m/1") == stored.parent  # checked against the version's manifest, read in place
