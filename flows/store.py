"""The MLflow store behind a tracking (or backend store) URI, created and migrated once whoever opens it first.

MLflow creates its tables and runs its schema migrations when a process first opens a fresh database store, and two
processes doing that at once fail ("table latest_metrics already exists", "table _alembic_tmp_tags already exists")
or leave the store unusable. Every process of ours opens a database store under `store_lock`:

* `sqlite:///PATH` (any file, the embedded default `<work dir>/mlflow.db` included): a file lock beside the
  database, `PATH.lock` (flows.locks);
* a database server (`postgresql://`, `mysql://`): the server's own advisory lock, so that processes on different
  machines wait for each other too (Microsoft SQL Server: a file lock per machine);
* an MLflow server (`http(s)://`): nothing here; `llm-pipeline up` prepares its backend store before starting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.locks import file_lock, wait_for_lock
from stages.common import StageError

log = logging.getLogger(__name__)

SERVER_SCHEMES = ("postgresql", "mysql", "mssql")
# One advisory lock key for "creating or migrating this MLflow database" (pg: a bigint; mysql: a name).
_PG_KEY = int.from_bytes(hashlib.sha256(b"llm-pipeline: mlflow store setup").digest()[:8], "big", signed=True)
_MYSQL_LOCK = "llm-pipeline-mlflow-store"
APPLICATION_NAME = "llm-pipeline"
CONNECT_TIMEOUT_S = 10


class StoreUnavailableError(StageError):
    """The database behind the tracking store cannot be reached or opened (the user fixes the set-up)."""


def scheme(uri: str) -> str:
    return urllib.parse.urlparse(uri).scheme.split("+", 1)[0].lower()


def kind(uri: str) -> str:
    """'http' (an MLflow server), 'sqlite', 'server' (a database server), or 'other' (file store, plugins)."""
    s = scheme(uri)
    if s in ("http", "https"):
        return "http"
    if s == "sqlite":
        return "sqlite"
    if s in SERVER_SCHEMES:
        return "server"
    return "other"


def redact(uri: str) -> str:
    """`uri` without its password, for messages and logs."""
    try:
        if kind(uri) in ("sqlite", "server"):
            from sqlalchemy.engine import make_url

            return make_url(uri).render_as_string(hide_password=True)
        parts = urllib.parse.urlsplit(uri)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except Exception:  # an unparsable URI is shown by its scheme only
        return f"{scheme(uri)}://..."
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative paths against the working directory); None in memory."""
    from sqlalchemy.engine import make_url

    try:
        db = make_url(uri).database
    except Exception as e:
        raise StoreUnavailableError(f"MLflow store URI {uri!r} is not a valid SQLite URI ({e}); use "
                                    "sqlite:///relative/path.db or sqlite:////absolute/path.db") from None
    if not db or db == ":memory:" or db.startswith("file::memory:"):
        return None
    return Path(db).expanduser().resolve()


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Held while this process creates, migrates or first opens the database store at `uri` (see the module
    docstring); a no-op for MLflow servers and stores that need none."""
    k = kind(uri)
    if k == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            yield
            return
        _check_folder(path)
        lock = path.with_name(path.name + ".lock")
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(lock, f"the MLflow store {path} to be created or migrated"))
            except OSError as e:
                raise StoreUnavailableError(
                    f"cannot create the lock file {lock} beside the MLflow store ({e.strerror}); point "
                    "MLFLOW_TRACKING_URI (or the work dir) at a writable place") from None
            yield
    elif k == "server":
        with _server_lock(uri):
            yield
    else:
        yield


def _check_folder(path: Path) -> None:
    """The folder of a SQLite store exists (made if missing) and is writable, or a one-line error says so."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreUnavailableError(f"cannot create the folder {path.parent} of the MLflow store {path}: "
                                    f"{e.strerror}; point MLFLOW_TRACKING_URI at a writable place") from e


def _connect_args(dialect: str) -> dict[str, Any]:
    if dialect == "postgresql":
        return {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": f"{APPLICATION_NAME} {os.getpid()}"}
    if dialect == "mysql":
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    if dialect == "mssql":
        return {"timeout": CONNECT_TIMEOUT_S}
    return {}


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def connect(uri: str) -> Any:
    """A SQLAlchemy connection (autocommit) to the database server of `uri`, failing within seconds with a
    message that says what to check, instead of MLflow's minutes of retries."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    dialect = scheme(uri)
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=_connect_args(dialect))
        return engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    except ModuleNotFoundError as e:
        raise StoreUnavailableError(
            f"the MLflow store {redact(uri)} needs the Python driver '{e.name}', which is not installed; "
            "install it (for postgresql:// the project pins psycopg[binary]; postgresql+psycopg2:// needs "
            "psycopg2)") from None
    except Exception as e:
        raise StoreUnavailableError(
            f"cannot connect to the MLflow database {redact(uri)}: {_first_line(e)}. Start the database server, "
            "or check the host, port, user, database name and password (a ~/.pgpass file keeps the password off "
            "command lines)") from None


@contextlib.contextmanager
def _server_lock(uri: str) -> Iterator[None]:
    dialect = scheme(uri)
    if dialect not in ("postgresql", "mysql"):
        # no advisory lock of the server's we use: one lock per machine, keyed by the database
        digest = hashlib.sha256(redact(uri).encode()).hexdigest()[:16]
        with file_lock(Path(tempfile.gettempdir()) / f"llm-pipeline-store-{digest}.lock",
                       f"the MLflow store {redact(uri)} to be created or migrated"):
            yield
        return
    from sqlalchemy import text

    conn = connect(uri)
    try:
        if dialect == "postgresql":
            take, give = "SELECT pg_try_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"
            params: dict[str, Any] = {"k": _PG_KEY}
        else:
            take, give = "SELECT GET_LOCK(:k, 0)", "SELECT RELEASE_LOCK(:k)"
            params = {"k": _MYSQL_LOCK}
        wait_for_lock(lambda: bool(conn.execute(text(take), params).scalar()), lambda: _pg_holder(conn, dialect),
                      f"the MLflow store {redact(uri)} to be created or migrated", "the database's advisory lock",
                      "End that session", max_delay_s=0.25)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                conn.execute(text(give), params)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _pg_holder(conn: Any, dialect: str) -> tuple[bool, str]:
    """(held by one of our processes, who holds the store's advisory lock in words)."""
    if dialect != "postgresql":
        return False, "another connection (MySQL does not say which)"
    from sqlalchemy import text

    hi, lo = (_PG_KEY >> 32) & 0xFFFFFFFF, _PG_KEY & 0xFFFFFFFF
    try:
        row = conn.execute(text(
            "SELECT a.pid, a.application_name, a.usename, a.client_addr FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"), {"hi": hi, "lo": lo}).first()
    except Exception:
        row = None
    if row is None:
        return False, "another connection"
    app = row.application_name or ""
    who = (f"database session {row.pid} (application {app or 'unnamed'!r}, user {row.usename}, "
           f"client {row.client_addr or 'local socket'})")
    return app.startswith(APPLICATION_NAME), who


def prepare_store(uri: str, default_artifact_root: str | None = None) -> None:
    """Create and migrate the MLflow database at `uri` once (every process may call this; one does the work).

    `default_artifact_root` is what the MLflow server will use (`mlflow-artifacts:/` when it proxies artifacts), so
    that the store's Default experiment points where the server would have pointed it."""
    if kind(uri) not in ("sqlite", "server"):
        return
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    with store_lock(uri):  # a database server is connected to here: seconds, not MLflow's minutes of retries
        TrackingStore(uri, default_artifact_root or "./mlruns")
        RegistryStore(uri)
