"""The study database: URLs, engines, and hybridlab's own tables beside Optuna's.

hybridlab's tables have their own declarative base and an ``hl_`` prefix; they are keyed by study
name and trial number rather than by a foreign key into Optuna's tables (a foreign key across two
metadata objects fails at create time). Every write goes through :func:`session_scope`, which
commits or rolls back as a whole.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hybridlab.errors import HybridlabError

SCHEMA_VERSION = 1
SQLITE_BUSY_TIMEOUT_S = 60


class StorageError(HybridlabError, RuntimeError):
    """The storage URL or database cannot be used as asked; says why."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "hl_schema"
    version: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Candidate(Base):
    """One trial's architecture, its cost, and what became of it."""

    __tablename__ = "hl_candidate"
    __table_args__ = (sa.UniqueConstraint("study", "trial"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study: Mapped[str] = mapped_column(sa.String(255), index=True)
    trial: Mapped[int]
    # Empty for a candidate rejected by the pattern rules before it had an architecture.
    genome_hash: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    pattern: Mapped[str | None] = mapped_column(sa.String(1024))
    arch: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    params: Mapped[int | None] = mapped_column(sa.BigInteger)
    flops_per_token: Mapped[float | None]
    state_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    state_context: Mapped[int | None]
    tokens_per_second: Mapped[float | None]
    task: Mapped[str] = mapped_column(sa.String(255))
    task_fingerprint: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    corpus_hash: Mapped[str | None] = mapped_column(sa.String(64))
    code_version: Mapped[str] = mapped_column(sa.String(64))
    # trained | rejected | reused | pruned | failed | running
    status: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    reused_from: Mapped[int | None]
    objectives: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)


class CurvePoint(Base):
    __tablename__ = "hl_curve"
    __table_args__ = (sa.Index("ix_hl_curve_trial", "study", "trial"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study: Mapped[str] = mapped_column(sa.String(255))
    trial: Mapped[int]
    step: Mapped[int]
    split: Mapped[str] = mapped_column(sa.String(16))
    metric: Mapped[str] = mapped_column(sa.String(64))
    value: Mapped[float]


class Evaluation(Base):
    __tablename__ = "hl_evaluation"
    __table_args__ = (sa.Index("ix_hl_evaluation_trial", "study", "trial"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study: Mapped[str] = mapped_column(sa.String(255))
    trial: Mapped[int]
    task: Mapped[str] = mapped_column(sa.String(255))
    metric: Mapped[str] = mapped_column(sa.String(64))
    value: Mapped[float]
    stderr: Mapped[float | None]
    harness: Mapped[str] = mapped_column(sa.String(64))
    harness_version: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Artifact(Base):
    __tablename__ = "hl_artifact"
    __table_args__ = (sa.Index("ix_hl_artifact_trial", "study", "trial"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study: Mapped[str] = mapped_column(sa.String(255))
    trial: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(64))
    path: Mapped[str] = mapped_column(sa.Text)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Slot(Base):
    """A claim on one of the study's ``trials`` places: the cap holds across workers and restarts.

    A worker claims a free slot before it asks Optuna for a trial and records the trial's number in
    it; a slot whose trial failed is released, so exactly ``trials`` trials finish.
    """

    __tablename__ = "hl_slot"
    study: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    slot: Mapped[int] = mapped_column(primary_key=True)
    trial: Mapped[int | None]
    owner: Mapped[str] = mapped_column(sa.String(255))
    # Unix seconds: comparable across hosts and database time zones (a naive timestamp is not).
    claimed_unix: Mapped[float] = mapped_column(sa.Float, default=time.time)


def default_sqlite_url(name: str, runs_dir: str | Path = "runs") -> str:
    path = Path(runs_dir) / f"{name}.db"
    return f"sqlite:///{path}"


def is_sqlite(url: str) -> bool:
    return sa.engine.make_url(url).get_backend_name() == "sqlite"


def engine_kwargs(url: str) -> dict[str, Any]:
    """Engine settings shared by hybridlab's engine and Optuna's RDBStorage."""
    if is_sqlite(url):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {"pool_pre_ping": True}


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
