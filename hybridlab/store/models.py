"""hybridlab's tables beside Optuna's, and the queries over them.

The tables have their own declarative base and an ``hl_`` prefix; they are keyed by study name and
trial number rather than by a foreign key into Optuna's tables (a foreign key across two metadata
objects fails at create time). Queries live beside their table as classmethods taking a session;
every write goes through :func:`hybridlab.store.engine.session_scope`.
"""

from __future__ import annotations

import enum
import time
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SCHEMA_VERSION = 1
CHECKPOINT_KIND = "checkpoint:"


def _now() -> datetime:
    return datetime.now(timezone.utc)


class CandidateStatus(str, enum.Enum):
    """What became of a trial's candidate (``hl_candidate.status``)."""

    RUNNING = "running"
    TRAINED = "trained"
    REUSED = "reused"
    REJECTED = "rejected"
    PRUNED = "pruned"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


# Statuses that end with weights: a reused candidate points at the trial that trained them.
WITH_WEIGHTS = (CandidateStatus.TRAINED, CandidateStatus.REUSED)
# Statuses whose reason is worth a note in tables and the dashboard.
NOTED = (CandidateStatus.REJECTED, CandidateStatus.REUSED, CandidateStatus.FAILED,
         CandidateStatus.PRUNED)


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
    # Added after schema version 1 was released: create_tables adds it to older databases.
    active_params: Mapped[int | None] = mapped_column(sa.BigInteger)
    flops_per_token: Mapped[float | None]
    state_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    state_context: Mapped[int | None]
    tokens_per_second: Mapped[float | None]
    task: Mapped[str] = mapped_column(sa.String(255))
    task_fingerprint: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    corpus_hash: Mapped[str | None] = mapped_column(sa.String(64))
    code_version: Mapped[str] = mapped_column(sa.String(64))
    # A CandidateStatus value.
    status: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    reused_from: Mapped[int | None]
    objectives: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)

    @classmethod
    def get(cls, session: Session, study: str, trial: int) -> Candidate | None:
        return session.scalars(sa.select(cls).where(cls.study == study,
                                                    cls.trial == trial)).first()

    @classmethod
    def of_study(cls, session: Session, study: str) -> dict[int, Candidate]:
        rows = session.scalars(sa.select(cls).where(cls.study == study)).all()
        return {row.trial: row for row in rows}

    @classmethod
    def first_trained(cls, session: Session, study: str, genome_hash: str) -> Candidate | None:
        """The earliest trial that trained this genome in the study, if any."""
        return session.scalars(sa.select(cls).where(
            cls.study == study, cls.genome_hash == genome_hash,
            cls.status == CandidateStatus.TRAINED.value,
        ).order_by(cls.trial).limit(1)).first()

    @classmethod
    def newest_reason(cls, session: Session, study: str, status: CandidateStatus) -> str | None:
        return session.scalars(sa.select(cls.reason).where(
            cls.study == study, cls.status == status.value,
        ).order_by(cls.trial.desc()).limit(1)).first()

    @classmethod
    def fail_unfinished(cls, session: Session, study: str, trials: list[int],
                        reason: str) -> int:
        """Mark the candidates of failed trials that still say running; returns how many."""
        if not trials:
            return 0
        result = session.execute(sa.update(cls).where(
            cls.study == study, cls.trial.in_(trials),
            cls.status == CandidateStatus.RUNNING.value,
        ).values(status=CandidateStatus.FAILED.value, reason=reason, updated_at=_now()))
        return result.rowcount

    @classmethod
    def upsert(cls, session: Session, study: str, trial: int, values: dict[str, Any]) -> None:
        """Create the trial's row, or update it with every value that is not None (a reason
        is always written: None clears an earlier one)."""
        row = cls.get(session, study, trial)
        if row is None:
            session.add(cls(study=study, trial=trial, **values))
            return
        for key, value in values.items():
            if value is not None or key == "reason":
                setattr(row, key, value)

    @classmethod
    def studies(cls, session: Session) -> list[str]:
        return sorted(session.scalars(sa.select(cls.study).distinct()).all())


