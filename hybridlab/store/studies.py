"""Study-level lookups over Optuna's tables and hybridlab's: which study, trials and weights.

Best-trial selection lives here once: search progress, ``hybridlab eval --top`` and ``hybridlab
export --best/--pareto`` all rank trials through :func:`best_trials` and :func:`top_trials`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from hybridlab.checkpoint import MODEL_FILE
from hybridlab.files import sha256_file
from hybridlab.store.engine import (
    StorageError,
    default_sqlite_url,
    display_url,
    engine_kwargs,
    require_database,
    session_scope,
)
from hybridlab.store.models import WITH_WEIGHTS, Artifact, Candidate, CandidateStatus

# User attributes of an enqueued seed trial (``hybridlab.search.seeds``): the seed's name, the
# architecture to train instead of a sampled one, where it came from and how it was sized. The
# search writes them; status and the dashboard read them.
SEED_ATTR = "seed"
SEED_ARCH_ATTR = "seed_arch"
SEED_SOURCE_ATTR = "seed_source"
SEED_RULE_ATTR = "seed_rule"

# A promotion rung trains in its own study beside the proxy study: "<study>.rung<k>".
_RUNG_STUDY = re.compile(r"^(?P<study>.+)\.rung(?P<rung>[1-9][0-9]*)$")


def rung_study_name(study: str, rung: int) -> str:
    """The study that holds the promoted runs of ``study``'s rung ``rung`` (1-based)."""
    return f"{study}.rung{rung}"


def is_rung_study(name: str) -> bool:
    return _RUNG_STUDY.match(name) is not None


def home_study(name: str) -> str:
    """The study whose default database holds ``name``: a rung study lives in its proxy
    study's ``runs/<study>.db``; any other study in its own."""
    match = _RUNG_STUDY.match(name)
    return match["study"] if match else name


def resolve_study(study: str | None, storage: str | None, runs_dir: str | Path) -> tuple[str, str]:
    """(study name, storage URL) for a command that reads an existing study.

    Without ``--storage`` the database is ``runs/<study>.db``; without ``--study`` either, it is
    the only study database under ``runs_dir``. A missing SQLite file is refused, not created.
    "The only study" does not count promotion rungs' studies (``rung_study_name``).
    """
    if storage is None:
        runs = Path(runs_dir).resolve()
        if study is None:
            found = sorted(runs.glob("*.db")) if runs.is_dir() else []
            if len(found) != 1:
                listed = ", ".join(p.stem for p in found) or "none"
                raise StorageError(f"{len(found)} study databases in {runs} ({listed}); "
                                   "choose one with --study NAME or --storage URL")
            storage = default_sqlite_url(found[0].stem, runs)
        else:
            storage = default_sqlite_url(home_study(study), runs)
    require_database(storage)
    names = study_names(storage)
    if study is None:
        searched = [name for name in names if not is_rung_study(name)]
        if len(searched) != 1:
            raise StorageError(f"{display_url(storage)} holds studies {names}; choose one "
                               f"with --storage {display_url(storage)} --study NAME")
        study = searched[0]
    if study not in names:
        raise StorageError(f"no study {study!r} in {display_url(storage)} (studies: {names})")
    return study, storage


def optuna_storage(url: str) -> RDBStorage:
    """Optuna's storage for reading an existing study (tables are not created). Readers fail
    fast on an unreachable database; only the search rides out outages (``RetryingRDBStorage``)."""
    return RDBStorage(url, engine_kwargs=engine_kwargs(url), skip_table_creation=True)


def study_names(url: str) -> list[str]:
    try:
        return sorted(s.study_name for s in optuna.get_all_study_summaries(optuna_storage(url)))
    except sa.exc.DBAPIError as err:
        raise StorageError(f"cannot read {display_url(url)}: "
                           f"{str(err.orig).splitlines()[0]}") from None


