"""Stage fan-out as Prefect task runs: the `stages.runtime.fanout` mapper the stage flows install, which runs each unit of
a stage's work (e.g. one input file of `ingest`) as a Prefect task on `prefect_dask.DaskTaskRunner`, so the units
show up as task runs of the stage's flow run in the Prefect UI, with their own states and logs.

The cluster is the same as without Prefect: a temporary local one of `workers` single-threaded processes bound to
127.0.0.1 without a dashboard, or the scheduler at `<stage>.dask_address`. Outside a Prefect run (a stage called
through `flows.stage_runner` alone) the plain Dask mapper runs instead: a task needs a run to belong to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from stages.runtime import fanout


def _run_unit(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


class PrefectDaskMapper:
    """Units submitted as Prefect tasks to a started `DaskTaskRunner`."""

    def __init__(self, runner: Any, stage: str, window: int) -> None:
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        self.runner, self.window = runner, window
        # Results go back to the stage in memory; persisting them would write every unit's data to Prefect's
        # result storage for nothing (the stage's own outputs are the record).
        self.task = task(_run_unit, name=f"{stage}-unit", cache_policy=NO_CACHE, persist_result=False)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], labels: Iterable[str] | None = None
            ) -> Iterator[Any]:
        def submit(item: Any, label: str) -> Any:
            return self.runner.submit(self.task.with_options(task_run_name=label), {"fn": fn, "item": item})

        return fanout.in_order(submit, lambda f: f.result(), items, labels, self.window)


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


@contextlib.contextmanager
def prefect_dask_mapper(workers: int, address: str | None, stage: str) -> Iterator[fanout.Mapper]:
    """A `stages.runtime.fanout.MapperFactory`: the units as Prefect tasks on a Dask cluster (see the module docstring)."""
    if not _in_prefect_run():
        with fanout.dask_mapper(workers, address, stage) as mapper:
            yield mapper
        return
    from prefect_dask import DaskTaskRunner

    if address:
        setting = f"{stage}.dask_address"
        fanout.check_address(address, setting)
        runner = DaskTaskRunner(address=address, client_kwargs={"timeout": fanout.CONNECT_TIMEOUT_S})
    else:
        runner = DaskTaskRunner(cluster_kwargs=fanout.local_cluster_kwargs(workers))
    with runner:
        try:
            with fanout.quiet_port_warning():
                client = runner.client  # connects (or starts the local cluster) now, not at the first unit
        except Exception as e:
            if not address:
                raise
            raise fanout.connect_error(address, setting, e) from e
        threads = fanout.cluster_threads(client) if address else workers
        yield PrefectDaskMapper(runner, stage, fanout.IN_FLIGHT_PER_WORKER * max(workers, threads))