class CurvePoint(Base):
    __tablename__ = "hl_curve"
    __table_args__ = (sa.Index("ix_hl_curve_trial", "study", "trial"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study: Mapped[str] = mapped_column(sa.String(255))
    trial: Mapped[int]
    step: Mapped[int]
    # "train" / "test", prefixed with the task's name in a suite; a task name can hold a path.
    split: Mapped[str] = mapped_column(sa.String(1024))
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

    @classmethod
    def of_trial(cls, session: Session, study: str, trial: int) -> list[Evaluation]:
        return list(session.scalars(sa.select(cls).where(
            cls.study == study, cls.trial == trial).order_by(cls.id)).all())


class Artifact(Base):
    __tablename__ = "hl_artifact"
    __table_args__ = (sa.Index("ix_hl_artifact_trial", "study", "trial"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study: Mapped[str] = mapped_column(sa.String(255))
    trial: Mapped[int]
    # "checkpoint:<task name>"; the name of a corpus task holds its path.
    kind: Mapped[str] = mapped_column(sa.String(1024))
    path: Mapped[str] = mapped_column(sa.Text)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=_now)

    @classmethod
    def checkpoints(cls, session: Session, study: str, trial: int) -> dict[str, Artifact]:
        """The newest checkpoint artifact of each task the trial trained on, keyed by task."""
        rows = session.scalars(sa.select(cls).where(
            cls.study == study, cls.trial == trial,
            cls.kind.startswith(CHECKPOINT_KIND)).order_by(cls.id)).all()
        return {row.kind.removeprefix(CHECKPOINT_KIND): row for row in rows}


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


class Run(Base):
    """One ``hybridlab search`` invocation on a study (a driver), numbered in starting order.

    Its ``run_id`` marks the trials it ran (trial user attribute ``run``), so the give-up rule and
    an interrupted run's clean-up see only this run's trials; its ``number`` picks a block of
    sampler seeds (see ``hybridlab.search.runner``) so a restart or a second driver never replays
    an earlier run's proposals.
    """

    __tablename__ = "hl_run"
    study: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    workers: Mapped[int]
    owner: Mapped[str] = mapped_column(sa.String(255))
    started_unix: Mapped[float] = mapped_column(sa.Float, default=time.time)

    @classmethod
    def begin(cls, session: Session, study: str, run_id: str, workers: int, owner: str) -> int:
        """Record a run starting now (or find it, when a retried call had committed); its number.

        Two drivers starting together both pick the next number; the loser's commit fails on the
        primary key and the caller repeats this.
        """
        mine = session.scalars(sa.select(cls.number).where(cls.run_id == run_id)).first()
        if mine is not None:
            return mine
        last = session.scalars(sa.select(sa.func.max(cls.number))
                               .where(cls.study == study)).first()
        number = 0 if last is None else last + 1
        session.add(cls(study=study, number=number, run_id=run_id, workers=workers, owner=owner))
        return number


class GenomeClaim(Base):
    """The trial training a genome now: a second trial of that genome waits for its result.

    A claim is live while its trial is RUNNING in Optuna (whose heartbeats say whether its worker
    lives); a claim whose trial ended without a trained result is taken over.
    """

    __tablename__ = "hl_genome_claim"
    study: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    genome_hash: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    trial: Mapped[int]
    owner: Mapped[str] = mapped_column(sa.String(255))
    claimed_unix: Mapped[float] = mapped_column(sa.Float, default=time.time)


class PromotionRole(str, enum.Enum):
    """What a promoted run stands for (``hl_promotion.role``)."""

    CANDIDATE = "candidate"  # a top-K trial of the proxy search
    TRANSFORMER = "transformer"  # baseline: the best candidate with every mixer attention
    SSM = "ssm"  # baseline: the best candidate with every mixer a Mamba layer

    def __str__(self) -> str:
        return self.value


class PromotionStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    TRAINED = "trained"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class Promotion(Base):
    """One promoted run: a proxy trial (or a baseline) extrapolated to a rung and retrained.

    The run itself is trial ``run_trial`` of the rung's own Optuna study ``run_study`` (see
    ``store.studies.rung_study_name``), so its candidate row, curve, evaluations and checkpoint sit
    in the usual tables under that study, and ``status``, ``export`` and the dashboard read it as
    they read any trial. ``proxy_value`` is the source trial's objective (None for baselines, which
    have no proxy trial); ``value`` the same metric after training at the rung.
    """

    __tablename__ = "hl_promotion"
    study: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    rung: Mapped[int] = mapped_column(primary_key=True)  # 1 for the first rung
    # "trial:<n>" for a candidate, the role's name for a baseline: one run per key and rung.
    key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    role: Mapped[str] = mapped_column(sa.String(16))  # a PromotionRole value
    source_trial: Mapped[int | None]
    run_study: Mapped[str] = mapped_column(sa.String(255))
    run_trial: Mapped[int | None]
    status: Mapped[str] = mapped_column(sa.String(16))  # a PromotionStatus value
    reason: Mapped[str | None] = mapped_column(sa.Text)
    metric: Mapped[str] = mapped_column(sa.String(64))
    proxy_value: Mapped[float | None]
    value: Mapped[float | None]
    genome_hash: Mapped[str] = mapped_column(sa.String(64))
    pattern: Mapped[str] = mapped_column(sa.String(1024))
    arch: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    params: Mapped[int] = mapped_column(sa.BigInteger)
    source_params: Mapped[int] = mapped_column(sa.BigInteger)
    strategy: Mapped[str] = mapped_column(sa.String(16))
    target: Mapped[str] = mapped_column(sa.String(64))  # the rung's target, as written
    workers: Mapped[int]  # data-parallel workers of the run
    nodes: Mapped[list[str] | None] = mapped_column(sa.JSON)  # Ray nodes the run trained on
    seconds: Mapped[float | None]
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)

    @classmethod
    def of_study(cls, session: Session, study: str, rung: int | None = None) -> list[Promotion]:
        """The study's promoted runs (of one rung), by rung, then candidates before baselines."""
        query = sa.select(cls).where(cls.study == study)
        if rung is not None:
            query = query.where(cls.rung == rung)
        rows = session.scalars(query).all()
        order = {role.value: i for i, role in enumerate(PromotionRole)}
        return sorted(rows, key=lambda r: (r.rung, order.get(r.role, 99),
                                           r.source_trial if r.source_trial is not None else -1))


class CalibrationRun(Base):
    """One reference architecture trained on one task of a space at one seed and budget, by
    ``hybridlab calibrate`` (see ``hybridlab.search.calibration``).

    ``fingerprint`` hashes everything the value depends on (space, panel, task fingerprint, train
    settings, metric, seed), so a rerun skips what is stored and a changed space trains afresh.
    """

    __tablename__ = "hl_calibration"
    __table_args__ = (sa.Index("ix_hl_calibration_space", "space"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    space: Mapped[str] = mapped_column(sa.String(255))
    fingerprint: Mapped[str] = mapped_column(sa.String(64), unique=True)
    # The calibration's settings without the seed and reference: runs that belong together.
    settings: Mapped[str] = mapped_column(sa.String(64))
    budget_scale: Mapped[float]
    task: Mapped[str] = mapped_column(sa.String(1024))
    reference: Mapped[str] = mapped_column(sa.String(64))
    pattern: Mapped[str] = mapped_column(sa.String(255))
    params: Mapped[int]
    seed: Mapped[int]
    metric: Mapped[str] = mapped_column(sa.String(64))
    value: Mapped[float]
    steps: Mapped[int]
    seconds: Mapped[float]
    created_unix: Mapped[float] = mapped_column(sa.Float, default=time.time)
