"""MLflow behind a small interface: where runs go, whether the server is there, and metrics that survive outages.

`MlflowTracker` implements `stages.common.Tracker`. A stage's `log_metrics` never blocks on the network: metrics
go to an in-memory buffer plus a local spill file, and a background thread delivers them in batches, retrying
with backoff while the server is away. `close()` waits (up to a deadline) until everything has been delivered.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flows.locks import try_lock
from flows.store import store_lock
from stages.common import StageError, TransientError

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # opens the experiment in MLflow's model-training view
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit

T = TypeVar("T")


class TrackingUnavailableError(StageError):
    """The tracking server cannot be reached before any work starts (not retried: the user must act)."""


def _client_defaults() -> None:
    # MLflow's REST client retries a dead server for minutes per call by default; our own buffering and the stage
    # retries sit above it, so each low-level call should fail fast. Users' explicit settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    # one progress bar per downloaded input folder floods the Prefect log; our own logs say what is fetched
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def embedded_uri(work_dir: str | Path) -> str:
    return f"sqlite:///{Path(work_dir).resolve() / 'mlflow.db'}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnavailableError unless the MLflow server at `uri` answers its health check."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http(s) only, checked by caller
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        problem = str(getattr(e, "reason", e))
    raise TrackingUnavailableError(
        f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not reachable ({problem}). Start it "
        "(`llm-pipeline up`), unset MLFLOW_TRACKING_URI to use the embedded store, or set "
        "pipeline.offline_tracking=true to log to the local store in the work dir."
    )


@dataclass
class Tracking:
    """Where this process logs: the URI, the experiment, and a client bound to both."""

    uri: str
    experiment_id: str
    experiment_name: str
    embedded: bool
    client: Any  # mlflow.MlflowClient (imported lazily)

    def run_link(self, run_id: str) -> str | None:
        if not is_remote(self.uri):
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def ui_hint(self) -> str:
        if self.embedded:
            root = self.uri.removeprefix("sqlite:///")
            return f"mlflow ui --backend-store-uri {self.uri} (store: {root})"
        return self.uri


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


def run_links(tracking: Tracking, run_ids: Mapping[str, str]) -> dict[str, str]:
    """key -> MLflow UI address of run_ids[key], for the runs that have one."""
    return {k: link for k, rid in run_ids.items() if (link := run_link(tracking, rid))}


def experiment_link(tracking: Tracking) -> str | None:
    """MLflow UI address of the experiment's runs table (model-training view); None for the embedded store."""
    if not is_remote(tracking.uri):
        return None
    return ml_view(f"{tracking.uri.rstrip('/')}/#/experiments/{tracking.experiment_id}/runs")


