"""Study database URLs, engines and sessions, and creation of hybridlab's tables.

SQLite (the default, a file under ``runs/``) runs in WAL mode with a busy timeout so the dashboard
reads while workers write; PostgreSQL engines ping pooled connections before use so a restarted
server costs a reconnect, not a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import tempfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from hybridlab.errors import HybridlabError
from hybridlab.store.models import SCHEMA_VERSION, Base, SchemaVersion
from hybridlab.store.retry import retrying

SQLITE_BUSY_TIMEOUT_S = 60
# A PostgreSQL host that drops packets would otherwise hang a connection attempt for minutes.
CONNECT_TIMEOUT_S = 10
T = TypeVar("T")


class StorageError(HybridlabError, RuntimeError):
    """The storage URL or database cannot be used as asked; says why."""


def default_sqlite_url(name: str, runs_dir: str | Path = "runs") -> str:
    path = Path(runs_dir) / f"{name}.db"
    return f"sqlite:///{path}"


def is_sqlite(url: str) -> bool:
    return sa.engine.make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path:
    return Path(sa.engine.make_url(url).database or "").resolve()


def engine_kwargs(url: str) -> dict[str, Any]:
    """Engine settings shared by hybridlab's engine and Optuna's RDBStorage."""
    if is_sqlite(url):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if sa.engine.make_url(url).get_backend_name() == "postgresql":
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return {"pool_pre_ping": True}


def readonly_url(url: str) -> str:
    """The URL opened for reading: SQLite through a ``mode=ro`` URI, which never creates a file."""
    if not is_sqlite(url):
        return url
    # SQLite decodes the URI's %-escapes and SQLAlchemy decodes the URL's: built this way, each
    # layer is escaped once and any file name survives both.
    uri = "file:" + urllib.parse.quote(str(sqlite_path(url)))
    readonly = sa.engine.URL.create("sqlite", database=uri, query={"mode": "ro", "uri": "true"})
    return readonly.render_as_string(hide_password=False)


def readonly_engine_kwargs(url: str) -> dict[str, Any]:
    if is_sqlite(url):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if sa.engine.make_url(url).get_backend_name() == "postgresql":
        # The server refuses any write in these sessions, whatever a library above tries.
        return {"pool_pre_ping": True,
                "connect_args": {"options": "-c default_transaction_read_only=on",
                                 "connect_timeout": CONNECT_TIMEOUT_S}}
    return {"pool_pre_ping": True}


def display_url(url: str) -> str:
    """The URL with any password hidden, for messages and pages."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def require_database(url: str) -> None:
    """Refuse a SQLite URL whose file does not exist (connecting would create an empty one)."""
    if not is_sqlite(url):
        return
    database = sa.engine.make_url(url).database
    if database and database != ":memory:" and not Path(database).is_file():
        raise StorageError(f"no study database at {url} (no database file {database})")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the dashboard read while workers write; the busy timeout makes writers queue.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.close()


