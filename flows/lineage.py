"""Lineage in MLflow: the tags a stage run records, finding the upstream runs a stage starts from, its input
references, the finished run with a given cache key, and fetching (verified) artifacts of earlier runs."""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.outputs import TAG_LOCATION, output_path, stored_problem
from flows.paths import check_inside, check_run_id, safe_artifact_path
from flows.specs import DEFAULT_CACHE_GB, StageSpec
from flows.tracking import Tracking, call_with_retry, is_transient
from llm.files import atomic_dir, sha256_tree
from stages.common import StageError

TAG_STAGE = "llm.stage"
TAG_CACHE_KEY = "llm.cache_key"
TAG_CODE = "llm.code_version"
TAG_PIPELINE = "llm.pipeline"  # "true" on a pipeline (parent) run
TAG_PIPELINE_RUN = "llm.pipeline_run_id"
TAG_OUTPUTS = "llm.outputs"
PARENT_TAG = "mlflow.parentRunId"
TAG_DAMAGED = "llm.artifacts_damaged"  # on a finished run whose stored outputs no longer match what it recorded

log = logging.getLogger(__name__)


@dataclass
class InputRef:
    name: str
    stage: str
    run_id: str
    artifact: str
    sha256: str
    uri: str = ""  # where the output is stored (its run's location), for the MLflow dataset's source


def get_run(tracking: Tracking, run_id: str) -> Any:
    check_run_id(run_id)
    try:
        return tracking.client.get_run(run_id)
    except Exception as e:
        if is_transient(e):
            raise
        raise StageError(f"MLflow run {run_id} not found at {tracking.uri}; check the id (--from-run)") from e


def _finished(tracking: Tracking, tags: Mapping[str, str], limit: int) -> list[Any]:
    """Up to `limit` FINISHED runs carrying all of `tags`, most recently started first."""
    where = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    return list(tracking.client.search_runs(
        [tracking.experiment_id],
        filter_string=" and ".join([*where, "attributes.status = 'FINISHED'"]),
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    ))  # fmt: skip


def latest_run(tracking: Tracking, stage: str) -> Any | None:
    runs = _finished(tracking, {TAG_STAGE: stage}, 1)
    return runs[0] if runs else None


def find_cached(tracking: Tracking, stage: str, key: str) -> Any | None:
    """The newest FINISHED run of `stage` with cache key `key` whose outputs are all in the artifact store, as many
    files and bytes as it recorded. A run whose stored outputs went missing or changed size since is passed over
    (and tagged), so the stage computes again instead of handing a broken run downstream."""
    for run in _finished(tracking, {TAG_STAGE: stage, TAG_CACHE_KEY: key}, 10):
        rid = run.info.run_id
        problem = call_with_retry(lambda r=run: artifact_problem(tracking, r), f"check artifacts of run {rid}", 120)
        if problem is None:
            return run
        log.warning("stage %s: not reusing finished run %s: %s", stage, rid, problem)
        if run.data.tags.get(TAG_DAMAGED) != problem:
            try:  # shown in the MLflow UI: why the run is no longer reused
                tracking.client.set_tag(rid, TAG_DAMAGED, problem)
            except Exception as e:
                log.warning("could not tag run %s as damaged: %s", rid, e)
    return None


def _stored_files(tracking: Tracking, run_id: str, artifact: str) -> dict[str, int | None]:
    """Artifact path -> size (None where the store does not say) of each file of `artifact` (a file or a folder)
    in the run's artifact store."""
    found: dict[str, int | None] = {}
    todo: list[str | None] = [posixpath.dirname(artifact) or None]
    while todo:
        for f in tracking.client.list_artifacts(run_id, todo.pop()):
            if f.path != artifact and not f.path.startswith(artifact + "/"):
                continue
            if f.is_dir:
                todo.append(f.path)
            else:
                found[f.path] = None if f.file_size is None else int(f.file_size)
    return found


def artifact_problem(tracking: Tracking, run: Any) -> str | None:
    """What is wrong with a finished run's stored outputs, or None. A run that records a location under the
    artifact root is checked there (`flows.outputs.stored_problem`). Runs from before the artifact root kept their
    outputs in MLflow's artifact store: listed there and compared with the file count and bytes they recorded
    (contents are checked against the sha256 when a stage downloads them); the oldest only for presence."""
    tags = run.data.tags
    if tags.get(TAG_LOCATION):
        return stored_problem(tracking, run)
    for out in [o for o in tags.get(TAG_OUTPUTS, "").split(",") if o]:
        art = tags.get(f"llm.output.{out}.artifact", "")
        try:
            art = safe_artifact_path(art, f"output '{out}'")
        except StageError as e:  # a tampered tag: never followed, and never reused
            return str(e)
        stored = _stored_files(tracking, run.info.run_id, art)
        files, nbytes = tags.get(f"llm.output.{out}.files"), tags.get(f"llm.output.{out}.bytes")
        if not stored and files != "0":  # an empty output folder leaves nothing in the store
            return f"output '{out}' ({art}) is missing from the artifact store"
        sizes = [n for n in stored.values() if n is not None]
        got = str(sum(sizes)) if len(sizes) == len(stored) else nbytes  # a store that lists no sizes: count only
        if files is not None and (str(len(stored)), got) != (files, nbytes):
            return (
                f"output '{out}' ({art}) holds {len(stored)} files, {got} bytes in the artifact store; the run "
                f"recorded {files} files, {nbytes} bytes"
            )
    return None


