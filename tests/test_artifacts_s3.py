"""The smoke pipeline with its artifact root in a real S3 API: moto's server mode on 127.0.0.1, reached by s3fs over
HTTP as any S3 store would be (issue 31). One pipeline run is shared by the checks: every output stored once in the
bucket and recorded by reference with its lineage, the bytes stored against distinct content (the local cache
reported separately), and a damaged object found before reuse, so that its stage computes again.
Run: .venv/bin/pytest tests/test_artifacts_s3.py"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.artifacts import BUCKET, TARGET, bucket_fs, measure, run_pipeline, s3_server
from flows.specs import STAGES

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
S3_ROOT = f"s3://{BUCKET}/root"
pytestmark = pytest.mark.slow  # a smoke pipeline, then a rerun (about 2 minutes on 2 cores)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("s3") / "work"
    with s3_server() as env:
        r, wall = run_pipeline(SMOKE, work, env, f"pipeline.artifact_root={S3_ROOT}", "pipeline.system_metrics=false")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
        print(f"smoke pipeline with its artifact root in S3: {wall:.0f} s")
        yield {"work": work, "env": env, "stdout": r.stdout}


def _client(work: Path):
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = c.get_experiment_by_name("llm-pipeline-smoke").experiment_id
    (parent,) = c.search_runs([exp], "tags.`llm.pipeline` = 'true'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return c, parent, {s.name: c.get_run(parent.data.tags[f"llm.stage_run.{s.name}"]) for s in STAGES}


def test_every_output_is_stored_once_in_the_bucket_and_recorded_with_its_lineage(pipeline, tmp_path):
    c, _, runs = _client(pipeline["work"])
    fs = bucket_fs()
    for stage, run in runs.items():
        tags, rid = run.data.tags, run.info.run_id
        assert tags["llm.artifact_location"] == f"{S3_ROOT}/{stage}/{rid}", stage
        record = json.loads(Path(c.download_artifacts(rid, "outputs.json", str(tmp_path / stage))).read_text())
        stored = {p.removeprefix(f"{BUCKET}/root/{stage}/{rid}/"): i["size"]
                  for p, i in fs.find(f"{BUCKET}/root/{stage}/{rid}", detail=True).items()}
        listed = {f"{name}/{rel}": entry[0] for name, out in record["outputs"].items()
                  for rel, entry in out["files"].items()}
        assert stored == listed, f"{stage}: the bucket holds exactly the recorded files, at their sizes"
        for key, value in tags.items():  # lineage: each input is the recorded output of the upstream run
            if key.startswith("llm.input.") and key.endswith(".run_id"):
                name = key.removeprefix("llm.input.").removesuffix(".run_id")
                upstream = c.get_run(value).data.tags
                output = next(o for o in upstream["llm.outputs"].split(",")
                              if upstream[f"llm.output.{o}.sha256"] == tags[f"llm.input.{name}.sha256"])
                assert upstream[f"llm.output.{output}.artifact"] == tags[f"llm.input.{name}.artifact"]
                assert tags[f"llm.upstream.{upstream['llm.stage']}"] == value
    assert c.list_artifacts(runs["ppo"].info.run_id, "hf"), "the small files of an output stay visible in MLflow"

    m = measure(pipeline["work"], fs, BUCKET)
    print(f"S3 root: stored {m['stored_bytes'] / 1e6:.2f} MB, distinct {m['distinct_bytes'] / 1e6:.2f} MB, "
          f"{m['ratio']:.3f}x; cache {m['cache_bytes'] / 1e6:.2f} MB; by area {m['areas']}")
    assert m["ratio"] <= TARGET, m
    assert "artifact root" not in m["areas"] and m["areas"]["S3 bucket"] > m["areas"].get("MLflow store", 0)
    assert 0 < m["cache_bytes"] <= 50e9, "the outputs this machine read or wrote are in its bounded cache"


def test_the_registered_model_works_from_a_fresh_work_dir_through_the_cache(pipeline, tmp_path):
    env = {**os.environ, **pipeline["env"], "LLM_PIPELINE_WORK_DIR": str(pipeline["work"].parent / "reader"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{pipeline['work'] / 'mlflow.db'}"}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "export", "--model", "models:/smoke-assistant/1", "--out",
                        str(tmp_path / "exported")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "exported" / "config.json").is_file()
    assert list((pipeline["work"].parent / "reader" / "cache").glob("*/model.safetensors"))


def test_a_damaged_object_is_found_before_reuse_and_its_stage_computes_again(pipeline):
    work = pipeline["work"]
    c, _, before = _client(work)
    fs = bucket_fs()
    tok = before["tokenizer"].info.run_id
    shard = next(p for p in fs.find(f"{BUCKET}/root/tokenizer/{tok}/tokens") if p.endswith(".bin"))
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(data))  # same size, other bytes: only the object's ETag says it changed
    r, wall = run_pipeline(SMOKE, work, pipeline["env"], f"pipeline.artifact_root={S3_ROOT}",
                           "pipeline.system_metrics=false")
    assert r.returncode == 0, r.stderr[-5000:]
    _, parent, after = _client(work)
    reused = {s: parent.data.tags[f"llm.reused.{s}"] == "true" for s in after}
    # the tokenizer's new run has the same bytes, so every stage after it keeps its cache key and is reused
    assert reused == {s: s != "tokenizer" for s in after}, reused
    assert "rewritten with other bytes" in c.get_run(tok).data.tags["llm.artifacts_damaged"]
    new = after["tokenizer"]
    assert new.info.run_id != tok and new.data.tags["llm.output.tokens.sha256"] == \
        before["tokenizer"].data.tags["llm.output.tokens.sha256"]
    print(f"rerun after the damage: {wall:.0f} s")

