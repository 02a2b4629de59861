"""`llm-pipeline gc`: list the stored outputs nothing needs any more, with the space they take, and remove them only
when the user confirms (`--yes`, or `y` at the prompt).

Never removed: the outputs of the last N finished runs of each stage in each experiment (`--keep`), of every run a
registered model version was made from, and of every upstream run of those (their lineage: what a rerun from them
reads); outputs of runs still running; locations whose run this tracking store does not know (another store may
share the root). Removable: finished runs beyond those, and runs that failed or were killed (their outputs may be
partial). A run whose outputs were removed is tagged `llm.artifacts_removed` and is never reused again. Cache entries
(`<work dir>/cache`) of outputs no kept run has, and copies fetched into `<work dir>/inputs` before the artifact root
existed, are listed and removed alike; they are fetched again when needed. Scratch folders of unfinished stages
(`<work dir>/stages`) are listed, never removed: they hold what a rerun resumes from.

Run it while no pipeline runs: a run that starts reusing an old output after the list was made is not seen.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.artifacts import open_store, root_url
from flows.local_copies import Cache
from flows.outputs import TAG_REMOVED
from flows.specs import STAGES
from stages.common import StageError

LIVE = ("RUNNING", "SCHEDULED")


@dataclass
class Item:
    kind: str  # output | cache | inputs | scratch
    where: str
    nbytes: int
    keep: bool
    reason: str
    run_id: str = ""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _get_run(client: Any, run_id: str) -> Any | None:
    try:
        return client.get_run(run_id)
    except Exception:  # not a run of this store (or not an id at all)
        return None


def kept_runs(client: Any, keep: int) -> dict[str, str]:
    """Run id -> why its outputs stay: one of the last `keep` finished runs of its stage (per experiment), the
    source of a registered model version, or upstream of one of those."""
    why: dict[str, str] = {}
    stages = [s.name for s in STAGES]
    for exp in client.search_experiments():
        for stage in stages if keep > 0 else []:
            for run in client.search_runs([exp.experiment_id], f"tags.`llm.stage` = '{stage}' and "
                                          "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                          max_results=keep):
                why.setdefault(run.info.run_id, f"one of the last {keep} finished {stage} runs of '{exp.name}'")
    for model in client.search_registered_models(max_results=1000):
        for mv in client.search_model_versions(f"name='{model.name}'"):
            for rid in {mv.run_id, (mv.tags or {}).get("llm.stage_run")} - {None, ""}:
                why.setdefault(rid, f"registered as {model.name} version {mv.version}")
    todo = list(why)
    while todo:
        rid = todo.pop()
        run = _get_run(client, rid)
        for k, up in (run.data.tags.items() if run else []):
            if k.startswith("llm.upstream.") and up not in why:
                why[up] = f"upstream of kept run {rid}"
                todo.append(up)
    return why


def plan(section: Any, client: Any, keep: int) -> list[Item]:
    """Everything gc looks at, each with its size and whether (and why) it stays."""
    kept = kept_runs(client, keep)
    items = []
    store = open_store(root_url(section.artifact_root, section.work_dir))
    kept_shas = set()
    for stage, rid, loc in store.locations():
        run = _get_run(client, rid)
        status = run.info.status if run else ""
        if rid in kept:
            keep_it, reason = True, kept[rid]
            kept_shas |= {v for k, v in run.data.tags.items() if k.startswith("llm.output.") and k.endswith(".sha256")}
        elif run is None:
            keep_it, reason = True, "no run of this tracking store records it (another store may use this root)"
        elif status in LIVE:
            keep_it, reason = True, "its run is still running"
        elif status == "FINISHED":
            keep_it, reason = False, (f"finished, not among the last {keep} {stage} runs; no registered version or "
                                      "kept run needs it")
        else:
            keep_it, reason = False, f"its run {status.lower()} (partial outputs)"
        items.append(Item("output", loc, store.size(loc), keep_it, reason, rid))
    work = Path(section.work_dir).resolve()
    cache = Cache(work, int(section.artifact_cache_gb * 1e9))
    for sha, nbytes, _ in cache.entries():
        needed = sha in kept_shas
        items.append(Item("cache", str(cache.entry(sha)), nbytes, needed,
                          "a kept run's output" if needed else "no kept run has this output (fetched again if needed)"))
    for folder in sorted((work / "inputs").iterdir()) if (work / "inputs").is_dir() else []:
        needed = folder.name in kept
        items.append(Item("inputs", str(folder), _size(folder), needed, "a kept run's outputs" if needed else
                          "copies fetched from MLflow before the artifact root (MLflow keeps the originals)"))
    for folder in sorted((work / "stages").glob("*/*")) if (work / "stages").is_dir() else []:
        items.append(Item("scratch", str(folder), _size(folder), True, "an unfinished stage's scratch folder "
                          "(what a rerun resumes from; remove it by hand if that run is abandoned)"))
    return items


def remove(items: list[Item], section: Any, client: Any) -> tuple[int, list[str]]:
    """Remove the items not kept; (bytes freed, what could not be removed)."""
    store = open_store(root_url(section.artifact_root, section.work_dir))
    cache = Cache(Path(section.work_dir).resolve(), int(section.artifact_cache_gb * 1e9))
    freed, skipped = 0, []
    for item in [i for i in items if not i.keep]:
        if item.kind == "output":
            if item.run_id and _get_run(client, item.run_id) is not None:
                # tagged first: a run whose outputs are going is never reused, even if the removal stops half-way
                client.set_tag(item.run_id, TAG_REMOVED, f"by llm-pipeline gc on {time.strftime('%Y-%m-%d %H:%M')}")
            store.remove(item.where)
        elif item.kind == "cache":
            if not cache.remove(Path(item.where).name):
                skipped.append(f"{item.where} (a running stage reads it)")
                continue
        elif item.kind == "inputs":
            shutil.rmtree(item.where, ignore_errors=True)
        freed += item.nbytes
    return freed, skipped


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def render(items: list[Item], root: str, keep: int) -> str:
    lines = [f"artifact root {root} (keeping the last {keep} finished runs of each stage, registered models and "
             "their lineage):"]
    for kind in ("output", "cache", "inputs", "scratch"):
        for i in [i for i in items if i.kind == kind]:
            lines.append(f"  {'keep  ' if i.keep else 'remove'} {_mb(i.nbytes):>12}  {kind:<7} {i.where}  ({i.reason})")
    gone = [i for i in items if not i.keep]
    lines.append(f"removable: {len(gone)} of {len(items)}, {_mb(sum(i.nbytes for i in gone))}; kept "
                 f"{_mb(sum(i.nbytes for i in items if i.keep))}")
    return "\n".join(lines)


def cmd_gc(args: argparse.Namespace, load: Any) -> int:
    """`llm-pipeline gc`: print the plan; remove with --yes or a `y` at the prompt."""
    from flows.tracking import setup_tracking

    if args.keep < 0:
        raise StageError(f"--keep {args.keep}: the number of finished runs to keep per stage is 0 or more")
    cfg = load(args)
    section = cfg.pipeline
    client = setup_tracking(section.experiment, section.work_dir, section.offline_tracking).client
    items = plan(section, client, args.keep)
    print(render(items, root_url(section.artifact_root, section.work_dir), args.keep))
    gone = [i for i in items if not i.keep]
    if not gone:
        print("nothing to remove")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print("nothing removed: pass --yes to remove them")
            return 0
        answer = input(f"remove {len(gone)} items, freeing {_mb(sum(i.nbytes for i in gone))}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    freed, skipped = remove(items, section, client)
    print(f"removed {len(gone) - len(skipped)} items, freed {_mb(freed)}")
    for s in skipped:
        print(f"  not removed: {s}")
    return 0


def add_gc_command(sub: Any, add_set: Any, load: Any) -> None:
    p = sub.add_parser(
        "gc", help="list stored outputs no kept run needs, and remove them with confirmation",
        description="List the outputs under the artifact root (and cached copies in the work dir) that neither a "
        "registered model version, nor one of the last N finished runs of each stage, nor the upstream runs of those "
        "need, with the space they take; remove them with --yes or after a confirmation prompt.")
    p.add_argument("--config", default=None, help="pipeline YAML naming the work dir and artifact root (default: "
                   "configs/tiny.yaml if it exists)")
    add_set(p, "override one config value, e.g. --set pipeline.artifact_root=s3://bucket/prefix (repeatable)")
    p.add_argument("--keep", type=int, default=3, metavar="N",
                   help="finished runs of each stage whose outputs stay (default %(default)s)")
    p.add_argument("--yes", action="store_true", help="remove without asking")
    p.set_defaults(func=lambda a: cmd_gc(a, load))