def load_study(name: str, url: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=optuna_storage(url))
    except KeyError:
        raise StorageError(f"no study {name!r} in {display_url(url)} "
                           f"(studies: {study_names(url)})") from None


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best complete trial, or with several objectives every Pareto-optimal one (by number)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    return [study.best_trial]


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The ``k`` best complete trials by the first objective (among the Pareto front when the
    study has several objectives); ties go to the earlier trial."""
    if len(study.directions) > 1:
        pool = best_trials(study)
    else:
        pool = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(pool, key=lambda t: (sign * t.values[0], t.number))[:k]


@dataclass(frozen=True)
class TrialWeights:
    """A trial's candidate row and the verified checkpoints that hold its trained weights.

    ``trained`` is the candidate of the trial that trained them: the trial itself, or for a
    reused genome the trial it reused. ``checkpoints`` maps each task that trial trained on to
    its newest checkpoint.
    """

    candidate: Candidate
    trained: Candidate
    checkpoints: Mapping[str, Artifact]

    @property
    def owner(self) -> int:
        return self.trained.trial

    def checkpoint(self, task: str | None = None) -> Artifact:
        """The checkpoint of ``task``, or the only one; refuses a suite without ``task``."""
        where = f"trial {self.owner}"
        if task is not None:
            if task not in self.checkpoints:
                raise StorageError(f"{where} has no checkpoint for task {task!r} "
                                   f"(it has {sorted(self.checkpoints)})")
            return self.checkpoints[task]
        if len(self.checkpoints) > 1:
            raise StorageError(f"{where} has one checkpoint per task "
                               f"{sorted(self.checkpoints)}; choose one task")
        return next(iter(self.checkpoints.values()))


def trial_weights(engine: Engine, study: str, trial: int) -> TrialWeights:
    """Look up who trained a trial's weights and check each recorded checkpoint on disk.

    Raises StorageError naming the trial when it has no candidate, no weights (rejected,
    pruned, failed), a reuse that points nowhere, or a checkpoint that is missing or was
    modified after it was recorded (sha256 differs).
    """
    with session_scope(engine) as session:
        cand = Candidate.get(session, study, trial)
        if cand is None:
            trials = sorted(Candidate.of_study(session, study))
            if not trials:
                raise StorageError(f"no study {study!r} with hybridlab records "
                                   f"(studies: {', '.join(Candidate.studies(session)) or 'none'})")
            raise StorageError(f"study {study!r} has no trial {trial} with an architecture "
                               f"(trials {trials[0]}..{trials[-1]}): it does not exist, or it "
                               "ended before an architecture was sampled")
        where = f"trial {trial}"
        if cand.status not in WITH_WEIGHTS or cand.arch is None:
            reason = f" ({cand.reason})" if cand.reason else ""
            raise StorageError(f"{where} was {cand.status}{reason}: only trained (or reused) "
                               "candidates have trained weights")
        owner = cand
        if cand.status == CandidateStatus.REUSED:
            original = (Candidate.get(session, study, cand.reused_from)
                        if cand.reused_from is not None else None)
            if original is None or original.status != CandidateStatus.TRAINED:
                raise StorageError(f"{where} reuses trial {cand.reused_from}, which has no "
                                   "trained weights")
            if original.genome_hash != cand.genome_hash:
                raise StorageError(f"{where} reuses trial {cand.reused_from}, but their genome "
                                   "hashes differ")
            owner = original
        checkpoints = Artifact.checkpoints(session, study, owner.trial)
    if not checkpoints:
        reused = f" (it reused trial {owner.trial}'s genome)" if owner is not cand else ""
        raise StorageError(f"{where} has no recorded checkpoint{reused}")
    for artifact in checkpoints.values():
        weights = Path(artifact.path) / MODEL_FILE
        label = f"trial {owner.trial}'s checkpoint {artifact.path}"
        if not weights.is_file():
            raise StorageError(f"{label} is missing (moved or deleted?)")
        actual = sha256_file(weights)
        if actual != artifact.sha256:
            raise StorageError(f"{label}: {MODEL_FILE} has sha256 {actual[:12]}... but the "
                               f"study database recorded {artifact.sha256[:12]}...; it was "
                               "modified after training")
    return TrialWeights(candidate=cand, trained=owner, checkpoints=checkpoints)


def set_trial_user_attrs(session: Session, study: str, trial: int,
                         attrs: Mapping[str, Any]) -> None:
    """Set user attributes on a trial, finished or not, within the caller's transaction.

    Optuna refuses to change a finished trial through its API, and results that arrive after a
    trial finished (lm-eval scores) belong on it, so this writes Optuna's
    ``trial_user_attributes`` table directly.
    """
    meta = sa.MetaData()
    try:
        tables = {name: sa.Table(name, meta, autoload_with=session.connection())
                  for name in ("studies", "trials", "trial_user_attributes")}
    except sa.exc.NoSuchTableError as err:
        raise StorageError(f"no Optuna table {err} in this database") from None
    studies, trials, user_attrs = (tables["studies"], tables["trials"],
                                   tables["trial_user_attributes"])
    trial_id = session.execute(
        sa.select(trials.c.trial_id)
        .join(studies, trials.c.study_id == studies.c.study_id)
        .where(studies.c.study_name == study, trials.c.number == trial)
    ).scalar_one_or_none()
    if trial_id is None:
        raise StorageError(f"study {study!r} has no Optuna trial {trial}")
    session.execute(sa.delete(user_attrs).where(user_attrs.c.trial_id == trial_id,
                                                user_attrs.c.key.in_(list(attrs))))
    if attrs:
        session.execute(sa.insert(user_attrs), [
            {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
            for key, value in attrs.items()])
