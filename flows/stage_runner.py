"""Run one stage under MLflow: reuse a finished run with the same cache key, or execute the stage in a new run.

`run_stage` is the one place that decides whether a stage computes; stages only resume their own checkpoints.
What it does, in order:
1. finds its upstream runs (given ids, a pipeline run id, lineage of a given run, or the latest finished run),
2. computes the cache key = hash(stage config less its execution-only fields, upstream output content hashes,
   fingerprints of the external files and datasets it reads, code version); a finished run with that key whose
   outputs are still whole in the artifact store (`flows.lineage.find_cached`) is reused unless `force`,
3. resolves the upstream outputs to verified local paths (in place under a local artifact root, through the
   bounded cache from an object store; `flows.outputs`),
4. opens an MLflow child run tagged `llm.stage=<name>`, logs params, inputs, lineage and system metrics,
5. calls `stages.<name>.run(cfg, inputs, out_dir, tracker)` in a scratch folder of the work dir (unless an earlier
   attempt left its finished record there, `flows.finished`: killed while uploading), then logs metrics,
   samples and plots, stores the outputs once at the run's own location under the artifact root and records that
   location and their sha256 manifest in the run; the scratch folder goes once the run has FINISHED.
`flows.stage_flow` wraps it in a Prefect flow (retries of transient errors, Prefect artifacts).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flows.cache_key import cache_key, code_version
from flows.external import fingerprints
from flows.finished import read_finished, write_finished
from flows.lineage import (
    PARENT_TAG,
    TAG_CACHE_KEY,
    TAG_CODE,
    TAG_OUTPUTS,
    TAG_PIPELINE_RUN,
    TAG_STAGE,
    InputRef,
    fetch_artifact,
    find_cached,
    input_refs,
    log_inputs,
    resolve_upstream,
)
from flows.local_copies import pinned_inputs
from flows.locks import stage_lock
from flows.outputs import output_tags, store_outputs
from flows.paths import SAFE_NAME, check_inside, check_run_id
from flows.specs import PipelineSection, StageSpec
from flows.tracking import (
    MlflowTracker,
    Tracking,
    call_with_retry,
    replay_orphaned_spills,
    run_link,
    run_links,
    setup_tracking,
)
from stages.common import StageError, StageResult

log = logging.getLogger(__name__)

TAG_DEVICE = "llm.device"  # the device a stage ran on: cpu, cuda:0, 8 x cuda (its setting may say `auto`)
TAG_DEVICES = "llm.devices"  # how many devices (worker processes x machines) the report card costs it at


def device_used(cfg: BaseModel) -> tuple[str, int]:
    """What a stage config's `device` setting resolves to on this machine, and how many of them it uses (the
    pretrain stage's workers x machines); stages without a device setting run on one CPU machine."""
    from stages.common import stage_device

    devices = int(getattr(cfg, "world_size", 1) or 1)
    setting = getattr(cfg, "device", None)
    if setting is None:
        return "cpu", 1
    try:
        dev = stage_device(str(setting), "device")
    except StageError:  # the stage reports a bad setting itself
        return str(setting), devices
    label = str(dev) if dev.type == "cuda" else dev.type
    return (f"{devices} x {dev.type}" if devices > 1 else label), devices


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


def _outcome(
    tracking: Tracking, stage: str, run_id: str, reused: bool, key: str, metrics: dict[str, float],
    outputs: dict[str, str], hashes: dict[str, str], upstream: dict[str, str], samples: list[dict[str, Any]],
) -> StageOutcome:  # fmt: skip
    return StageOutcome(
        stage, run_id, reused, key, metrics, outputs, hashes, upstream, samples,
        link=run_link(tracking, run_id), upstream_links=run_links(tracking, upstream), tracking_uri=tracking.uri,
    )  # fmt: skip


