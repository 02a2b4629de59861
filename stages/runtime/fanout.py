"""Running a stage's independent units of work on several processes, results back in order.

A stage asks `open_mapper(workers, address, setting)` for a `Mapper` and hands it a function and a list of units;
the mapper yields each unit's result in the order of the units, keeping at most a few units in flight so the
results never have to fit in memory all at once. How the units run is the caller's choice, not the stage's: by
default a `dask.distributed` local cluster (`workers` processes of one thread each, bound to 127.0.0.1, no
dashboard) or the scheduler at `address`; the orchestration layer installs its own (Prefect's Dask task runner, so
each unit is a task run in the Prefect UI) with `using`. Stages stay free of Prefect that way.

`dask.distributed` is imported only here and only when a mapper is opened: a one-worker stage never loads it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from stages.common import StageError

# How long to wait for an existing Dask scheduler before failing; module-level so tests can shorten it.
CONNECT_TIMEOUT_S = 10.0
# Units in flight per worker: one running, one queued, so a worker never waits for the driver to hand it work.
IN_FLIGHT_PER_WORKER = 2
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$|^[\w.\-\[\]:]+:\d+$")


class Mapper(Protocol):
    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], labels: Iterable[str] | None = None
            ) -> Iterator[Any]:
        """`fn(item)` for every item, yielded in the order of `items`; `labels` name the units (logs, UI)."""
        ...


# (workers, address, stage) -> a context manager holding the cluster open while the mapper is in use
MapperFactory = Callable[[int, "str | None", str], contextlib.AbstractContextManager[Mapper]]


def check_address(address: str, setting: str) -> None:
    """A scheduler address Dask can parse: `tcp://host:port` (or another Dask protocol), or `host:port`."""
    if not _ADDRESS.match(address):
        raise StageError(f"{setting}={address!r} is not a Dask scheduler address; give it as tcp://HOST:PORT "
                         f"(e.g. tcp://127.0.0.1:8786), or leave {setting} unset to start a local cluster.")


def connect_error(address: str, setting: str, e: BaseException) -> StageError:
    return StageError(f"{setting}={address!r}: no Dask scheduler answered there within {CONNECT_TIMEOUT_S:g} s "
                      f"({type(e).__name__}: {e}). Start one (`dask scheduler` plus `dask worker ADDRESS` on machines "
                      f"with this project installed) or leave {setting} unset to start a local cluster.")


def workers_within(requested: int, budget_mb: float, stage_mb: float, worker_mb: float) -> int:
    """The most worker processes, at most `requested`, whose estimated memory fits `budget_mb`: the stage's own
    process (`stage_mb`, its share of the work in flight included) plus `worker_mb` for each worker. 1 when not
    even two fit: the stage then does the work in its own process, with no worker to pay for."""
    fit = int((budget_mb - stage_mb) // worker_mb) if worker_mb > 0 else requested
    return max(1, min(requested, fit)) if fit >= 2 else 1


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """A local cluster of `workers` single-threaded processes, reachable from this machine only, no dashboard.

    One thread per process: the units are Python-heavy (the GIL would serialise threads), and Arrow's own thread
    pools would otherwise oversubscribe the cores."""
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
            "dashboard_address": None}


@contextlib.contextmanager
def quiet_port_warning() -> Iterator[None]:
    """The scheduler serves a small HTTP API (health, metrics) even without a dashboard, on 127.0.0.1:8787 or, when
    another cluster holds that port, a free one; the warning about the move says nothing a stage user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
        yield


@contextlib.contextmanager
def environ_kept() -> Iterator[None]:
    """Restores this process's environment after a mapper: each Dask nanny of a local cluster sets
    `OMP_NUM_THREADS=1` (and the MKL/OpenBLAS equivalents) in its parent's `os.environ` before it spawns a worker,
    and every process started later (torchrun's training workers, a stage's subprocesses) would inherit one
    thread."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update({k: v for k, v in before.items() if os.environ.get(k) != v})


def in_order(submit: Callable[[Any, str], Any], result: Callable[[Any], Any], items: Iterable[Any],
             labels: Iterable[str] | None, window: int) -> Iterator[Any]:
    """Submit units while fewer than `window` are unfinished and yield their results in submission order."""
    pending: deque[Any] = deque()
    names = iter(labels) if labels is not None else None
    for i, item in enumerate(items):
        label = next(names) if names is not None else f"unit-{i}"
        if len(pending) >= window:
            yield result(pending.popleft())
        pending.append(submit(item, label))
    while pending:
        yield result(pending.popleft())


class DaskMapper:
    """Units as plain `dask.distributed` futures."""

    def __init__(self, client: Any, window: int) -> None:
        self.client, self.window = client, window

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], labels: Iterable[str] | None = None
            ) -> Iterator[Any]:
        def submit(item: Any, label: str) -> Any:
            return self.client.submit(fn, item, pure=False, key=f"{label}-{uuid.uuid4().hex[:12]}")

        return in_order(submit, lambda f: f.result(), items, labels, self.window)


def cluster_threads(client: Any) -> int:
    return max(1, sum(client.nthreads().values()))


@contextlib.contextmanager
def dask_mapper(workers: int, address: str | None, stage: str) -> Iterator[Mapper]:
    """The default mapper: a temporary local cluster of `workers` processes, or the scheduler at `address`."""
    import distributed

    if address:
        setting = f"{stage}.dask_address"
        check_address(address, setting)
        try:
            client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except Exception as e:  # refused, timed out or unresolvable: distributed raises several types
            raise connect_error(address, setting, e) from e
        with client:
            yield DaskMapper(client, IN_FLIGHT_PER_WORKER * max(workers, cluster_threads(client)))
        return
    with quiet_port_warning():
        cluster = distributed.LocalCluster(**local_cluster_kwargs(workers))
    with cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield DaskMapper(client, IN_FLIGHT_PER_WORKER * workers)


_FACTORY: contextvars.ContextVar[MapperFactory] = contextvars.ContextVar("fanout_mapper", default=dask_mapper)


@contextlib.contextmanager
def using(factory: MapperFactory) -> Iterator[None]:
    """Within the block, `open_mapper` opens mappers with `factory` (e.g. one that runs units as Prefect tasks)."""
    token = _FACTORY.set(factory)
    try:
        yield
    finally:
        _FACTORY.reset(token)


@contextlib.contextmanager
def open_mapper(workers: int, address: str | None, stage: str) -> Iterator[Mapper]:
    """A mapper over `workers` local processes, or the Dask scheduler at `address`; error messages name the
    settings `<stage>.workers` and `<stage>.dask_address`. Whichever factory runs the units, this process's
    environment is the same afterwards (`environ_kept`)."""
    if workers < 1:
        raise StageError(f"{stage}.workers={workers}: needs at least 1 (1 runs in this process).")
    if address:
        check_address(address, f"{stage}.dask_address")
    with environ_kept(), _FACTORY.get()(workers, address, stage) as mapper:
        yield mapper
