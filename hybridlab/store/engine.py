"""Study database URLs, engines and sessions, and creation of hybridlab's tables.

SQLite (the default, a file under ``runs/``) runs in WAL mode with a busy timeout so the dashboard
reads while workers write; PostgreSQL engines ping pooled connections before use so a restarted
server costs a reconnect, not a crash.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from hybridlab.errors import HybridlabError
from hybridlab.store.models import SCHEMA_VERSION, Base, SchemaVersion

SQLITE_BUSY_TIMEOUT_S = 60


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
                "connect_args": {"options": "-c default_transaction_read_only=on"}}
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
    """Create hybridlab's tables (idempotent) and check or record the schema version."""
    Base.metadata.create_all(engine)
    with session_scope(engine) as session:
        versions = session.scalars(sa.select(SchemaVersion.version)).all()
        if not versions:
            session.add(SchemaVersion(version=SCHEMA_VERSION))
        elif max(versions) != SCHEMA_VERSION:
            raise StorageError(
                f"database schema version {max(versions)} but this hybridlab writes version "
                f"{SCHEMA_VERSION}; use a new database or migrate"
            )


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
