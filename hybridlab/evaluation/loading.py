"""Find the model to evaluate: a checkpoint folder, or the checkpoint a study trial recorded.

A checkpoint folder is a ``step_*`` folder (``model.safetensors`` inside) or the run folder that
holds them (its newest complete step is used); the architecture is ``arch.yaml`` in either, as
``hybridlab train`` writes it, or given explicitly. A study trial's architecture is its
``Candidate.arch`` and its weights the newest ``checkpoint:<task>`` artifact (for a trial that
reused another's genome, that trial's artifact), checked against the recorded sha256.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch

from hybridlab.checkpoint import MODEL_FILE, latest_checkpoint, load_checkpoint
from hybridlab.config import ArchConfig
from hybridlab.errors import HybridlabError
from hybridlab.files import sha256_file
from hybridlab.model import HybridLM
from hybridlab.search.storage import Artifact, Candidate, is_sqlite, make_engine, session_scope

log = logging.getLogger(__name__)

ARCH_FILES = ("arch.yaml", "arch.json")


class EvalError(HybridlabError, ValueError):
    """An evaluation cannot be run as asked; the message says what was wrong."""


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where a model's architecture and weights come from, and what it was trained on."""

    arch: ArchConfig
    checkpoint: Path  # a step folder holding model.safetensors
    study: str | None = None
    trial: int | None = None
    storage_url: str | None = None
    task: str | None = None
    task_fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def seq_len(self) -> int | None:
        """The training window length, when the trial recorded it."""
        value = self.task_fingerprint.get("seq_len")
        return value if isinstance(value, int) else None

    def describe(self) -> str:
        where = f"trial {self.trial} of study {self.study!r}" if self.study else "checkpoint"
        return f"{where}: {self.arch.pattern} ({self.arch.canonical_hash()}) from {self.checkpoint}"




def _step_folder(path: Path) -> Path:
    if (path / MODEL_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise EvalError(f"checkpoint {path}: neither a checkpoint folder ({MODEL_FILE} inside) "
                        "nor a folder of complete step_* checkpoints")
    return found


def resolve_checkpoint(path: str | Path, *, arch: ArchConfig | str | Path | None = None
                       ) -> ModelSource:
    """A checkpoint folder (or run folder) and its architecture (default: arch.yaml beside it)."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"checkpoint {path}: no such folder")
    step = _step_folder(path)
    if isinstance(arch, ArchConfig):
        config = arch
    elif arch is not None:
        config = ArchConfig.load(arch)
    else:
        candidates = [folder / name for folder in (step, step.parent) for name in ARCH_FILES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise EvalError(f"checkpoint {step}: no {' or '.join(ARCH_FILES)} in {step} or "
                            f"{step.parent}; pass the architecture file (--arch / arch=FILE)")
        config = ArchConfig.load(found)
    return ModelSource(arch=config, checkpoint=step)


def _check_database(url: str) -> None:
    """Refuse a SQLite URL whose file does not exist (connecting would create an empty one)."""
    if not is_sqlite(url):
        return
    database = sa.engine.make_url(url).database
    if database and database != ":memory:" and not Path(database).is_file():
        raise EvalError(f"storage {url}: no database file at {database}")


def resolve_trial(storage_url: str, study: str, trial: int) -> ModelSource:
    """The architecture and recorded checkpoint of one trial of a study."""
    _check_database(storage_url)
    engine = make_engine(storage_url)
    try:
        with session_scope(engine) as session:
            row = session.scalars(sa.select(Candidate).where(
                Candidate.study == study, Candidate.trial == trial)).first()
            if row is None:
                trials = session.scalars(sa.select(Candidate.trial).where(
                    Candidate.study == study).order_by(Candidate.trial)).all()
                if not trials:
                    studies = session.scalars(sa.select(Candidate.study).distinct()).all()
                    raise EvalError(f"storage {storage_url}: no study {study!r} "
                                    f"(studies: {', '.join(sorted(studies)) or 'none'})")
                raise EvalError(f"study {study!r} has no trial {trial} "
                                f"(trials {min(trials)}..{max(trials)})")
            where = f"trial {trial} of study {study!r}"
            if row.arch is None:
                raise EvalError(f"{where} has no architecture (status {row.status}: "
                                f"{row.reason or 'no reason recorded'})")
            owner = trial
            if row.status == "reused" and row.reused_from is not None:
                owner = row.reused_from
            artifacts = session.scalars(sa.select(Artifact).where(
                Artifact.study == study, Artifact.trial == owner,
                Artifact.kind.startswith("checkpoint:")).order_by(Artifact.id)).all()
            arch = ArchConfig.from_dict(row.arch, source=f"{where} (hl_candidate.arch)")
            task, fingerprint = row.task, dict(row.task_fingerprint or {})
    finally:
        engine.dispose()
    if not artifacts:
        reused = f" (it reused trial {owner}'s genome)" if owner != trial else ""
        raise EvalError(f"{where} has no recorded checkpoint{reused}; status {row.status}")
    kinds = sorted({a.kind for a in artifacts})
    if len(kinds) > 1:
        raise EvalError(f"{where} has checkpoints for several tasks ({', '.join(kinds)}); "
                        "lm-eval needs a single language model, trained on a corpus")
    artifact = artifacts[-1]
    step = Path(artifact.path)
    weights = step / MODEL_FILE
    if not weights.is_file():
        raise EvalError(f"{where}: recorded checkpoint {step} is missing")
    if sha256_file(weights) != artifact.sha256:
        raise EvalError(f"{where}: {weights} changed since it was recorded "
                        f"(sha256 no longer {artifact.sha256[:12]}...)")
    return ModelSource(arch=arch, checkpoint=step, study=study, trial=trial,
                       storage_url=storage_url, task=task, task_fingerprint=fingerprint)


def top_trials(storage_url: str, study: str, k: int) -> list[int]:
    """The ``k`` best complete trials: by value, or the Pareto front by the first objective."""
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    from hybridlab.search.storage import engine_kwargs

    if k < 1:
        raise EvalError(f"--top must be at least 1, got {k}")
    _check_database(storage_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = RDBStorage(storage_url, engine_kwargs=engine_kwargs(storage_url))
    try:
        loaded = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise EvalError(f"storage {storage_url}: no study {study!r} "
                        f"(studies: {', '.join(sorted(names)) or 'none'})") from None
    complete = loaded.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise EvalError(f"study {study!r} has no complete trials yet")
    maximize = loaded.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    pool = loaded.best_trials if len(loaded.directions) > 1 else complete
    ranked = sorted(pool, key=lambda t: (-t.values[0] if maximize else t.values[0], t.number))
    return [t.number for t in ranked[:k]]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device asked for, CUDA by default where there is one; never a silent fallback."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise EvalError(f"device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device {device!r}: CUDA is not available here; use device cpu")
    return resolved


def load_model(source: ModelSource, *, device: str | torch.device | None = None) -> HybridLM:
    """Build the architecture, load and verify the weights, move to ``device``, eval mode."""
    target = resolve_device(device)
    model = HybridLM(source.arch)
    load_checkpoint(source.checkpoint, model)
    log.info("loaded %s", source.describe())
    return model.to(target).eval()