def _chosen_runs(tracking: Tracking, from_run: Sequence[str], chosen: dict[str, str]) -> None:
    """Fill `chosen` (stage -> run id) from --from-run items: a pipeline run brings all its stage runs, a stage run
    brings itself and its recorded ancestors; entries already in `chosen` win."""
    queue: list[Any] = []
    for item in from_run:
        item = item.strip()
        if not item or item == "latest":
            continue
        stage, _, rid = item.rpartition("=")
        run = get_run(tracking, rid)
        if stage:
            if run.data.tags.get(TAG_STAGE) != stage:
                raise StageError(f"--from-run {item}: run {rid} is not a '{stage}' stage run")
            chosen.setdefault(stage, rid)
        queue.append(run)
    seen: set[str] = set()
    while queue:
        run = queue.pop(0)
        if run.info.run_id in seen:
            continue
        seen.add(run.info.run_id)
        tags = run.data.tags
        if tags.get(TAG_PIPELINE) == "true":
            for k, v in tags.items():
                if k.startswith("llm.stage_run."):
                    chosen.setdefault(k.removeprefix("llm.stage_run."), v)
        elif tags.get(TAG_STAGE):
            chosen.setdefault(tags[TAG_STAGE], run.info.run_id)
            for k, v in tags.items():
                if k.startswith("llm.upstream.") and k.removeprefix("llm.upstream.") not in chosen:
                    queue.append(get_run(tracking, v))