def make_engine(url: str) -> Engine:
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as err:
        raise StorageError(f"storage URL {url!r} is not a database URL: {err}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = sa.create_engine(url, **engine_kwargs(url))
    except (ImportError, sa.exc.NoSuchModuleError) as err:
        raise StorageError(f"storage URL {url!r} needs a database driver: {err}") from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


@contextlib.contextmanager
def open_engine(url: str) -> Iterator[Engine]:
    """An engine for a short piece of work, disposed afterwards."""
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def create_tables(engine: Engine) -> None:
    """Create hybridlab's tables (idempotent) and check or record the schema version.

    Two processes creating them at once is safe under :func:`creation_lock`; without it, a
    concurrent creation can still fail, so callers that race hold the lock.
    """
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    _widen_columns(engine)
    with session_scope(engine) as session:
        versions = session.scalars(sa.select(SchemaVersion.version)).all()
        if not versions:
            session.add(SchemaVersion(version=SCHEMA_VERSION))
        elif max(versions) != SCHEMA_VERSION:
            raise StorageError(
                f"database schema version {max(versions)} but this hybridlab writes version "
                f"{SCHEMA_VERSION}; use a new database or migrate"
            )


def _add_missing_columns(engine: Engine) -> None:
    """Add the nullable columns that a model gained after an older hybridlab created its table.

    ``create_all`` creates missing tables, never missing columns. A nullable column without a
    default reads as NULL in the rows already there, which every reader takes as "not measured",
    so adding it keeps the schema version. Concurrent callers hold :func:`creation_lock`.
    """
    inspector = sa.inspect(engine)
    for table in Base.metadata.sorted_tables:
        existing = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in existing:
                continue
            if not column.nullable or column.server_default is not None:
                raise StorageError(f"table {table.name} lacks column {column.name}, which "
                                   "cannot be added in place; use a new database or migrate")
            kind = column.type.compile(dialect=engine.dialect)
            with engine.begin() as conn:
                conn.execute(sa.text(f'ALTER TABLE "{table.name}" ADD COLUMN '
                                     f'"{column.name}" {kind}'))


def _widen_columns(engine: Engine) -> None:
    """Widen VARCHAR columns that an older hybridlab created narrower than its models say.

    Only PostgreSQL enforces lengths (SQLite ignores them), and widening a VARCHAR rewrites no
    row, so this is safe on a live study.
    """
    if engine.dialect.name != "postgresql":
        return
    inspector = sa.inspect(engine)
    for table in Base.metadata.sorted_tables:
        existing = {c["name"]: c["type"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            want = getattr(column.type, "length", None)
            have = getattr(existing.get(column.name), "length", None)
            if want is not None and have is not None and have < want:
                with engine.begin() as conn:
                    conn.execute(sa.text(f'ALTER TABLE "{table.name}" ALTER COLUMN '
                                         f'"{column.name}" TYPE VARCHAR({want})'))


# pg_advisory_lock key of schema and study creation (any constant; this one names its purpose).
_CREATION_LOCK_KEY = zlib.crc32(b"hybridlab: create tables and studies")


@contextlib.contextmanager
def creation_lock(engine: Engine) -> Iterator[None]:
    """Serialise creating tables and studies among processes sharing one database.

    Neither SQLAlchemy's ``create_all`` nor Optuna's ``create_study`` is safe against a second
    process doing the same at the same moment ("table already exists", a unique violation).
    PostgreSQL: a session advisory lock held on a dedicated connection; SQLite: an ``fcntl``
    lock on ``<database>.lock`` beside the file (SQLite's own lock is per transaction, and
    ``create_all`` spans several).
    """
    backend = engine.url.get_backend_name()
    database = engine.url.database
    if backend == "sqlite" and database and database != ":memory:":
        with Path(f"{database}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        return
    if backend != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _CREATION_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            # The lock dies with the session anyway; a broken connection must not hide the
            # error that ended the work.
            with contextlib.suppress(sa.exc.DBAPIError):
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"),
                             {"key": _CREATION_LOCK_KEY})
                conn.commit()


def check_storage(url: str) -> None:
    """Refuse a database that cannot be reached or written, before anything starts; creates
    nothing (a SQLite file is probed through its folder, PostgreSQL through a rolled-back
    ``CREATE TABLE``)."""
    shown = display_url(url)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as err:
        raise StorageError(f"storage URL {url!r} is not a database URL: {err}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            return
        path = sqlite_path(url)
        try:
            if path.exists():
                uri = "file:" + urllib.parse.quote(str(path)) + "?mode=rw"
                con = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)
                try:
                    con.execute("BEGIN IMMEDIATE")
                    con.rollback()
                finally:
                    con.close()
                return
            folder = next(p for p in path.parents if p.exists())
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".hybridlab-probe-")
            os.close(fd)
            os.unlink(probe)
        except (OSError, sqlite3.Error) as err:
            raise StorageError(f"cannot write the SQLite database {shown} ({path}): "
                               f"{getattr(err, 'strerror', None) or err}") from None
        return
    try:
        with open_engine(url) as engine, engine.connect() as conn:
            probe = f"hl_write_probe_{os.getpid()}"
            with conn.begin() as tx:
                conn.execute(sa.text(f"CREATE TABLE {probe} (x integer)"))
                tx.rollback()
    except sa.exc.DBAPIError as err:
        first = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
        raise StorageError(f"cannot use the study database {shown}: {first}") from None


def transaction(engine: Engine, work: Callable[[Session], T]) -> T:
    """``work(session)`` in one committed transaction, run again after a transient database
    error (see :mod:`hybridlab.store.retry`); ``work`` must be safe to repeat."""

    def attempt(_attempt: int) -> T:
        with session_scope(engine) as session:
            return work(session)

    return retrying(attempt)


@contextlib.contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
