"""Where stage outputs live: written once under an artifact root, a local folder or any fsspec URL (`s3://`, `gs://`).

Each stage run gets its own location, `<root>/<stage>/<run id>/`, and its outputs are moved (a local root on the
same disk: a rename per output) or uploaded (an object store) there once; nothing writes to a location afterwards,
so a later run, `--force` included, never changes what an earlier run recorded. The MLflow run records the location
and a sha256 manifest of every file (`flows.outputs`); this module only knows the bytes: putting outputs, listing a
location with each file's size and fingerprint, hashing a stored file, removing a location.

A file's fingerprint is what the store says changes whenever the object is written: the modification time in
nanoseconds on a local disk, the ETag on S3 (generation or md5 on other stores). A fingerprint that differs from the
one recorded at write time means the file was rewritten, and it is hashed again before anything reuses it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flows.paths import SAFE_NAME, check_inside, check_run_id, safe_artifact_path
from llm.files import CHUNK, fsync_dir, sha256_file
from stages.common import StageError

# keys of an fsspec `info` dict that change whenever an object is written, by preference
_FINGERPRINT_KEYS = ("ETag", "etag", "generation", "md5Hash", "content_md5", "mtime", "LastModified",
                     "last_modified", "updated", "created")


@dataclass(frozen=True)
class FileEntry:
    """One stored file: its size, content hash, and the store's fingerprint of it when it was written."""

    nbytes: int
    sha256: str
    fingerprint: str = ""


def describe(path: Path) -> dict[str, FileEntry]:
    """Relative path (POSIX; the file's own name for a single-file output) -> size and sha256 of each file under
    `path`, hashed once. Fingerprints are filled in after the files are stored."""
    if path.is_file():
        return {path.name: FileEntry(path.stat().st_size, sha256_file(path))}
    return {f.relative_to(path).as_posix(): FileEntry(f.stat().st_size, sha256_file(f))
            for f in sorted(path.rglob("*")) if f.is_file()}


def tree_sha(files: Mapping[str, str], single: bool) -> str:
    """`llm.files.sha256_tree` of an output from its files' hashes (relative path -> sha256), without reading them:
    a single file's hash is its own, a folder's covers every relative path and hash in path order."""
    if single:
        (sha,) = files.values()
        return sha
    h = hashlib.sha256()
    for rel in sorted(files, key=lambda r: PurePosixPath(r).parts):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(files[rel].encode())
    return h.hexdigest()


def is_remote(url: str) -> bool:
    """An fsspec URL other than a local file (`s3://...`, `gs://...`, `memory://...`)."""
    return "://" in url and not url.startswith("file://")


