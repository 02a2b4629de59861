"""One Prefect flow per stage, wrapping the plain stage function with MLflow hand-off, caching and retries.

What a stage flow does, in order:
1. finds its upstream runs (given ids, a pipeline run id, lineage of a given run, or the latest finished run),
2. computes the cache key = hash(stage config, upstream output content hashes, code version); a finished run
   with that key is reused unless `force`,
3. downloads the upstream artifacts (verified against their recorded sha256) into the work dir,
4. opens an MLflow child run tagged `llm.stage=<name>`, logs params, inputs, lineage and system metrics,
5. calls `stages.<name>.run(cfg, inputs, out_dir, tracker)`, then logs metrics, artifacts, samples and plots,
6. publishes Prefect artifacts (metrics table, MLflow link, sample generations).
Steps 3-5 run in a Prefect task retried with backoff for transient errors only.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, Field

# Loaded by file path (`prefect deploy flows/stages.py:sft_flow`), Prefect puts flows/ first on sys.path, where
# flows/stages.py would shadow the `stages` package; take that entry out before the project imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
if __name__ == "stages":  # ... and registered this file under the package's name
    del sys.modules["stages"]

from flows.config import STAGES, PipelineSection, StageSpec  # noqa: E402
from flows.tracking import MlflowTracker, Tracking, call_with_retry, is_remote, is_transient, setup_tracking  # noqa: E402
from stages.common import StageError, StageResult, atomic_dir, sha256_tree  # noqa: E402

log = logging.getLogger(__name__)

TAG_STAGE = "llm.stage"
TAG_CACHE_KEY = "llm.cache_key"
TAG_CODE = "llm.code_version"
TAG_PIPELINE = "llm.pipeline"  # "true" on a pipeline (parent) run
TAG_PIPELINE_RUN = "llm.pipeline_run_id"
TAG_OUTPUTS = "llm.outputs"
TAG_REUSED_FROM = "llm.reused_from"
PARENT_TAG = "mlflow.parentRunId"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LIBS = ("torch", "transformers", "trl", "peft", "tokenizers", "datasets", "pyarrow")


def safe_artifact_path(rel: str, what: str = "artifact path") -> str:
    """An artifact path relative to its run: posix, no absolute path, no `..`; anything else is refused."""
    if not rel or "\\" in rel or "\0" in rel:
        raise StageError(f"{what} {rel!r} is not a plain relative path; refusing to use it")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")) or rel.startswith("~"):
        raise StageError(f"{what} {rel!r} would escape its folder (absolute or '..'); refusing to use it")
    return p.as_posix()


def check_inside(path: Path, root: Path, what: str) -> Path:
    """`path` (symlinks resolved) must lie under `root`; a StageError names it otherwise."""
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise StageError(f"{what} {path} resolves to {real}, outside {root}; refusing to use it")
    return real


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise StageError(f"{run_id!r} is not an MLflow run id (letters, digits, '-', '_'); pass e.g. --from-run <id>")
    return run_id


_OWN_PACKAGES = ("stages", "llm")


@cache
def _imports_of(path: str, modname: str) -> tuple[str, ...]:
    """Project modules (`stages.*`, `llm.*`) a source file imports, found statically (no import side effects)."""
    tree = ast.parse(Path(path).read_text(), filename=path)
    pkg = modname if path.endswith("__init__.py") else modname.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] in _OWN_PACKAGES:
                found.add(n)
    return tuple(sorted(found))


def _source_closure(modname: str) -> dict[str, str]:
    """Module name -> source file for a module and every project module it (transitively) imports."""
    seen: dict[str, str] = {}
    todo = [modname]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py"):
            if name not in (modname,) and "." in name:
                seen[name] = ""  # `from pkg import name` where name is not a module
            continue
        seen[name] = origin
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # importing a.b runs a/__init__.py first
        todo.extend(_imports_of(origin, name))
    return {k: v for k, v in seen.items() if v}


def code_version(spec: StageSpec) -> str:
    """Hash of the code a stage's result depends on: its module, the project modules it imports (transitively),
    and the versions of the libraries that compute it. Editing another stage's module does not change it."""
    files = _source_closure(spec.module)
    if not files:  # a module without a source file (built in memory, e.g. in tests): its name stands in
        files = {spec.module: ""}
    h = hashlib.sha256()
    for name, path in sorted(files.items()):
        h.update(name.encode() + b"\0")
        if path:
            h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    for lib in _LIBS:
        try:
            h.update(f"{lib}=={importlib.metadata.version(lib)};".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def cache_key(stage: str, cfg: BaseModel, input_hashes: Mapping[str, str], code: str) -> str:
    blob = json.dumps(
        {"stage": stage, "config": cfg.model_dump(mode="json"), "inputs": dict(input_hashes), "code": code},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, list | dict | bool) or v is None else str(v)
            out[key] = s if len(s) <= 6000 else s[:5997] + "..."
    return out


@dataclass
class InputRef:
    name: str
    stage: str
    run_id: str
    artifact: str
    sha256: str


@dataclass
class StageOutcome:
    """What a stage flow returns (JSON-friendly, so Prefect can show and pass it)."""

    stage: str
    run_id: str
    reused: bool
    cache_key: str
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # output name -> artifact path in the run
    output_hashes: dict[str, str] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)  # upstream stage -> run id
    samples: list[dict[str, Any]] = field(default_factory=list)
    link: str | None = None  # MLflow UI address of the run (None for the embedded store: no server)
    upstream_links: dict[str, str] = field(default_factory=dict)  # upstream stage -> MLflow UI address of its run
    tracking_uri: str = ""
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- links