def outcome_from_run(tracking: Tracking, run: Any, reused: bool) -> StageOutcome:
    """The outcome of a finished stage run, read back from its MLflow tags and metrics."""
    tags = run.data.tags
    outputs = [o for o in tags.get(TAG_OUTPUTS, "").split(",") if o]
    upstream = {k.removeprefix("llm.upstream."): v for k, v in tags.items() if k.startswith("llm.upstream.")}
    metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}
    arts = {o: tags.get(f"llm.output.{o}.artifact", "") for o in outputs}
    hashes = {o: tags.get(f"llm.output.{o}.sha256", "") for o in outputs}
    key = tags.get(TAG_CACHE_KEY, "")
    return _outcome(tracking, tags.get(TAG_STAGE, ""), run.info.run_id, reused, key, metrics, arts, hashes, upstream, [])


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> `a.b.c` keys with string values short enough for MLflow params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, list | dict | bool) or v is None else str(v)
            out[key] = s if len(s) <= 6000 else s[:5997] + "..."
    return out


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, str | int | float | bool) or v is None else str(v)


def check_outputs(result: StageResult, out_dir: Path, stage: str) -> dict[str, Path]:
    """The outputs a stage reported, each a plain name and a path inside its out_dir (symlinks included)."""
    if not isinstance(result, StageResult):
        raise StageError(f"stage '{stage}' returned {type(result).__name__}, not a StageResult")
    outs: dict[str, Path] = {}
    for name, p in result.outputs.items():
        if not SAFE_NAME.match(name):
            raise StageError(f"stage '{stage}' output name {name!r} is not a plain name (letters, digits, _ . -)")
        path = check_inside(Path(p), out_dir, f"stage '{stage}' output '{name}'")
        if not path.exists():
            raise StageError(f"stage '{stage}' reported output '{name}' at {p}, which does not exist")
        if path.is_dir():  # a symlink inside an output must not smuggle files from outside into the artifact store
            for f in path.rglob("*"):
                check_inside(f, out_dir, f"file {f.relative_to(path)} of stage '{stage}' output '{name}'")
        for other, p in outs.items():  # each output is stored (moved) on its own
            if path.is_relative_to(p) or p.is_relative_to(path):
                raise StageError(f"stage '{stage}' outputs '{other}' ({p}) and '{name}' ({path}) overlap; each "
                                 "output must be its own file or folder")
        outs[name] = path
    return outs


def _start_system_metrics(tracking: Tracking, run_id: str) -> Any | None:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=tracking.uri)
        mon.start()
        return mon
    except Exception as e:  # psutil missing or similar: tracking extras must never fail a stage
        log.warning("system metrics disabled: %s", e)
        return None


@dataclass
class Lookup:
    """What deciding on reuse found: the upstream runs, the input refs, the external inputs' fingerprints, the
    cache key, and the finished run with that key if there is one."""

    hit: StageOutcome | None
    runs: dict[str, Any]
    refs: list[InputRef]
    external: dict[str, str]
    key: str


def find_reusable(
    spec: StageSpec,
    cfg: BaseModel,
    tracking: Tracking,
    *,
    from_run: Sequence[str] | None = None,
    upstream: Mapping[str, str] | None = None,
) -> Lookup:
    """Upstream runs, input refs and cache key of a stage, plus the finished run with that key if there is one."""
    runs = resolve_upstream(tracking, spec, from_run, upstream)
    refs = input_refs(spec, runs)
    external = fingerprints(cfg)
    key = cache_key(spec.name, cfg, {r.name: r.sha256 for r in refs}, code_version(spec), external)
    hit = find_cached(tracking, spec.name, key)
    return Lookup(outcome_from_run(tracking, hit, reused=True) if hit else None, runs, refs, external, key)


@dataclass
class _NewRun:
    """A stage executing under a new MLflow run, and what must be closed when it ends either way."""

    tracking: Tracking
    run_id: str
    stage: str
    pipeline: PipelineSection
    out_dir: Path
    tracker: MlflowTracker
    work_dir: Path
    monitor: Any = None

    def stop_monitor(self) -> None:
        if self.monitor is None:
            return
        try:
            self.monitor.finish()
        except Exception as e:
            log.warning("system metrics monitor did not stop cleanly: %s", e)
        self.monitor = None