def local_root(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser().resolve()


class Store:
    """An artifact root: the locations of stage runs under it and the bytes in them (see the module docstring)."""

    url: str

    def location(self, stage: str, run_id: str) -> str:
        if not SAFE_NAME.match(stage):
            raise StageError(f"stage name {stage!r} is not a plain name; refusing to make a location for it")
        return f"{self.url.rstrip('/')}/{stage}/{check_run_id(run_id)}"

    def put(self, location: str, rel: str, src: Path) -> None:
        """Store the file or folder `src` at `<location>/<rel>` (a new path: locations are written once)."""
        raise NotImplementedError

    def listing(self, location: str) -> dict[str, tuple[int, str]]:
        """Relative path -> (size, fingerprint) of every file under `location` (empty when it is not there)."""
        raise NotImplementedError

    def file_sha256(self, location: str, rel: str) -> str:
        raise NotImplementedError

    def get(self, location: str, rel: str, dest: Path) -> None:
        """Copy the stored file `<location>/<rel>` to the local path `dest`."""
        raise NotImplementedError

    def remove(self, location: str) -> None:
        raise NotImplementedError

    def locations(self) -> Iterator[tuple[str, str, str]]:
        """(stage, run id, location) of every location under the root."""
        raise NotImplementedError

    def check(self, hint: str) -> None:
        """Fail fast, naming the setting (`hint`) and the fix, when the root cannot be written."""
        raise NotImplementedError


class LocalStore(Store):
    """A root on a local (or mounted) file system; outputs on the same disk are moved there by rename."""

    def __init__(self, url: str) -> None:
        self.root = local_root(url)
        self.url = str(self.root)

    def path(self, location: str, rel: str = "") -> Path:
        base = Path(location)
        return base / rel if rel else base

    def put(self, location: str, rel: str, src: Path) -> None:
        dest = self.path(location, safe_artifact_path(rel, "output path"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            raise StageError(f"{dest} already exists; a run's location is written once")
        try:
            os.rename(src, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # the root is on another disk: a copy under a temporary name, renamed when complete
            tmp = dest.with_name(f".{dest.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp)
            os.rename(tmp, dest)
            shutil.rmtree(src) if src.is_dir() else src.unlink()
        fsync_dir(dest.parent)

    def listing(self, location: str) -> dict[str, tuple[int, str]]:
        base = self.path(location)
        out: dict[str, tuple[int, str]] = {}
        if not base.is_dir():
            return out
        for f in base.rglob("*"):
            if f.is_symlink():  # never written by us: a file planted to be read in place
                out[f.relative_to(base).as_posix()] = (-1, "symlink")
            elif f.is_file():
                st = f.stat()
                out[f.relative_to(base).as_posix()] = (st.st_size, f"mtime_ns={st.st_mtime_ns}")
        return out

    def file_sha256(self, location: str, rel: str) -> str:
        return sha256_file(check_inside(self.path(location, rel), Path(location), "stored file"))

    def get(self, location: str, rel: str, dest: Path) -> None:
        shutil.copyfile(self.path(location, rel), dest)

    def remove(self, location: str) -> None:
        shutil.rmtree(self.path(location), ignore_errors=True)

    def locations(self) -> Iterator[tuple[str, str, str]]:
        if not self.root.is_dir():
            return
        for stage in sorted(p for p in self.root.iterdir() if p.is_dir() and SAFE_NAME.match(p.name)):
            for run in sorted(p for p in stage.iterdir() if p.is_dir()):
                yield stage.name, run.name, str(run)

    def size(self, location: str) -> int:
        return sum(n for n, _ in self.listing(location).values() if n > 0)

    def check(self, hint: str) -> None:
        from flows.environment import check_work_dir

        check_work_dir(self.root, hint, "artifact root")


class RemoteStore(Store):
    """A root that fsspec reaches (an object store); credentials and endpoint come from the environment as the
    store's library reads them (for S3: AWS_* variables or ~/.aws, AWS_ENDPOINT_URL_S3 for MinIO or moto)."""

    def __init__(self, url: str) -> None:
        import fsspec

        try:
            self.fs, base = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise StageError(f"pipeline.artifact_root {url!r}: {e}; install the fsspec package of that store "
                             "(s3fs for s3://, gcsfs for gs://)") from None
        self.protocol = url.split("://", 1)[0]
        self.url = f"{self.protocol}://{base.rstrip('/')}"

    def _path(self, location: str, rel: str = "") -> str:
        path = location.split("://", 1)[1] if "://" in location else location
        return f"{path}/{safe_artifact_path(rel, 'stored file')}" if rel else path

    def put(self, location: str, rel: str, src: Path) -> None:
        files = [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.is_file())
        dest = self._path(location, rel)
        remote = [dest] if src.is_file() else [f"{dest}/{f.relative_to(src).as_posix()}" for f in files]
        if files:
            self.fs.put([str(f) for f in files], remote)

    def listing(self, location: str) -> dict[str, tuple[int, str]]:
        base = self._path(location)
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            if info.get("type", "file") == "file" and path.startswith(base + "/"):
                key = next((k for k in _FINGERPRINT_KEYS if info.get(k) not in (None, "")), None)
                out[path[len(base) + 1:]] = (int(info.get("size") or 0), f"{key}={info[key]}" if key else "")
        return out

    def file_sha256(self, location: str, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self._path(location, rel), "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        return h.hexdigest()

    def get(self, location: str, rel: str, dest: Path) -> None:
        self.fs.get_file(self._path(location, rel), str(dest))

    def remove(self, location: str) -> None:
        path = self._path(location)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(path)

    def locations(self) -> Iterator[tuple[str, str, str]]:
        base = self._path(self.url)
        self.fs.invalidate_cache(base)
        try:
            stages = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return
        for stage_path in sorted(stages):
            stage = stage_path.rstrip("/").rsplit("/", 1)[-1]
            if not SAFE_NAME.match(stage) or self.fs.isfile(stage_path):
                continue
            for run_path in sorted(self.fs.ls(stage_path, detail=False)):
                run_id = run_path.rstrip("/").rsplit("/", 1)[-1]
                yield stage, run_id, f"{self.protocol}://{run_path.rstrip('/')}"

    def size(self, location: str) -> int:
        return sum(n for n, _ in self.listing(location).values())

    def check(self, hint: str) -> None:
        probe = f"{self._path(self.url)}/.write-check-{os.getpid()}"
        try:
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
        except Exception as e:  # every store library has its own errors; all mean the same to the user here
            raise StageError(
                f"the artifact root {self.url} ({hint}) cannot be written: {type(e).__name__}: {e}. Check the bucket "
                "exists, the credentials (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws) and the "
                "endpoint (AWS_ENDPOINT_URL_S3 for MinIO), or use a local folder") from None


def open_store(url: str) -> Store:
    """The store of an artifact root or of a location under one."""
    return RemoteStore(url) if is_remote(url) else LocalStore(url)


ROOT_ENV = "LLM_PIPELINE_ARTIFACT_ROOT"  # the root of every client of a team set-up (docker/compose.yaml)


def root_url(artifact_root: str, work_dir: str | Path) -> str:
    """The artifact root a pipeline section names: `pipeline.artifact_root`, else LLM_PIPELINE_ARTIFACT_ROOT, else
    `<work dir>/artifacts`."""
    root = artifact_root.strip() or os.environ.get(ROOT_ENV, "").strip()
    if not root:
        return str(Path(work_dir).resolve() / "artifacts")
    return root if is_remote(root) else str(local_root(root))


def check_location(location: str, stage: str, run_id: str) -> str:
    """A location read from MLflow must be the run's own (`.../<stage>/<run id>`): a tag edited to point at another
    folder of this machine is never followed."""
    parts = location.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or parts[1:] != [stage, run_id] or "/../" in f"{location}/" or "\0" in location:
        raise StageError(f"run {run_id}: its recorded location {location[:200]!r} is not a location of a '{stage}' "
                         "run (<root>/<stage>/<run id>); the run's tags were altered, so its outputs are not used")
    return location


def link_identical(folder: Path, originals: Mapping[str, Path]) -> int:
    """Replace each file under `folder` whose bytes are those of a stored file (`originals`: sha256 -> its path, on
    the same disk) by a hard link to it; the bytes saved. For copies a library insists on making of stored outputs
    (MLflow's copy of the registered model): both names then share one inode, and neither is ever written again."""
    by_size: dict[int, list[tuple[str, Path]]] = {}
    for sha, p in originals.items():
        with_size = by_size.setdefault(p.stat().st_size, [])
        with_size.append((sha, p))
    saved = 0
    for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if f.is_symlink() or not f.is_file():
            continue
        st = f.stat()
        matches = by_size.get(st.st_size, [])
        if not matches or st.st_nlink > 1:
            continue
        sha = sha256_file(f)
        original = next((p for s, p in matches if s == sha), None)
        if original is None or original.stat().st_dev != st.st_dev:
            continue
        tmp = f.with_name(f".{f.name}.link")
        tmp.unlink(missing_ok=True)
        os.link(original, tmp)
        os.replace(tmp, f)
        saved += st.st_size
    return saved
