"""Local files a stage reads, checked against the sha256 manifest recorded with the run that wrote them.

Outputs under a local artifact root are read in place; outputs in an object store are read from a cache in the work
dir (`<work dir>/cache/<sha256 of the output>/`), because the stages and their libraries need local files (token
shards are memory-mapped). Both are verified the same way: every file must be there, nothing else, each with its
recorded size and sha256. Hashing hundreds of gigabytes before every stage would cost more than the stage, so the
result of a check is remembered per file (inode, size, modification and change times; `<work dir>/verified/` for
in-place outputs, beside each cache entry for the cache) and a file is hashed again only when one of those changed:
any write to a file moves its change time, which no program can set back.

The cache is keyed by content, so runs with identical outputs share one entry and every later run on this work dir
reuses it. It is bounded (`pipeline.artifact_cache_gb`): after each new entry the least recently used ones go,
except entries a running stage reads, which hold a shared lock on their record until the stage ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from flows.artifacts import FileEntry, LocalStore, Store
from flows.locks import file_lock
from llm.files import replace_dir, sha256_file, write_json
from stages.common import StageError

log = logging.getLogger(__name__)

_LOCAL = threading.local()  # per thread: shared locks on the cache entries it reads (released by `pinned_inputs`)


class DamagedOutput(StageError):
    """Stored files that do not match the sha256 manifest recorded with them (never used; the user restores or
    recomputes them)."""


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def damaged(what: str, problems: list[str], fix: str) -> DamagedOutput:
    return DamagedOutput(
        f"{what}: {'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''} does not match the sha256 manifest "
        f"recorded with it; the stored files were altered, so they are not used. {fix}")


def verify_folder(folder: Path, files: Mapping[str, FileEntry], memo: Path, what: str, fix: str) -> None:
    """Check the files under `folder` against `files` (relative path -> entry); raise DamagedOutput naming the files
    that differ, are missing or are not in the manifest. Files unchanged since this machine last hashed them (per
    `memo`) are not read again."""
    seen = _read_json(memo).get("files", {})
    have: dict[str, Path] = {}
    if folder.is_dir():
        for f in folder.rglob("*"):
            if f.is_symlink() or f.is_file():
                have[f.relative_to(folder).as_posix()] = f
    problems = [f"{rel} (missing)" for rel in sorted(files) if rel not in have]
    problems += [f"{rel} (not in the manifest)" for rel in sorted(have) if rel not in files]
    checked: dict[str, list[int]] = {}
    for rel, entry in sorted(files.items()):
        f = have.get(rel)
        if f is None:
            continue
        st = f.lstat()
        if f.is_symlink() or st.st_size != entry.nbytes:
            problems.append(f"{rel} ({'a symlink' if f.is_symlink() else f'{st.st_size} bytes'}, recorded "
                            f"{entry.nbytes} bytes)")
            continue
        if seen.get(rel) != _stat_key(st):
            got = sha256_file(f)
            if got != entry.sha256:
                problems.append(f"{rel} (sha256 {got[:12]}, recorded {entry.sha256[:12]})")
                continue
        checked[rel] = _stat_key(f.stat())
    if problems:
        raise damaged(what, problems, fix)
    if checked != seen:
        with contextlib.suppress(OSError):  # a memo that cannot be written only costs a hash next time
            write_json(memo, {"what": what, "files": checked, "bytes": sum(e.nbytes for e in files.values())})


def remember(folder: Path, files: Mapping[str, FileEntry], memo: Path, what: str) -> None:
    """Record files just written and hashed by this process as verified (so that reading them costs no hash)."""
    stats = {rel: _stat_key((folder / rel).stat()) for rel in files if (folder / rel).is_file()}
    with contextlib.suppress(OSError):
        write_json(memo, {"what": what, "files": stats, "bytes": sum(e.nbytes for e in files.values())})


def memo_path(work_dir: Path, location: str, rel: str) -> Path:
    """Where this work dir remembers the check of the stored output `<location>/<rel>`."""
    key = hashlib.sha256(f"{location}/{rel}".encode()).hexdigest()[:32]
    return work_dir / "verified" / f"{key}.json"


def read_in_place(store: LocalStore, location: str, name: str, files: Mapping[str, FileEntry], single: bool,
                  work_dir: Path, what: str, fix: str) -> Path:
    """The verified local path of output `name` under a local artifact root (its folder, or its one file)."""
    folder = store.path(location, name)
    verify_folder(folder, files, memo_path(work_dir, location, name), what, fix)
    return folder / next(iter(files)) if single else folder


def _pins() -> list[IO[str]]:
    if not hasattr(_LOCAL, "pins"):
        _LOCAL.pins = []
    return _LOCAL.pins


@contextlib.contextmanager
def pinned_inputs() -> Iterator[None]:
    """Cache entries read inside the block stay pinned (never evicted by any process) until it ends."""
    pins = _pins()
    start = len(pins)
    try:
        yield
    finally:
        while len(pins) > start:
            with contextlib.suppress(OSError):
                pins.pop().close()


class Cache:
    """Verified local copies of outputs stored in an object store (see the module docstring)."""

    def __init__(self, work_dir: Path, bound_bytes: int) -> None:
        self.dir = work_dir / "cache"
        self.bound = bound_bytes

    def entry(self, sha: str) -> Path:
        return self.dir / sha

    def record(self, sha: str) -> Path:
        return self.dir / f"{sha}.json"

    def lock(self, sha: str) -> Path:
        return self.dir / f"{sha}.lock"

    def _pin(self, sha: str) -> None:
        """A shared lock on the entry's lock file, held until `pinned_inputs` ends; an entry is removed only under
        an exclusive one. A lock file removed (with its entry) while we waited for it is opened again."""
        import fcntl

        path = self.lock(sha)
        while True:
            f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until pinned_inputs ends
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            try:
                if os.fstat(f.fileno()).st_ino == path.stat().st_ino:
                    _pins().append(f)
                    return
            except FileNotFoundError:
                pass
            f.close()

    def fetch(self, store: Store, location: str, name: str, sha: str, files: Mapping[str, FileEntry],
              single: bool, what: str, fix: str) -> Path:
        """A verified local copy of the stored output `<location>/<name>` whose tree sha256 is `sha`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        entry, record = self.entry(sha), self.record(sha)
        found = entry / next(iter(files)) if single else entry
        self._pin(sha)  # before looking: an entry seen here is not removed under us
        if entry.exists():
            try:
                verify_folder(entry, files, record, what, fix)
                os.utime(record)  # most recently used
                return found
            except DamagedOutput as e:
                log.warning("the cached copy %s of %s changed since it was fetched (%s); fetching it again", entry,
                            what, e)
        with file_lock(self.dir / ".lock", f"the artifact cache {self.dir}"):
            self._download(store, location, name, sha, files, what, fix)
            self._evict(keep=sha)
        log.info("fetched %s into the cache: %s", what, self.report())
        return found

    def _download(self, store: Store, location: str, name: str, sha: str, files: Mapping[str, FileEntry],
                  what: str, fix: str) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}.", suffix=".tmp", dir=self.dir))
        try:
            problems = []
            for rel, entry in sorted(files.items()):
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    store.get(location, f"{name}/{rel}", dest)
                except FileNotFoundError:
                    problems.append(f"{rel} (missing)")
                    continue
                got = sha256_file(dest)
                if got != entry.sha256:  # checked before the copy takes its final name: a bad copy is never kept
                    problems.append(f"{rel} (sha256 {got[:12]}, recorded {entry.sha256[:12]})")
            if problems:
                raise damaged(what, problems, fix)
            os.chmod(tmp, 0o755)
            replace_dir(tmp, self.entry(sha))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        remember(self.entry(sha), files, self.record(sha), what)

    def adopt(self, src: Path, sha: str, files: Mapping[str, FileEntry], what: str) -> None:
        """Take the output this process just stored (`src`, hashed when it was stored) into the cache by rename,
        so that the next stage on this machine reads it without a download."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.dir / ".lock", f"the artifact cache {self.dir}"):
            entry = self.entry(sha)
            if entry.exists():
                shutil.rmtree(src) if src.is_dir() else src.unlink()
            elif src.is_dir():
                shutil.move(src, entry)  # a rename: the cache and the scratch folders share the work dir's disk
            else:
                entry.mkdir()
                shutil.move(src, entry / src.name)
            remember(entry, files, self.record(sha), what)
            self._evict(keep=sha)

    def entries(self) -> list[tuple[str, int, float]]:
        """(sha256, bytes, last used) of each cache entry, least recently used first."""
        out = []
        for rec in self.dir.glob("*.json") if self.dir.is_dir() else []:
            if self.entry(rec.stem).is_dir():
                out.append((rec.stem, int(_read_json(rec).get("bytes", 0)), rec.stat().st_mtime))
        return sorted(out, key=lambda e: e[2])

    def remove(self, sha: str) -> bool:
        """Remove an entry unless a running stage reads it (holds its lock); True when removed."""
        import fcntl

        with open(self.lock(sha), "a+", encoding="utf-8") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            shutil.rmtree(self.entry(sha), ignore_errors=True)
            self.record(sha).unlink(missing_ok=True)
            self.lock(sha).unlink(missing_ok=True)
        return True

    def _evict(self, keep: str) -> None:
        entries = self.entries()
        total = sum(n for _, n, _ in entries)
        for sha, nbytes, _ in entries:
            if total <= self.bound:
                return
            if sha != keep and self.remove(sha):
                total -= nbytes
        if total > self.bound:
            log.warning("the artifact cache %s holds %.2f GB, over its bound of %.2f GB (pipeline.artifact_cache_gb), "
                        "because running stages read all of it", self.dir, total / 1e9, self.bound / 1e9)

    def report(self) -> str:
        entries = self.entries()
        total = sum(n for _, n, _ in entries)
        return f"cache {self.dir}: {len(entries)} outputs, {total / 1e9:.3f} GB of {self.bound / 1e9:.3g} GB"
