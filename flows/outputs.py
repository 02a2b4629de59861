"""A stage run's outputs as MLflow records them: where they are, and a sha256 manifest of every file.

`store_outputs` runs once per stage run, after the stage returned: it hashes each output once, logs the small files
people look at in the MLflow UI (model cards, configs, manifests, reports: `ui_files`) as MLflow artifacts, moves or
uploads the outputs to the run's own location under the artifact root (`flows.artifacts`), and logs the manifest as
the run's `outputs.json` artifact. The run's tags keep the lineage the rest of the flow layer reads
(`llm.output.<name>.artifact|sha256|files|bytes`) plus `llm.artifact_location`.

`stored_problem` is the check before a finished run is reused: one listing of its location, every file present with
its recorded size and fingerprint (a file whose fingerprint changed is hashed). `output_path` is how a stage, the
registry and `generate` read an output: in place under a local root, through the verified cache from an object
store (`flows.local_copies`), in both cases checked against the manifest first.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.artifacts import FileEntry, LocalStore, check_location, describe, open_store, root_url, tree_sha
from flows.local_copies import Cache, damaged, read_in_place, remember
from flows.local_copies import memo_path as _memo_path
from flows.paths import SAFE_NAME, check_inside, safe_artifact_path
from flows.tracking import Tracking, call_with_retry
from stages.common import StageError

log = logging.getLogger(__name__)

OUTPUTS_RECORD = "outputs.json"  # the MLflow artifact holding a run's location and manifest
TAG_LOCATION = "llm.artifact_location"
TAG_REMOVED = "llm.artifacts_removed"  # set by `llm-pipeline gc` on a run whose outputs it removed
TAG_OUTPUTS = "llm.outputs"
TAG_STAGE = "llm.stage"
# Files shown in the MLflow UI as well: documents and metadata, not data (a copy of each is stored in MLflow)
UI_SUFFIXES = (".md", ".json", ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".svg", ".html")
UI_MAX_BYTES = 64 * 1024
UI_MAX_FILES = 50  # per output
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RECORDS: dict[str, Record] = {}  # run id -> its record (immutable once the run finished)


@dataclass
class Output:
    """One output of a run: its name, its artifact path (`name`, or `name/file` for a single file), its files."""

    name: str
    artifact: str
    files: dict[str, FileEntry]
    single: bool = False

    @property
    def sha256(self) -> str:
        return tree_sha({rel: e.sha256 for rel, e in self.files.items()}, self.single)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.files.values())


@dataclass
class Record:
    location: str
    outputs: dict[str, Output] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"location": self.location, "outputs": {
            n: {"artifact": o.artifact, "single": o.single, "sha256": o.sha256,
                "files": {rel: [e.nbytes, e.sha256, e.fingerprint] for rel, e in sorted(o.files.items())}}
            for n, o in self.outputs.items()}}


def fix_hint(stage: str) -> str:
    return (f"Run stage '{stage}' again (`llm-pipeline stage {stage}`: a damaged run is never reused, and the new "
            "run writes a new location), or restore the stored files")


def ui_files(name: str, path: Path) -> list[tuple[Path, str]]:
    """(local file, MLflow artifact folder) of the small files of an output that the MLflow UI should show."""
    if path.is_file():
        return [(path, name)] if path.suffix in UI_SUFFIXES and path.stat().st_size <= UI_MAX_BYTES else []
    picked = [f for f in sorted(path.rglob("*")) if f.is_file() and f.suffix in UI_SUFFIXES
              and f.stat().st_size <= UI_MAX_BYTES][:UI_MAX_FILES]
    return [(f, "/".join([name, *f.relative_to(path).parent.parts])) for f in picked]


def store_outputs(tracking: Tracking, run_id: str, stage: str, outs: Mapping[str, Path], artifact_root: str,
                  work_dir: Path, cache_bytes: int, wait_s: float) -> Record:
    """Log the UI files, store each output once at the run's location, log the manifest; see the module
    docstring. A process killed in between leaves an unfinished run, which is never reused."""
    client = tracking.client
    store = open_store(root_url(artifact_root, work_dir))
    record = Record(store.location(stage, run_id))
    for name, path in outs.items():
        single = path.is_file()
        record.outputs[name] = Output(name, f"{name}/{path.name}" if single else name, describe(path), single)
        for f, folder in ui_files(name, path):
            call_with_retry(lambda f=f, d=folder: client.log_artifact(run_id, str(f), d), f"upload {f.name}", wait_s)
    for name, path in outs.items():
        call_with_retry(lambda n=name, p=path: store.put(record.location, record.outputs[n].artifact, p),
                        f"store output {name}", wait_s)
    stored = call_with_retry(lambda: store.listing(record.location), "list stored outputs", wait_s)
    for name, out in record.outputs.items():
        for rel, e in list(out.files.items()):
            nbytes, fingerprint = stored.get(f"{name}/{rel}", (-1, ""))
            if nbytes != e.nbytes:
                raise StageError(f"output '{name}' of {stage} run {run_id}: {rel} holds {nbytes} bytes at "
                                 f"{record.location} right after it was stored, not {e.nbytes}; check the store")
            out.files[rel] = FileEntry(e.nbytes, e.sha256, fingerprint)
    _keep_local_copies(store, record, outs, stage, run_id, work_dir, cache_bytes)
    call_with_retry(lambda: client.log_dict(run_id, record.to_json(), OUTPUTS_RECORD), "log output manifest", wait_s)
    _RECORDS[run_id] = record
    return record


def _keep_local_copies(store: Any, record: Record, outs: Mapping[str, Path], stage: str, run_id: str,
                       work_dir: Path, cache_bytes: int) -> None:
    """What this process just hashed needs no hash when the next stage reads it: under a local root the stored
    files are remembered as verified; from an object store the local outputs become cache entries."""
    for name, out in record.outputs.items():
        what = f"output '{name}' of {stage} run {run_id}"
        if isinstance(store, LocalStore):
            remember(store.path(record.location, name), out.files, _memo_path(work_dir, record.location, name), what)
        elif outs[name].exists():
            Cache(work_dir, cache_bytes).adopt(outs[name], out.sha256, out.files, what)


def output_tags(record: Record) -> dict[str, str]:
    tags = {TAG_OUTPUTS: ",".join(sorted(record.outputs)), TAG_LOCATION: record.location}
    for n, o in record.outputs.items():
        tags.update({f"llm.output.{n}.artifact": o.artifact, f"llm.output.{n}.sha256": o.sha256,
                     f"llm.output.{n}.files": str(len(o.files)), f"llm.output.{n}.bytes": str(o.nbytes)})
    return tags


def _parse_output(name: str, data: Any, where: str) -> Output:
    if not SAFE_NAME.match(name) or not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise StageError(f"{where}: output {name!r} is not a valid entry")
    files = {}
    for rel, entry in data["files"].items():
        if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], int) or entry[0] < 0
                or not isinstance(entry[1], str) or not _HEX64.match(entry[1]) or not isinstance(entry[2], str)):
            raise StageError(f"{where}: the entry of {name}/{rel} is not [bytes, sha256, fingerprint]")
        files[safe_artifact_path(rel, f"{where}: file")] = FileEntry(*entry)
    art = safe_artifact_path(str(data.get("artifact", "")), f"{where}: artifact of output '{name}'")
    out = Output(name, art, files, bool(data.get("single")))
    if out.artifact.split("/", 1)[0] != name or (out.single and len(files) != 1):
        raise StageError(f"{where}: output '{name}' has a bad artifact path {art!r}")
    return out


def _download_record(tracking: Tracking, rid: str, where: str) -> Any:
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="llm-outputs-") as tmp:
        try:
            path = call_with_retry(lambda: mlflow.artifacts.download_artifacts(
                run_id=rid, artifact_path=OUTPUTS_RECORD, dst_path=tmp, tracking_uri=tracking.uri), f"read {where}", 120)
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise StageError(f"{where} cannot be read ({e}); the run's outputs cannot be verified") from None
        except Exception as e:
            if any(m in str(e).lower() for m in ("not found", "no such file", "does not exist")):
                raise StageError(f"{where} is missing from MLflow; the run's outputs cannot be verified") from None
            raise


def load_record(tracking: Tracking, run: Any) -> Record:
    """The outputs record of a finished run, checked against its tags (the hashes there are the lineage others
    recorded, the location is the run's own); a record that does not add up raises StageError."""
    rid = run.info.run_id
    tags = run.data.tags
    where = f"the output record ({OUTPUTS_RECORD}) of run {rid}"
    record = _RECORDS.get(rid)
    if record is None:
        data = _download_record(tracking, rid, where)
        if not isinstance(data, dict) or not isinstance(data.get("outputs"), dict):
            raise StageError(f"{where} is not an output record; it was altered")
        record = Record(str(data.get("location", "")),
                        {n: _parse_output(n, d, where) for n, d in data["outputs"].items()})
    check_location(record.location, tags.get(TAG_STAGE, ""), rid)
    if tags.get(TAG_LOCATION) != record.location:
        raise StageError(f"{where} names location {record.location}, the run's {TAG_LOCATION} tag another; one of "
                         "them was altered, so the outputs are not used")
    for n in [o for o in tags.get(TAG_OUTPUTS, "").split(",") if o]:
        out = record.outputs.get(n)
        if (out is None or out.sha256 != tags.get(f"llm.output.{n}.sha256")
                or out.artifact != tags.get(f"llm.output.{n}.artifact")):
            raise StageError(f"{where} does not match the run's tags for output '{n}'; one of them was altered")
    _RECORDS[rid] = record
    return record


def stored_problem(tracking: Tracking, run: Any) -> str | None:
    """What is wrong with a finished run's stored outputs (removed, missing, resized, rewritten with other bytes),
    or None; see the module docstring."""
    if removed := run.data.tags.get(TAG_REMOVED):
        return f"its outputs were removed ({removed})"
    try:
        record = load_record(tracking, run)
    except StageError as e:
        return str(e)
    store = open_store(record.location)
    stored = store.listing(record.location)
    for name, out in record.outputs.items():
        have = {k[len(name) + 1:]: v for k, v in stored.items() if k.startswith(f"{name}/")}
        missing = [rel for rel in sorted(out.files) if rel not in have]
        extra = [rel for rel in sorted(have) if rel not in out.files]
        head = f"output '{name}' ({out.artifact}) at {record.location}"
        if missing:
            return f"{head} is missing {len(missing)} of its {len(out.files)} files ({', '.join(missing[:3])})"
        if extra:
            return f"{head} holds files its manifest does not list ({', '.join(extra[:3])})"
        for rel, e in sorted(out.files.items()):
            nbytes, fingerprint = have[rel]
            if nbytes != e.nbytes:
                return f"{head}: {rel} holds {nbytes} bytes; the run recorded {e.nbytes}"
            if fingerprint != e.fingerprint and store.file_sha256(record.location, f"{name}/{rel}") != e.sha256:
                return f"{head}: {rel} was rewritten with other bytes (its sha256 is not the recorded one)"
    return None


def stored_files(tracking: Tracking, run: Any, name: str) -> dict[str, str] | None:
    """Relative path -> sha256 of each file of output `name` as the run recorded it (None for a run from before the
    artifact root)."""
    if not run.data.tags.get(TAG_LOCATION):
        return None
    out = load_record(tracking, run).outputs.get(name)
    return None if out is None else {rel: e.sha256 for rel, e in out.files.items()}


def output_path(tracking: Tracking, run: Any, artifact: str, sha256: str, work_dir: Path,
                manifest: Mapping[str, str] | None, what: str | None, cache_bytes: int) -> Path:
    """A verified local path of a run's output (see the module docstring). With `manifest` (relative path ->
    sha256, as a registered model version records it), the run's manifest must list exactly those files."""
    rid = run.info.run_id
    record = load_record(tracking, run)
    out = next((o for o in record.outputs.values() if o.artifact == artifact), None)
    what = what or f"output '{artifact}' of run {rid}"
    if out is None:
        raise StageError(f"{what}: run {rid} recorded no output at '{artifact}' (its outputs: "
                         f"{', '.join(sorted(record.outputs)) or 'none'})")
    stage = run.data.tags.get(TAG_STAGE, "?")
    fix = fix_hint(stage)
    if out.sha256 != sha256:
        raise StageError(f"{what}: the run recorded sha256 {out.sha256[:12]}, the reference to it {sha256[:12]}; "
                         "one of the two was altered, so the output is not used")
    if manifest is not None:
        have = {rel: e.sha256 for rel, e in out.files.items()}
        differ = sorted(r for r in set(have) | set(manifest) if have.get(r) != manifest.get(r))
        if differ:
            raise damaged(what, [f"{r} ({'missing' if r not in have else 'sha256 ' + have[r][:12]})"
                                 for r in differ], "Restore them, or register the model again (llm-pipeline run "
                                 "--force)")
    store = open_store(record.location)
    if isinstance(store, LocalStore):
        if not Path(record.location).is_dir():
            raise StageError(f"{what} is not at {record.location}: it was removed (`llm-pipeline gc`), or stored on "
                             f"another machine's disk (point pipeline.artifact_root at storage every machine reaches: "
                             f"s3://..., a shared mount). {fix}")
        path = read_in_place(store, record.location, out.name, out.files, out.single, work_dir, what, fix)
        return check_inside(path, Path(record.location), what)
    return Cache(work_dir, cache_bytes).fetch(store, record.location, out.name, out.sha256, out.files, out.single,
                                              what, fix)