# MLflow 3 opens runs in its GenAI view unless the address says otherwise (the UI reads `workflowType` from the query
# inside the hash route); these runs are model training, so every link we publish asks for that view.
ML_VIEW_QUERY = "workflowType=machine_learning"


def ml_view(link: str | None) -> str | None:
    """`link` (an MLflow UI address) opening MLflow's model-training view rather than the GenAI one."""
    if not link or "workflowType=" in link:
        return link
    return f"{link}{'&' if '?' in link.rpartition('#')[2] else '?'}{ML_VIEW_QUERY}"


def run_link(tracking: Tracking, run_id: str) -> str | None:
    """MLflow UI address of a run in the model-training view; None for the embedded store (no server to link)."""
    return ml_view(tracking.run_link(run_id))


def experiment_link(tracking: Tracking) -> str | None:
    """MLflow UI address of the experiment's runs table (model-training view); None for the embedded store."""
    if not is_remote(tracking.uri):
        return None
    return ml_view(f"{tracking.uri.rstrip('/')}/#/experiments/{tracking.experiment_id}/runs")


# ---------------------------------------------------------------------------------------------------- lineage


def _get_run(tracking: Tracking, run_id: str) -> Any:
    check_run_id(run_id)
    try:
        return tracking.client.get_run(run_id)
    except Exception as e:
        if is_transient(e):
            raise
        raise StageError(f"MLflow run {run_id} not found at {tracking.uri}; check the id (--from-run)") from e