def resolve_upstream(
    tracking: Tracking,
    spec: StageSpec,
    from_run: Sequence[str] | None = None,
    upstream: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Upstream stage -> MLflow run, from (in order of precedence) `upstream`, `from_run`, the latest finished run.

    Each `from_run` item is `RUN_ID` or `stage=RUN_ID`. A pipeline run id brings all its stage runs; a stage run
    brings itself and its recorded ancestors.
    """
    chosen: dict[str, str] = {k: check_run_id(v) for k, v in (upstream or {}).items()}
    _chosen_runs(tracking, from_run or [], chosen)
    runs: dict[str, Any] = {}
    for stage in spec.upstream_stages:
        if stage in chosen:
            run = get_run(tracking, chosen[stage])
            if run.info.status != "FINISHED" or run.data.tags.get(TAG_STAGE) != stage:
                raise StageError(
                    f"run {run.info.run_id} is not a finished '{stage}' run (status {run.info.status}); "
                    f"pass a finished run with --from-run {stage}=<run id>"
                )
        else:
            run = latest_run(tracking, stage)
            if run is None:
                raise StageError(
                    f"stage '{spec.name}' needs a finished '{stage}' run, and experiment "
                    f"'{tracking.experiment_name}' at {tracking.uri} has none; run `llm-pipeline stage {stage}` "
                    f"first or pass --from-run {stage}=<run id>"
                )
        runs[stage] = run
    return runs


def input_refs(spec: StageSpec, runs: Mapping[str, Any]) -> list[InputRef]:
    refs = []
    for name, (stage, output) in sorted(spec.inputs.items()):
        run = runs[stage]
        tags = run.data.tags
        art, sha = tags.get(f"llm.output.{output}.artifact"), tags.get(f"llm.output.{output}.sha256")
        if not art or not sha:
            if name in spec.optional:
                continue
            raise StageError(
                f"stage '{spec.name}' needs output '{output}' of the '{stage}' run {run.info.run_id}, which did "
                f"not record it (its outputs: {tags.get(TAG_OUTPUTS, 'none')})"
            )
        art = safe_artifact_path(art, f"output '{output}'")
        uri = f"{tags[TAG_LOCATION]}/{art}" if tags.get(TAG_LOCATION) else ""
        refs.append(InputRef(name, stage, run.info.run_id, art, sha, uri))
    return refs


def fetch_artifact(tracking: Tracking, run_id: str, artifact: str, sha256: str, work_dir: Path,
                   manifest: Mapping[str, str] | None = None, what: str | None = None,
                   cache_gb: float = DEFAULT_CACHE_GB) -> Path:
    """A verified local path of a run's output, checked against its sha256 before it is returned.

    A run that records a location under the artifact root is read from there: in place on a local root, through
    the bounded cache in `work_dir` from an object store (`flows.outputs.output_path`). Older runs kept their
    outputs in MLflow's artifact store: downloaded once into work_dir/inputs, and a local copy that no longer
    matches is fetched again. With `manifest` (relative path -> sha256 of each file, as a registered model version
    records it), files that do not match are named; `what` names the artifact in messages (default: the artifact
    and its run)."""
    check_run_id(run_id)
    artifact = safe_artifact_path(artifact)
    run = get_run(tracking, run_id)
    if run.data.tags.get(TAG_LOCATION):
        return output_path(tracking, run, artifact, sha256, work_dir, manifest, what, int(cache_gb * 1e9))
    what = what or f"artifact {artifact} of run {run_id}"
    root = work_dir / "inputs" / run_id
    local = root / artifact
    check_inside(local, work_dir, "artifact destination")
    if local.exists():
        if sha256_tree(local) == sha256:
            return local
        changed = _manifest_problems(local, manifest)
        log.warning("the local copy %s of %s does not match its recorded sha256%s; fetching it again", local, what,
                    f" ({', '.join(changed[:3])})" if changed else "")
    import mlflow.artifacts

    top, _, rest = artifact.partition("/")
    with atomic_dir(root / top) as tmp:

        def download() -> str:
            return mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=top, dst_path=str(tmp), tracking_uri=tracking.uri
            )

        call_with_retry(download, f"download of {top} from run {run_id}", deadline_s=120)
        for f in tmp.rglob("*"):
            check_inside(f, tmp, f"downloaded file of run {run_id}")
        # download_artifacts puts the folder under dst/<top>; lift its contents to the staging root
        inner = tmp / top
        if inner.is_dir():
            for child in list(inner.iterdir()):
                child.rename(tmp / child.name)
            inner.rmdir()
        staged = tmp / rest if rest else tmp
        if not staged.exists():
            raise StageError(f"{what} is missing in the artifact store")
        got = sha256_tree(staged)
        if got != sha256:  # checked before the copy takes the final name, so a corrupt copy is never reused
            changed = _manifest_problems(staged, manifest)
            if changed:
                raise StageError(
                    f"{what}: {'; '.join(changed)} in the artifact store does not match the sha256 manifest recorded "
                    "with it; the stored files were altered, so they are not used. Restore them, or register the "
                    "model again (llm-pipeline run --force)"
                )
            raise StageError(
                f"{what} does not match its recorded sha256 ({got[:12]} != {sha256[:12]}); the artifact store is "
                "corrupt: rerun that stage with --force"
            )
    return local


def run_output(tracking: Tracking, run_id: str, name: str, work_dir: Path) -> Path:
    """A verified local path of output `name` of a stage run (by the name its `llm.outputs` tag lists), wherever it
    is stored; see `fetch_artifact`."""
    tags = get_run(tracking, run_id).data.tags
    art, sha = tags.get(f"llm.output.{name}.artifact"), tags.get(f"llm.output.{name}.sha256")
    if not art or not sha:
        raise StageError(f"run {run_id} recorded no output '{name}' (its outputs: {tags.get(TAG_OUTPUTS) or 'none'})")
    return fetch_artifact(tracking, run_id, art, sha, work_dir)


def _manifest_problems(folder: Path, manifest: Mapping[str, str] | None) -> list[str]:
    if not manifest:
        return []
    from flows.registry import manifest_problems  # flows.registry imports this module

    return manifest_problems(folder, manifest)


def _input_profile(local: Path) -> dict[str, Any]:
    """Scalar fields of an input folder's manifest.json, shown with the dataset in MLflow."""
    manifest = local / "manifest.json" if local.is_dir() else None
    if not manifest or not manifest.is_file():
        return {}
    try:
        m = json.loads(manifest.read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    return {k: v for k, v in m.items() if isinstance(v, int | float | str) and len(str(v)) < 200}


def log_inputs(tracking: Tracking, run_id: str, refs: Sequence[InputRef], local: Mapping[str, Path]) -> None:
    """Record the inputs as MLflow datasets of the run (name, digest, the run and artifact they came from)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    datasets = []
    for ref in refs:
        profile = _input_profile(local[ref.name])
        ds = Dataset(
            name=f"{ref.stage}.{ref.name}",
            digest=ref.sha256[:16],
            source_type="mlflow_run_artifact",
            source=json.dumps({"run_id": ref.run_id, "artifact_path": ref.artifact,
                               **({"uri": ref.uri} if ref.uri else {})}),
            profile=json.dumps(profile) if profile else None,
        )
        datasets.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", ref.name)]))
    if datasets:
        try:
            tracking.client.log_inputs(run_id, datasets=datasets)
        except Exception as e:
            if "UNIQUE constraint" not in str(e) and "IntegrityError" not in str(e):
                raise
            # another stage run logged the same dataset to the experiment at the same moment: it exists now, and
            # the second call links it to this run
            tracking.client.log_inputs(run_id, datasets=datasets)