def setup_tracking(experiment: str, work_dir: str | Path, offline: bool = False) -> Tracking:
    """Pick the tracking URI (MLFLOW_TRACKING_URI, else the embedded SQLite store), check it, get the experiment.

    Fails fast, before any compute, when a configured server is down (unless `offline`).
    """
    import mlflow

    _client_defaults()
    work = Path(work_dir).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    embedded = not uri
    if uri and is_remote(uri):
        try:
            check_server(uri)
        except TrackingUnavailableError:
            if not offline:
                raise
            log.warning("MLflow server %s is unreachable; logging offline to %s", uri, embedded_uri(work))
            uri, embedded = "", True
    if embedded:
        work.mkdir(parents=True, exist_ok=True)
        uri = embedded_uri(work)
    mlflow.set_tracking_uri(uri)
    # opening a fresh database store runs MLflow's schema migrations; two processes migrating it at once fail and
    # can leave it unusable (`table latest_metrics already exists`), so the first one does it under the store's
    # lock (flows.store) and the others wait and find it ready. A database server is reached here within seconds.
    with store_lock(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp_id, exp = _experiment(client, experiment, work, embedded)
        if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            try:
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            except Exception:  # another process (on a shared server) set it at the same moment
                if client.get_experiment(exp_id).tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                    raise
    mlflow.set_experiment(experiment_id=exp_id)
    return Tracking(uri=uri, experiment_id=exp_id, experiment_name=experiment, embedded=embedded, client=client)


def _experiment(client: Any, experiment: str, work: Path, embedded: bool) -> tuple[str, Any]:
    """The experiment's id, created (or restored) when needed, and its entity as found (None when created)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        artifact_location = (work / "mlartifacts").as_uri() if embedded else None
        try:
            exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
        except Exception:  # another process created it first
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    return exp_id, exp


_TRANSIENT_MARKERS = (
    "max retries exceeded",
    "connection refused",
    "connection reset",
    "connection aborted",
    "temporarily unavailable",
    "timed out",
    "502",
    "503",
    "504",
)


def is_transient(exc: BaseException | None) -> bool:
    """True for failures worth retrying: TransientError and tracking/network hiccups; never StageError/bad config."""
    from pydantic import ValidationError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StageError | ValidationError):
            return False
        if isinstance(exc, TransientError | ConnectionError | TimeoutError):
            return True
        mod = type(exc).__module__
        if mod.startswith(("requests", "urllib3")) and any(
            n in type(exc).__name__ for n in ("Connection", "Timeout", "MaxRetry", "ProtocolError")
        ):
            return True
        if mod.startswith("mlflow") and type(exc).__name__ in ("MlflowException", "RestException"):
            code = str(getattr(exc, "error_code", ""))
            if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
                return True
            if any(m in str(exc).lower() for m in _TRANSIENT_MARKERS):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def call_with_retry(fn: Callable[[], T], what: str, deadline_s: float, first_delay: float = 0.5) -> T:
    """Call `fn` until it succeeds, retrying transient failures with backoff until `deadline_s` has passed."""
    start = time.monotonic()
    delay = first_delay
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e) or time.monotonic() - start + delay > deadline_s:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


class MlflowTracker:
    """`stages.common.Tracker` backed by an MLflow run; buffered, spilled to disk, delivered in the background."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        spill_path: str | Path | None = None,
        flush_interval: float = 1.0,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_interval = flush_interval
        self.spill_path = Path(spill_path) if spill_path else None
        self._buf: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.delivered = 0
        self.failures = 0
        self.last_error: BaseException | None = None
        self._spill = None
        if self.spill_path:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            self._spill = open(self.spill_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            # held while this process lives (the OS drops it when the process dies): a spill file nobody holds is
            # an orphan that `replay_orphaned_spills` may deliver
            try_lock(self._spill)
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        rows = [(str(k), float(v), ts, int(step or 0)) for k, v in metrics.items()]
        with self._lock:
            self._buf.extend(rows)
            if self._spill:
                for k, v, t, s in rows:
                    self._spill.write(json.dumps({"key": k, "value": v, "timestamp": t, "step": s}) + "\n")
                self._spill.flush()
        if len(self._buf) >= MAX_METRICS_PER_BATCH:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def _send_one_batch(self) -> bool:
        """Deliver up to one batch; True if something was sent. Failed batches go back to the front, in order."""
        from mlflow.entities import Metric

        with self._send_lock:
            with self._lock:
                batch = [self._buf.popleft() for _ in range(min(MAX_METRICS_PER_BATCH, len(self._buf)))]
            if not batch:
                return False
            try:
                self.client.log_batch(
                    self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in batch], synchronous=True
                )
            except BaseException as e:
                with self._lock:
                    self._buf.extendleft(reversed(batch))
                self.failures += 1
                self.last_error = e
                raise
            self.delivered += len(batch)
            return True

    def _loop(self) -> None:
        delay = self.flush_interval
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                while self._send_one_batch():
                    pass
                delay = self.flush_interval
            except Exception as e:
                delay = min(max(delay * 2, 1.0), 10.0)
                log.warning("MLflow unreachable, %d metrics buffered (%s); retrying in %.0fs", self.pending, e, delay)

    def flush(self, timeout: float = 60.0) -> None:
        """Deliver everything buffered, retrying transient failures until `timeout`; TransientError after that."""
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            try:
                while self._send_one_batch():
                    pass
                return
            except Exception as e:
                if not is_transient(e) and not isinstance(e, OSError):
                    raise
                if time.monotonic() + delay > deadline:
                    where = f"; they are kept in {self.spill_path}" if self.spill_path else ""
                    raise TransientError(
                        f"could not deliver {self.pending} buffered metrics of MLflow run {self.run_id} within "
                        f"{timeout:.0f}s ({e}){where}"
                    ) from e
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def close(self, timeout: float = 60.0, hold: bool = False) -> None:
        """Stop the background thread and deliver what is left (see `flush`). The spill file goes once delivered.

        `hold` keeps the spill file, emptied, open and locked until `release()`: the run still reads as alive to
        `replay_orphaned_spills`, so a process killed after its metrics were delivered (while its artifacts
        upload) still has its run ended FAILED by the next stage run instead of left RUNNING forever.
        """
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(timeout, 1.0))
        self.flush(timeout)
        if hold and self._spill:
            with self._lock:
                self._spill.truncate(0)  # everything in it was delivered; a replay must not send it again
                self._spill.flush()
            return
        self.release()

    def release(self) -> None:
        """Close and remove the spill file (call once its run has ended)."""
        if self._spill:
            self._spill.close()
            self._spill = None
            if self.spill_path and self.spill_path.exists():
                self.spill_path.unlink()


def replay_spill(client: Any, run_id: str, spill_path: str | Path) -> int:
    """Upload the metrics a dead process left in its spill file; returns how many were sent.

    Idempotent: the file may hold metrics that were delivered before the process died, and the tracking store keeps
    one row per (key, value, timestamp, step) of a run, so sending them again adds nothing."""
    p = Path(spill_path)
    if not p.exists():
        return 0
    t = MlflowTracker(client, run_id)
    try:
        for line in p.read_text().splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            with t._lock:
                t._buf.append((m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"])))
        n = t.pending
        t.close()
    finally:
        t._stop.set()
    p.unlink()
    return n


def replay_orphaned_spills(client: Any, spill_dir: str | Path) -> dict[str, int]:
    """Deliver every spill file under `spill_dir` (`<run id>.jsonl`) that no live process holds, into the run it was
    logged to, and end that run FAILED if its process left it running. Returns run id -> metrics replayed."""
    done: dict[str, int] = {}
    for path in sorted(Path(spill_dir).glob("*.jsonl")) if Path(spill_dir).is_dir() else []:
        run_id = path.stem
        with open(path, encoding="utf-8") as f:
            if not try_lock(f) or not path.exists():
                continue  # its process is alive and still delivering, or another replay took it
            try:
                run = client.get_run(run_id)
            except Exception as e:
                log.warning("spill file %s names no run of this tracking store (%s); left in place", path, e)
                continue
            done[run_id] = replay_spill(client, run_id, path)
            if run.info.status in ("RUNNING", "SCHEDULED"):
                client.set_terminated(run_id, "FAILED")
                client.set_tag(run_id, "llm.error", "its process ended before the run finished (metrics replayed later)")
        log.info("replayed %d metrics into MLflow run %s, left behind by a process that ended", done[run_id], run_id)
    return done