def _create_run(
    tracking: Tracking, spec: StageSpec, cfg: BaseModel, key: str, runs: Mapping[str, Any], refs: Sequence[InputRef],
    parent_run_id: str | None, external: Mapping[str, str],
) -> str:  # fmt: skip
    """A new MLflow run for the stage, tagged with its cache key, code version, lineage, inputs and the fingerprints
    of the files and datasets its config points at (`llm.external.<field>`)."""
    device, devices = device_used(cfg)
    tags = {
        TAG_DEVICE: device, TAG_DEVICES: str(devices),
        **{f"llm.external.{field}": fp for field, fp in external.items()},
        TAG_STAGE: spec.name,
        TAG_CACHE_KEY: key,
        TAG_CODE: code_version(spec),
        "mlflow.source.name": f"flows.stage_runner:{spec.name}",
        **{f"llm.upstream.{s}": r.info.run_id for s, r in runs.items()},
        **{f"llm.input.{r.name}.run_id": r.run_id for r in refs},
        **{f"llm.input.{r.name}.artifact": r.artifact for r in refs},
        **{f"llm.input.{r.name}.sha256": r.sha256 for r in refs},
    }
    if parent_run_id:
        tags[PARENT_TAG] = tags[TAG_PIPELINE_RUN] = check_run_id(parent_run_id)
    return tracking.client.create_run(tracking.experiment_id, run_name=spec.name, tags=tags).info.run_id


def _log_start(nr: _NewRun, cfg: BaseModel, refs: Sequence[InputRef], local: Mapping[str, Path]) -> None:
    from mlflow.entities import Param

    client = nr.tracking.client
    params = [Param(k, v) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):
        client.log_batch(nr.run_id, params=params[i : i + 100])
    client.log_dict(nr.run_id, cfg.model_dump(mode="json"), "config.json")
    log_inputs(nr.tracking, nr.run_id, refs, local)
    if nr.pipeline.system_metrics:
        nr.monitor = _start_system_metrics(nr.tracking, nr.run_id)


def _record_result(nr: _NewRun, result: StageResult) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """Log the finished stage's metrics, samples and plots, store its outputs once under the artifact root with
    their manifest (`flows.outputs.store_outputs`), then mark the run FINISHED."""
    from mlflow.entities import RunTag

    client, run_id, wait_s = nr.tracking.client, nr.run_id, nr.pipeline.tracking_wait_s
    outs = check_outputs(result, nr.out_dir, nr.stage)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    if metrics:
        nr.tracker.log_metrics(metrics)
    nr.tracker.close(timeout=wait_s, hold=True)  # the held spill file marks the run alive until it has ended
    if result.samples:
        import pandas as pd

        frame = pd.DataFrame([{k: _jsonable(v) for k, v in row.items()} for row in result.samples])
        call_with_retry(lambda: client.log_table(run_id, frame, "samples.json"), "log samples", 60)
    for pname, ppath in result.plots.items():  # before the outputs move: a plot may lie inside one
        p = check_inside(Path(ppath), nr.out_dir, f"plot {pname}")
        call_with_retry(lambda p=p: client.log_artifact(run_id, str(p), "plots"), "upload plot", 60)
    section = nr.pipeline
    record = store_outputs(nr.tracking, run_id, nr.stage, outs, section.artifact_root, nr.work_dir,
                           int(section.artifact_cache_gb * 1e9), wait_s)
    out_tags = output_tags(record)

    def finish() -> None:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in out_tags.items()])
        client.set_terminated(run_id, "FINISHED")

    nr.stop_monitor()
    call_with_retry(finish, "finish run", wait_s)
    nr.tracker.release()
    # what is left in the scratch folder (training checkpoints to resume from) served this run only: a later run
    # with the same key reuses this one, and a forced or damaged-output rerun starts from an empty folder anyway
    shutil.rmtree(nr.out_dir, ignore_errors=True)
    return metrics, {n: o.artifact for n, o in record.outputs.items()}, {n: o.sha256 for n, o in record.outputs.items()}


