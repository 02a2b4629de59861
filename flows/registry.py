"""What the model registry hands out is verified before use, as stage artifacts are.

A version registered by the pipeline carries, as tags, the stage run whose `hf` output it holds
(`llm.stage_run`), that folder's content hash (`llm.model_sha256`) and its sha256 manifest, one hash per file
(`llm.files_sha256`). `generate` and `export` on `models:/NAME/VERSION` or `models:/NAME@ALIAS` fetch that output
and check every file against the manifest before loading anything: a file altered in the artifact store is refused
by name, and a local cached copy that does not match is fetched again. A version's tag value is never used as a
local path: the run tag must be a run id and the artifact path a relative path inside the run; that run's recorded
location must be its own (`<root>/<stage>/<run id>`, `flows.outputs`) and list the same files and hashes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.artifacts import tree_sha
from flows.lineage import fetch_artifact, get_run
from flows.paths import check_run_id, safe_artifact_path
from flows.tracking import Tracking
from llm.files import sha256_file
from stages.common import StageError

TAG_MODEL_FROM = "llm.stage_run"  # the stage run whose `hf` output the version holds
TAG_MODEL_SHA = "llm.model_sha256"  # llm.files.sha256_tree of that folder
TAG_MODEL_FILES = "llm.files_sha256"  # JSON {relative path: sha256} of each file of that folder
MODEL_OUTPUT = "hf"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def files_manifest(folder: Path) -> dict[str, str]:
    """Relative path (POSIX) -> sha256 of every file under `folder`."""
    return {f.relative_to(folder).as_posix(): sha256_file(f) for f in sorted(folder.rglob("*")) if f.is_file()}


def manifest_json(folder: Path) -> str:
    """The manifest as the compact JSON tag value registration records."""
    return manifest_text(files_manifest(folder))


def manifest_text(files: Mapping[str, str]) -> str:
    """A manifest (relative path -> sha256) as the compact JSON tag value registration records."""
    return json.dumps(dict(files), sort_keys=True, separators=(",", ":"))


def manifest_tree_sha(manifest: Mapping[str, str]) -> str:
    """The `llm.files.sha256_tree` hash of a folder with these files (same order, same bytes hashed)."""
    return tree_sha(manifest, single=False)


def parse_manifest(text: str, where: str) -> dict[str, str]:
    """A manifest tag's value, checked: relative paths inside the folder and sha256 hex digests only."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not data:
        raise StageError(f"{where}: its {TAG_MODEL_FILES} tag is not a sha256 manifest; it was altered, so the model "
                         "is not used")
    out = {}
    for rel, sha in data.items():
        if not isinstance(rel, str) or not isinstance(sha, str) or not _HEX64.match(sha):
            raise StageError(f"{where}: its {TAG_MODEL_FILES} tag holds a bad entry {rel!r}; the model is not used")
        out[safe_artifact_path(rel, f"{TAG_MODEL_FILES} entry")] = sha
    return out


def manifest_problems(folder: Path, manifest: Mapping[str, str]) -> list[str]:
    """What differs between `folder` and `manifest`: files changed, missing or not in the manifest (by name)."""
    have = files_manifest(folder) if folder.is_dir() else {}
    problems = [f"{rel} (sha256 {have[rel][:12]}, recorded {sha[:12]})" for rel, sha in sorted(manifest.items())
                if rel in have and have[rel] != sha]
    problems += [f"{rel} (missing)" for rel in sorted(manifest) if rel not in have]
    problems += [f"{rel} (not in the manifest)" for rel in sorted(have) if rel not in manifest]
    return problems


def model_version(tracking: Tracking, ref: str, name: str, version: str | None, alias: str | None) -> Any:
    """The registry entry `ref` names (a version number, `latest` or none: the newest, or an alias)."""
    client = tracking.client
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version in (None, "latest"):
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise StageError(f"{ref}: registered model '{name}' has no versions at {tracking.uri}")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, version)
    except StageError:
        raise
    except Exception as e:
        raise StageError(f"{ref}: no such registered model version at {tracking.uri} ({e})") from e


def resolve_model(tracking: Tracking, ref: str, name: str, version: str | None, alias: str | None,
                  work_dir: Path) -> Path:
    """A verified local copy of the files of the registered version `ref` names (see the module docstring)."""
    mv = model_version(tracking, ref, name, version, alias)
    where = f"{ref} (version {mv.version} of '{name}')"
    tags = mv.tags or {}
    run_tag, files_tag, tree = tags.get(TAG_MODEL_FROM), tags.get(TAG_MODEL_FILES), tags.get(TAG_MODEL_SHA)
    if not run_tag or not (files_tag or tree):
        raise StageError(
            f"{where} carries no sha256 manifest of its files (tags {TAG_MODEL_FROM}, {TAG_MODEL_FILES}); it was "
            "not registered by llm-pipeline, so its files cannot be verified and are not used. Download it with "
            f"`mlflow artifacts download -u models:/{name}/{mv.version}` and pass the folder if you trust it")
    try:
        run_id = check_run_id(run_tag)  # a run id, never a path on this machine
    except StageError:
        raise StageError(f"{where}: its {TAG_MODEL_FROM} tag {run_tag[:80]!r} is not an MLflow run id; the version's "
                         "tags were altered, so it is not used") from None
    manifest = parse_manifest(files_tag, where) if files_tag else None
    if manifest is not None:
        if tree and manifest_tree_sha(manifest) != tree:
            raise StageError(f"{where}: its {TAG_MODEL_FILES} and {TAG_MODEL_SHA} tags disagree; the version's tags "
                             "were altered, so it is not used")
        tree = tree or manifest_tree_sha(manifest)
    run = get_run(tracking, run_id)
    art = run.data.tags.get(f"llm.output.{MODEL_OUTPUT}.artifact")
    if not art:
        raise StageError(f"{where}: its stage run {run_id} recorded no '{MODEL_OUTPUT}' output")
    art = safe_artifact_path(art, f"output '{MODEL_OUTPUT}' of run {run_id}")
    return fetch_artifact(tracking, run_id, art, tree, work_dir, manifest=manifest, what=where)