def latest_run(tracking: Tracking, stage: str) -> Any | None:
    runs = tracking.client.search_runs(
        [tracking.experiment_id],
        filter_string=f"tags.`{TAG_STAGE}` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


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
    queue: list[Any] = []
    for item in from_run or []:
        item = item.strip()
        if not item or item == "latest":
            continue
        stage, _, rid = item.rpartition("=")
        run = _get_run(tracking, rid)
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
                    queue.append(_get_run(tracking, v))
    runs: dict[str, Any] = {}
    for stage in spec.upstream_stages:
        if stage in chosen:
            run = _get_run(tracking, chosen[stage])
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
        refs.append(InputRef(name, stage, run.info.run_id, safe_artifact_path(art, f"output '{output}'"), sha))
    return refs


def find_cached(tracking: Tracking, stage: str, key: str) -> Any | None:
    runs = tracking.client.search_runs(
        [tracking.experiment_id],
        filter_string=(
            f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_CACHE_KEY}` = '{key}' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def fetch_artifact(tracking: Tracking, run_id: str, artifact: str, sha256: str, work_dir: Path) -> Path:
    """Local copy of a run's artifact under work_dir/inputs, downloaded once and checked against its sha256."""
    check_run_id(run_id)
    artifact = safe_artifact_path(artifact)
    root = work_dir / "inputs" / run_id
    local = root / artifact
    check_inside(local, work_dir, "artifact destination")
    if local.exists() and sha256_tree(local) == sha256:
        return local
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
            raise StageError(f"artifact {artifact} of run {run_id} is missing in the artifact store")
        got = sha256_tree(staged)
        if got != sha256:  # checked before the copy takes the final name, so a corrupt copy is never reused
            raise StageError(
                f"artifact {artifact} of run {run_id} does not match its recorded sha256 ({got[:12]} != "
                f"{sha256[:12]}); the artifact store is corrupt: rerun that stage with --force"
            )
    return local


# ---------------------------------------------------------------------------------------------------- running


def _outcome_from_run(tracking: Tracking, run: Any, reused: bool) -> StageOutcome:
    tags = run.data.tags
    outputs = [o for o in tags.get(TAG_OUTPUTS, "").split(",") if o]
    samples: list[dict[str, Any]] = []
    upstream = {k.removeprefix("llm.upstream."): v for k, v in tags.items() if k.startswith("llm.upstream.")}
    return StageOutcome(
        stage=tags.get(TAG_STAGE, ""),
        run_id=run.info.run_id,
        reused=reused,
        cache_key=tags.get(TAG_CACHE_KEY, ""),
        metrics={k: v for k, v in run.data.metrics.items() if not k.startswith("system/")},
        outputs={o: tags.get(f"llm.output.{o}.artifact", "") for o in outputs},
        output_hashes={o: tags.get(f"llm.output.{o}.sha256", "") for o in outputs},
        upstream=upstream,
        samples=samples,
        link=run_link(tracking, run.info.run_id),
        upstream_links=_links(tracking, upstream),
        tracking_uri=tracking.uri,
    )


def _links(tracking: Tracking, run_ids: Mapping[str, str]) -> dict[str, str]:
    return {k: link for k, rid in run_ids.items() if (link := run_link(tracking, rid))}


def _log_inputs(tracking: Tracking, run_id: str, refs: Sequence[InputRef], local: Mapping[str, Path]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    datasets = []
    for ref in refs:
        profile: dict[str, Any] = {}
        manifest = local[ref.name] / "manifest.json" if local[ref.name].is_dir() else None
        if manifest and manifest.is_file():
            try:
                m = json.loads(manifest.read_text())
                profile = {k: v for k, v in m.items() if isinstance(v, int | float | str) and len(str(v)) < 200}
            except (json.JSONDecodeError, OSError):
                profile = {}
        ds = Dataset(
            name=f"{ref.stage}.{ref.name}",
            digest=ref.sha256[:16],
            source_type="mlflow_run_artifact",
            source=json.dumps({"run_id": ref.run_id, "artifact_path": ref.artifact}),
            profile=json.dumps(profile) if profile else None,
        )
        datasets.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", ref.name)]))
    if datasets:
        tracking.client.log_inputs(run_id, datasets=datasets)


def _check_outputs(result: StageResult, out_dir: Path, stage: str) -> dict[str, Path]:
    if not isinstance(result, StageResult):
        raise StageError(f"stage '{stage}' returned {type(result).__name__}, not a StageResult")
    outs: dict[str, Path] = {}
    for name, p in result.outputs.items():
        if not _SAFE_NAME.match(name):
            raise StageError(f"stage '{stage}' output name {name!r} is not a plain name (letters, digits, _ . -)")
        path = check_inside(Path(p), out_dir, f"stage '{stage}' output '{name}'")
        if not path.exists():
            raise StageError(f"stage '{stage}' reported output '{name}' at {p}, which does not exist")
        if path.is_dir():  # a symlink inside an output must not smuggle files from outside into the artifact store
            for f in path.rglob("*"):
                check_inside(f, out_dir, f"file {f.relative_to(path)} of stage '{stage}' output '{name}'")
        outs[name] = path
    return outs


def _log_outputs(tracking: Tracking, run_id: str, outs: Mapping[str, Path], deadline_s: float) -> dict[str, str]:
    client = tracking.client
    arts: dict[str, str] = {}
    for name, path in outs.items():
        if path.is_dir():
            call_with_retry(lambda p=path, n=name: client.log_artifacts(run_id, str(p), n), f"upload {name}", deadline_s)
            arts[name] = name
        else:
            call_with_retry(lambda p=path, n=name: client.log_artifact(run_id, str(p), n), f"upload {name}", deadline_s)
            arts[name] = f"{name}/{path.name}"
    return arts


def _start_system_metrics(tracking: Tracking, run_id: str) -> Any | None:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=tracking.uri)
        mon.start()
        return mon
    except Exception as e:  # psutil missing or similar: tracking extras must never fail a stage
        log.warning("system metrics disabled: %s", e)
        return None


def find_reusable(
    spec: StageSpec,
    cfg: BaseModel,
    tracking: Tracking,
    *,
    from_run: Sequence[str] | None = None,
    upstream: Mapping[str, str] | None = None,
) -> tuple[StageOutcome | None, dict[str, Any], list[InputRef], str]:
    """Upstream runs, input refs and cache key of a stage, plus the finished run with that key if there is one."""
    runs = resolve_upstream(tracking, spec, from_run, upstream)
    refs = input_refs(spec, runs)
    key = cache_key(spec.name, cfg, {r.name: r.sha256 for r in refs}, code_version(spec))
    hit = find_cached(tracking, spec.name, key)
    return (_outcome_from_run(tracking, hit, reused=True) if hit else None), runs, refs, key


def run_stage(
    spec: StageSpec,
    cfg: BaseModel,
    pipeline: PipelineSection,
    *,
    from_run: Sequence[str] | None = None,
    upstream: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    force: bool = False,
    tracking: Tracking | None = None,
    retrying: bool = False,
) -> StageOutcome:
    """Resolve inputs, reuse a cached run or execute the stage under a new MLflow run; see the module docstring.

    `force` starts the stage from an empty output folder, except on a retry (`retrying`), which resumes the
    partial work of the failed attempt (stages are idempotent and resume from their checkpoints).
    """
    t0 = time.monotonic()
    module = spec.load()
    if not isinstance(cfg, module.Config):
        cfg = module.Config.model_validate(cfg.model_dump() if isinstance(cfg, BaseModel) else cfg)
    tracking = tracking or setup_tracking(pipeline.experiment, pipeline.work_dir, pipeline.offline_tracking)
    client = tracking.client
    work_dir = Path(pipeline.work_dir).resolve()

    hit, runs, refs, key = find_reusable(spec, cfg, tracking, from_run=from_run, upstream=upstream)
    force = force or pipeline.force
    if hit is not None and not force:
        log.info("stage %s: reusing finished run %s (same config, inputs and code)", spec.name, hit.run_id)
        hit.wall_s = time.monotonic() - t0
        return hit

    local = {r.name: fetch_artifact(tracking, r.run_id, r.artifact, r.sha256, work_dir) for r in refs}
    out_dir = work_dir / "stages" / spec.name / key[:16]
    check_inside(out_dir, work_dir, "stage output folder")
    if force and not retrying and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tags = {
        TAG_STAGE: spec.name,
        TAG_CACHE_KEY: key,
        TAG_CODE: code_version(spec),
        "mlflow.source.name": f"flows.stages:{spec.name}",
        **{f"llm.upstream.{s}": r.info.run_id for s, r in runs.items()},
        **{f"llm.input.{r.name}.run_id": r.run_id for r in refs},
        **{f"llm.input.{r.name}.artifact": r.artifact for r in refs},
        **{f"llm.input.{r.name}.sha256": r.sha256 for r in refs},
    }
    if parent_run_id:
        tags[PARENT_TAG] = tags[TAG_PIPELINE_RUN] = check_run_id(parent_run_id)
    run = client.create_run(tracking.experiment_id, run_name=spec.name, tags=tags)
    run_id = run.info.run_id
    tracker = MlflowTracker(client, run_id, spill_path=work_dir / "tracking" / f"{run_id}.jsonl")
    monitor = None
    try:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(cfg.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
        _log_inputs(tracking, run_id, refs, local)
        if pipeline.system_metrics:
            monitor = _start_system_metrics(tracking, run_id)
        log.info("stage %s: running in MLflow run %s (out_dir %s)", spec.name, run_id, out_dir)

        result = module.run(cfg, dict(local), out_dir, tracker)

        outs = _check_outputs(result, out_dir, spec.name)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        if metrics:
            tracker.log_metrics(metrics)
        tracker.close(timeout=pipeline.tracking_wait_s)
        hashes = {n: sha256_tree(p) for n, p in outs.items()}
        arts = _log_outputs(tracking, run_id, outs, pipeline.tracking_wait_s)
        if result.samples:
            import pandas as pd

            frame = pd.DataFrame([{k: _jsonable(v) for k, v in row.items()} for row in result.samples])
            call_with_retry(lambda: client.log_table(run_id, frame, "samples.json"), "log samples", 60)
        for pname, ppath in result.plots.items():
            p = check_inside(Path(ppath), out_dir, f"plot {pname}")
            call_with_retry(lambda p=p: client.log_artifact(run_id, str(p), "plots"), "upload plot", 60)
        out_tags = {TAG_OUTPUTS: ",".join(sorted(arts))}
        for n in arts:
            out_tags[f"llm.output.{n}.artifact"] = arts[n]
            out_tags[f"llm.output.{n}.sha256"] = hashes[n]
        from mlflow.entities import RunTag

        def finish() -> None:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in out_tags.items()])
            client.set_terminated(run_id, "FINISHED")

        if monitor is not None:
            _stop_monitor(monitor)
            monitor = None
        call_with_retry(finish, "finish run", pipeline.tracking_wait_s)
    except BaseException as e:
        if monitor is not None:
            _stop_monitor(monitor)
        try:
            tracker.close(timeout=5)
        except Exception:
            log.warning("stage %s: metrics not delivered; they stay in %s", spec.name, tracker.spill_path)
        try:
            client.set_tag(run_id, "llm.error", f"{type(e).__name__}: {e}"[:4000])
            client.set_terminated(run_id, "FAILED")
        except Exception:
            log.warning("stage %s: could not mark run %s as failed", spec.name, run_id)
        raise
    return StageOutcome(
        stage=spec.name,
        run_id=run_id,
        reused=False,
        cache_key=key,
        metrics=metrics,
        outputs=arts,
        output_hashes=hashes,
        upstream={s: r.info.run_id for s, r in runs.items()},
        samples=[{k: _jsonable(v) for k, v in row.items()} for row in result.samples[:50]],
        link=run_link(tracking, run_id),
        upstream_links=_links(tracking, {s: r.info.run_id for s, r in runs.items()}),
        tracking_uri=tracking.uri,
        wall_s=time.monotonic() - t0,
    )


def _stop_monitor(monitor: Any) -> None:
    try:
        monitor.finish()
    except Exception as e:
        log.warning("system metrics monitor did not stop cleanly: %s", e)


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, str | int | float | bool) or v is None else str(v)


# ---------------------------------------------------------------------------------------------------- Prefect


def stage_summary_markdown(out: StageOutcome) -> str:
    """The `<stage>-summary` Prefect artifact: the run (linked to MLflow), its upstream runs (linked), metrics."""
    status = f"reused finished run `{out.run_id}` (cache hit)" if out.reused else f"new run `{out.run_id}`"
    lines = [f"### {out.stage}: {status}", ""]
    if out.link:
        lines += [f"MLflow run: [{out.run_id}]({out.link})", ""]
    elif out.tracking_uri:
        lines += [f"MLflow run `{out.run_id}` in `{out.tracking_uri}`; browse it with "
                  f"`mlflow ui --backend-store-uri {out.tracking_uri}` or `llm-pipeline up`", ""]
    if out.upstream:
        ups = [f"{s} [{r}]({out.upstream_links[s]})" if out.upstream_links.get(s) else f"{s} `{r}`"
               for s, r in sorted(out.upstream.items())]
        lines += ["Upstream runs: " + ", ".join(ups), ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted(out.metrics.items())]
    return "\n".join(lines)


def publish_prefect_artifacts(out: StageOutcome) -> None:
    """Metrics table, MLflow link and sample generations on the current Prefect flow run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    key = re.sub(r"[^a-z0-9-]", "-", out.stage.lower())
    create_markdown_artifact(stage_summary_markdown(out), key=f"{key}-summary", description=f"{out.stage} stage metrics")
    if out.link:
        create_link_artifact(out.link, link_text=f"MLflow run {out.run_id}", key=f"{key}-mlflow-run")
    if out.samples:
        create_table_artifact(out.samples[:20], key=f"{key}-samples", description=f"{out.stage} sample generations")


OWN_LOGGERS = ("flows", "stages", "llm")


class _InPrefectRun(logging.Filter):
    """Passes records emitted inside a Prefect flow or task run (the API handler has nowhere to send others)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return TaskRunContext.get() is not None or FlowRunContext.get() is not None


@cache
def route_logs_to_prefect() -> None:
    """Send this project's own log records (INFO and up) to the Prefect run they happen in, so the run's log in the
    UI says what the stage did; library chatter (prints, other loggers) stays on the worker's console."""
    from prefect.logging.handlers import APILogHandler

    handler = APILogHandler(level=logging.INFO)
    handler.addFilter(_InPrefectRun())
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # an explicit level set by the user wins
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as e:  # the failed state re-raises its exception
            exc = e
    retry = is_transient(exc)
    log.warning("stage attempt failed with %s: %s", type(exc).__name__, "retrying" if retry else "not retried")
    return retry


def _backoff(pipeline: PipelineSection) -> list[float]:
    return [pipeline.retry_delay_s * 2**i for i in range(pipeline.retries)]


def make_stage_flow(spec: StageSpec) -> Any:
    """A Prefect flow for one stage; its parameters are typed so the Prefect UI renders a form."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    cfg_cls = spec.load().Config

    def _execute(config: Any, pipeline: PipelineSection, from_run: Any, upstream: Any, parent: Any, force: bool):
        from prefect.runtime import task_run

        retrying = (task_run.run_count or 1) > 1
        return run_stage(
            spec, config, pipeline, from_run=from_run, upstream=upstream, parent_run_id=parent, force=force,
            retrying=retrying,
        ).to_dict()

    execute = task(_execute, name=f"run-{spec.name}", cache_policy=NO_CACHE, persist_result=False)

    def stage_flow(
        config: Any = None,
        pipeline: PipelineSection | None = None,
        from_run: list[str] | None = None,
        force: bool = False,
        upstream: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> dict[str, Any]:
        pipeline = pipeline or PipelineSection()
        config = config if config is not None else cfg_cls()
        t = execute.with_options(
            retries=pipeline.retries,
            retry_delay_seconds=_backoff(pipeline) or 0,
            retry_condition_fn=_retry_if_transient,
        )
        out = t(config, pipeline, from_run, upstream, parent_run_id, force)
        outcome = StageOutcome(**out)
        if outcome.reused:
            log.info("stage %s: nothing changed, reused MLflow run %s", spec.name, outcome.run_id)
        try:
            publish_prefect_artifacts(outcome)
        except Exception as e:  # Prefect artifacts are a view; never fail a finished stage over them
            log.warning("could not create Prefect artifacts: %s", e)
        return out

    fname = f"{spec.name}_flow"
    stage_flow.__name__ = stage_flow.__qualname__ = fname
    stage_flow.__module__ = __name__
    stage_flow.__doc__ = f"""Run the {spec.name} stage ({spec.module}) and record it in MLflow.

    Args:
        config: The {spec.name} stage's settings.
        pipeline: Orchestration settings: MLflow experiment, work dir, retries.
        from_run: Upstream MLflow runs to start from: a pipeline run id, a stage run id (its recorded ancestors
            come along), or stage=RUN_ID. Upstream stages not named use their latest finished run.
        force: Rerun even if a finished run with the same config, inputs and code exists.
        upstream: Advanced, filled in by the pipeline flow; leave empty to use the latest finished upstream
            runs (or those of `from_run`). Otherwise a map of upstream stage to MLflow run id, e.g.
            {{"pretrain": "<run id>"}}; it takes precedence over `from_run`. Upstream stages of {spec.name}:
            {", ".join(spec.upstream_stages) or "none"}.
        parent_run_id: Advanced, filled in by the pipeline flow; leave empty for a standalone run. Otherwise the
            MLflow run id of a pipeline run: this stage's run is then nested under it in MLflow.
    """
    stage_flow.__annotations__ = {
        "config": cfg_cls,
        "pipeline": PipelineSection,
        "from_run": list[str] | None,
        "force": bool,
        # The form's labels: the bare parameter names say nothing to a person starting a run from the UI.
        "upstream": Annotated[
            dict[str, str] | None, Field(json_schema_extra={"title": "upstream: run ids per upstream stage"})
        ],
        "parent_run_id": Annotated[
            str | None, Field(json_schema_extra={"title": "parent_run_id: pipeline run to nest under"})
        ],
        "return": dict[str, Any],
    }
    try:
        default_cfg: Any = cfg_cls()
    except Exception:
        default_cfg = None
    stage_flow.__defaults__ = (default_cfg, PipelineSection(), None, False, None, None)
    route_logs_to_prefect()
    # log_prints stays off: Prefect's print capture replaces `print` process-wide during a run, which also grabs
    # library output meant for a private buffer (dill's `dis` listings while datasets fingerprints a function,
    # which then flooded the run log with bytecode and left the fingerprint without the function's globals).
    return flow(stage_flow, name=spec.name, log_prints=False, persist_result=False, validate_parameters=True)


@cache
def _default_flows() -> dict[str, Any]:
    return {spec.name: make_stage_flow(spec) for spec in STAGES}


def __getattr__(attr: str) -> Any:
    # Built on first use: creating the flows imports every stage module (torch, transformers, trl).
    if attr == "STAGE_FLOWS":
        return _default_flows()
    if attr.endswith("_flow") and attr.removesuffix("_flow") in {s.name for s in STAGES}:
        return _default_flows()[attr.removesuffix("_flow")]
    raise AttributeError(attr)