def _mark_failed(nr: _NewRun, e: BaseException) -> None:
    nr.stop_monitor()
    delivered = False
    try:
        nr.tracker.close(timeout=5, hold=True)
        delivered = True
    except Exception:
        log.warning("stage %s: metrics not delivered; they stay in %s", nr.stage, nr.tracker.spill_path)
    try:
        nr.tracking.client.set_tag(nr.run_id, "llm.error", f"{type(e).__name__}: {e}"[:4000])
        nr.tracking.client.set_terminated(nr.run_id, "FAILED")
    except Exception:
        log.warning("stage %s: could not mark run %s as failed", nr.stage, nr.run_id)
        return  # the spill file stays: once this process is gone, the next stage run ends the run FAILED
    if delivered:
        nr.tracker.release()


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
    work_dir = Path(pipeline.work_dir).resolve()

    found = find_reusable(spec, cfg, tracking, from_run=from_run, upstream=upstream)
    force = force or pipeline.force
    if found.hit is None or force:
        # one process per cache key computes the stage; another run of the same key waits here, then reuses it
        with stage_lock(work_dir, spec.name, found.key):
            if not force:
                found = find_reusable(spec, cfg, tracking, from_run=from_run, upstream=upstream)
            if found.hit is None or force:
                with pinned_inputs():  # cached inputs this stage reads stay until it ends
                    out = _execute(spec, module, cfg, pipeline, tracking, work_dir, found, parent_run_id,
                                   force=force, retrying=retrying)
                out.wall_s = time.monotonic() - t0
                return out
    hit = found.hit
    log.info("stage %s: reusing finished run %s (same config, inputs, input files and code)", spec.name, hit.run_id)
    hit.wall_s = time.monotonic() - t0
    return hit


def _execute(
    spec: StageSpec, module: Any, cfg: BaseModel, pipeline: PipelineSection, tracking: Tracking, work_dir: Path,
    found: Lookup, parent_run_id: str | None, *, force: bool, retrying: bool,
) -> StageOutcome:  # fmt: skip
    """Run the stage under a new MLflow run (the cache missed or `force`)."""
    runs, refs, key = found.runs, found.refs, found.key
    local = {r.name: fetch_artifact(tracking, r.run_id, r.artifact, r.sha256, work_dir,
                                    cache_gb=pipeline.artifact_cache_gb) for r in refs}
    out_dir = work_dir / "stages" / spec.name / key[:16]
    check_inside(out_dir, work_dir, "stage output folder")
    if force and not retrying and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    try:  # metrics an earlier process could not deliver before it died go to their run first
        replay_orphaned_spills(tracking.client, work_dir / "tracking")
    except Exception as e:  # the files stay for the next run; never block a stage over them
        log.warning("could not replay spilled metrics yet: %s", e)
    run_id = _create_run(tracking, spec, cfg, key, runs, refs, parent_run_id, found.external)
    tracker = MlflowTracker(tracking.client, run_id, spill_path=work_dir / "tracking" / f"{run_id}.jsonl")
    nr = _NewRun(tracking, run_id, spec.name, pipeline, out_dir, tracker, work_dir)
    try:
        _log_start(nr, cfg, refs, local)
        result = read_finished(out_dir, key)
        if result is None:
            log.info("stage %s: running in MLflow run %s (out_dir %s)", spec.name, run_id, out_dir)
            result = module.run(cfg, dict(local), out_dir, tracker)
            write_finished(out_dir, key, result, check_outputs(result, out_dir, spec.name))
        else:
            log.info("stage %s: an earlier attempt computed this run's outputs in %s; storing them under MLflow "
                     "run %s without computing again", spec.name, out_dir, run_id)
        metrics, arts, hashes = _record_result(nr, result)
    except BaseException as e:
        _mark_failed(nr, e)
        raise
    upstream_ids = {s: r.info.run_id for s, r in runs.items()}
    samples = [{k: _jsonable(v) for k, v in row.items()} for row in result.samples[:50]]
    return _outcome(tracking, spec.name, run_id, False, key, metrics, arts, hashes, upstream_ids, samples)
