"""What the model registry hands out is verified (flows.registry): `models:/NAME/VERSION` and `@ALIAS` resolve to
the stage run's files checked against the sha256 manifest recorded on the version; a file altered in the artifact
store is refused by name (also through `llm-pipeline export`, exit 2, no traceback), a local cached copy that no
longer matches is fetched again, and a tag value is never used as a local path. A tiny transformers model in a
SQLite store outside the work dir, registered the way the pipeline registers its final model.
Run: .venv/bin/pytest tests/test_registry_verify.py"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from flows.cli import resolve_ref
from flows.registry import TAG_MODEL_FILES, TAG_MODEL_FROM, TAG_MODEL_SHA, manifest_json
from flows.tracking import setup_tracking
from llm.files import sha256_tree
from stages.common import StageError

ROOT = Path(__file__).resolve().parents[1]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """A finished 'ppo' run with an `hf` output and version 1 of model `tiny` (alias champion) made from it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for k in ("MLFLOW_TRACKING_URI", "LLM_PIPELINE_WORK_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LLM_PIPELINE_WORK_DIR", str(tmp_path / "wd1"))
    folder = tmp_path / "hf"
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tr = setup_tracking("llm-pipeline", tmp_path / "wd1")
    c = tr.client
    rid = c.create_run(tr.experiment_id, tags={"llm.stage": "ppo"}).info.run_id
    c.log_artifacts(rid, str(folder), "hf")
    sha = sha256_tree(folder)
    for k, v in {"llm.outputs": "hf", "llm.output.hf.artifact": "hf", "llm.output.hf.sha256": sha}.items():
        c.set_tag(rid, k, v)
    c.set_terminated(rid)
    c.create_registered_model("tiny")
    c.create_model_version("tiny", f"runs:/{rid}/hf", run_id=rid,
                           tags={TAG_MODEL_FROM: rid, TAG_MODEL_SHA: sha, TAG_MODEL_FILES: manifest_json(folder)})
    c.set_registered_model_alias("tiny", "champion", "1")
    stored = Path(urlparse(c.get_run(rid).info.artifact_uri).path) / "hf"
    return {"client": c, "run_id": rid, "sha": sha, "folder": folder, "stored": stored, "root": tmp_path}


def test_a_version_resolves_to_verified_files_and_a_stale_cache_is_fetched_again(registered, caplog):
    r = registered
    local = resolve_ref("models:/tiny/1")
    assert local == r["root"] / "wd1" / "inputs" / r["run_id"] / "hf" and sha256_tree(local) == r["sha"]
    assert resolve_ref("models:/tiny@champion") == local
    _flip(local / "config.json")  # the local copy changed since it was fetched
    caplog.set_level("WARNING", logger="flows.lineage")
    assert resolve_ref("models:/tiny@champion") == local and sha256_tree(local) == r["sha"]
    assert any("config.json" in m and "fetching it again" in m for m in caplog.messages), caplog.messages


def test_a_file_altered_in_the_store_is_refused_by_name_also_by_export(registered, monkeypatch):
    r = registered
    _flip(r["stored"] / "model.safetensors")
    monkeypatch.setenv("LLM_PIPELINE_WORK_DIR", str(r["root"] / "wd2"))  # nothing cached there
    with pytest.raises(StageError, match=r"model\.safetensors .*does not match the sha256 manifest"):
        resolve_ref("models:/tiny@champion")
    assert not (r["root"] / "wd2" / "inputs" / r["run_id"] / "hf").exists(), "a refused copy is never kept"
    env = {**os.environ, "LLM_PIPELINE_WORK_DIR": str(r["root"] / "wd3")}
    p = subprocess.run([sys.executable, "-m", "flows.cli", "export", "--model", "models:/tiny/1", "--out",
                        str(r["root"] / "out")], cwd=r["root"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "model.safetensors" in p.stderr and "not used" in p.stderr
    assert "Traceback" not in p.stdout + p.stderr and not (r["root"] / "out").exists()


def test_tag_values_are_never_used_as_local_paths_and_unverifiable_versions_are_refused(registered):
    r = registered
    c = r["client"]
    # a version whose run tag names an existing folder on this machine
    c.create_model_version("tiny", f"runs:/{r['run_id']}/hf", run_id=r["run_id"],
                           tags={TAG_MODEL_FROM: str(r["folder"]), TAG_MODEL_SHA: r["sha"]})
    with pytest.raises(StageError, match="is not an MLflow run id"):
        resolve_ref("models:/tiny/2")
    # a version that records no manifest (registered by something else)
    c.create_model_version("tiny", f"runs:/{r['run_id']}/hf", run_id=r["run_id"])
    with pytest.raises(StageError, match="carries no sha256 manifest"):
        resolve_ref("models:/tiny/3")
    # a manifest that does not add up to the recorded hash (its tags were edited)
    c.set_model_version_tag("tiny", "1", TAG_MODEL_FILES, '{"config.json": "' + "0" * 64 + '"}')
    with pytest.raises(StageError, match="disagree"):
        resolve_ref("models:/tiny/1")
    c.set_model_version_tag("tiny", "1", TAG_MODEL_FILES, '{"../../etc/passwd": "' + "0" * 64 + '"}')
    with pytest.raises(StageError, match="escape"):
        resolve_ref("models:/tiny/1")
