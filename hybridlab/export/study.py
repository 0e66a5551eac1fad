"""Pick trials from a study database and export them with their verified trained weights.

The architecture comes from the trial's ``Candidate.arch``; the weights from the checkpoint
``Artifact`` of the trial that trained them (for a reused genome, ``Candidate.reused_from``),
checked against the database's sha256 and the checkpoint's own hashes before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState
from safetensors.torch import load_model
from sqlalchemy.engine import Engine

from hybridlab.checkpoint import MODEL_FILE, CheckpointError, verify_checkpoint
from hybridlab.config import ArchConfig, ConfigError
from hybridlab.export.card import EvalRow, Objective, Provenance
from hybridlab.export.common import ExportError, atomic_folder, write_json
from hybridlab.export.writer import ExportResult, write_export
from hybridlab.files import sha256_file
from hybridlab.model import HybridLM
from hybridlab.search.status import resolve_study
from hybridlab.search.storage import Artifact, Candidate, Evaluation, make_engine, session_scope

Selection = Literal["best", "pareto"] | int
CHECKPOINT_KIND = "checkpoint:"
SELECTION_FILE = "selection.json"
EXPORTABLE = ("trained", "reused")


@dataclass(frozen=True, kw_only=True)
class StudyExport:
    """The outcome of ``export_study``: what was chosen, and each export written."""

    out: Path
    description: str
    exports: tuple[ExportResult, ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class _Resolved:
    """A chosen trial whose weights passed every check, ready to be built and written."""

    trial: FrozenTrial
    arch: ArchConfig
    weights: Path
    weights_trial: int
    provenance: Provenance

    def build(self) -> HybridLM:
        model = HybridLM(self.arch)
        missing, unexpected = load_model(model, str(self.weights), strict=False)
        if missing or unexpected:
            raise ExportError(f"{self.weights} does not fit trial {self.trial.number}'s "
                              f"architecture (missing {sorted(missing)[:5]}, unexpected "
                              f"{sorted(unexpected)[:5]})")
        return model.eval()


def _select(study: optuna.Study, selection: Selection) -> tuple[list[FrozenTrial], str]:
    """The chosen trials and a sentence saying how they were chosen."""
    names = study.user_attrs.get("objectives", [f"value{i}" for i in
                                                range(len(study.directions))])
    if isinstance(selection, int):
        trials = study.get_trials(deepcopy=False)
        found = [t for t in trials if t.number == selection]
        if not found:
            raise ExportError(f"study {study.study_name!r} has no trial {selection} "
                              f"(trials 0..{len(trials) - 1})")
        return found, f"trial {selection}"
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ExportError(f"study {study.study_name!r} has no completed trial to export")
    objectives = ", ".join(f"{d.name.lower()} {n}" for n, d in
                           zip(names, study.directions, strict=False))
    if selection == "best" and len(study.directions) == 1:
        best = study.best_trial
        return [best], f"best trial {best.number} ({objectives} = {best.value:.6g})"
    pareto = sorted(study.best_trials, key=lambda t: t.number)
    numbers = ", ".join(str(t.number) for t in pareto)
    if selection == "best":
        return pareto, (f"--best on a study with {len(study.directions)} objectives "
                        f"({objectives}) exports every Pareto-optimal trial: {numbers}")
    return pareto, f"Pareto-optimal trials ({objectives}): {numbers}"


def _candidate(engine: Engine, study: str, trial: int) -> Candidate | None:
    with session_scope(engine) as session:
        return session.scalars(sa.select(Candidate).where(
            Candidate.study == study, Candidate.trial == trial)).first()


def _checkpoint(engine: Engine, study: str, trial: int, task: str | None) -> Artifact:
    """The newest checkpoint artifact of ``trial`` (of ``task``, for a suite)."""
    with session_scope(engine) as session:
        rows = session.scalars(sa.select(Artifact).where(
            Artifact.study == study, Artifact.trial == trial,
            Artifact.kind.startswith(CHECKPOINT_KIND)).order_by(Artifact.id)).all()
    latest = {row.kind.removeprefix(CHECKPOINT_KIND): row for row in rows}
    if not latest:
        raise ExportError(f"trial {trial} has no recorded checkpoint, so no weights to export")
    if task is not None:
        if task not in latest:
            raise ExportError(f"trial {trial} has no checkpoint for task {task!r} "
                              f"(it has {sorted(latest)})")
        return latest[task]
    if len(latest) > 1:
        raise ExportError(f"trial {trial} has one checkpoint per task {sorted(latest)}; "
                          "choose one with --task")
    return next(iter(latest.values()))


def _resolve(
    engine: Engine, study: optuna.Study, trial: FrozenTrial, *, task: str | None, storage: str
) -> _Resolved:
    """The trial's architecture and verified trained weights, and where they came from."""
    name = study.study_name
    cand = _candidate(engine, name, trial.number)
    if cand is None:
        raise ExportError(f"trial {trial.number} ({trial.state.name.lower()}) has no "
                          "hybridlab record: it ended before an architecture was sampled")
    if cand.status not in EXPORTABLE or cand.arch is None:
        reason = f" ({cand.reason})" if cand.reason else ""
        raise ExportError(f"trial {trial.number} was {cand.status}{reason}: only trained (or "
                          "reused) candidates have finished weights to export")
    source = cand
    if cand.status == "reused":
        if cand.reused_from is None:
            raise ExportError(f"trial {trial.number} is marked reused but names no original")
        source = _candidate(engine, name, cand.reused_from)
        if source is None or source.status != "trained":
            raise ExportError(f"trial {trial.number} reuses trial {cand.reused_from}, which "
                              "has no trained weights")
        if source.genome_hash != cand.genome_hash:
            raise ExportError(f"trial {trial.number} reuses trial {cand.reused_from}, but their "
                              "genome hashes differ")
    artifact = _checkpoint(engine, name, source.trial, task)
    path = Path(artifact.path)
    where = f"trial {source.trial}'s checkpoint {path}"
    if not (path / MODEL_FILE).is_file():
        raise ExportError(f"{where} is missing (moved or deleted?)")
    actual = sha256_file(path / MODEL_FILE)
    if actual != artifact.sha256:
        raise ExportError(f"{where}: {MODEL_FILE} has sha256 {actual[:12]}... but the study "
                          f"database recorded {artifact.sha256[:12]}...; it was modified after "
                          "training, refusing to export it")
    try:
        meta = verify_checkpoint(path)
        arch = ArchConfig.from_dict(cand.arch, source=f"trial {trial.number} arch")
    except (CheckpointError, ConfigError) as err:
        raise ExportError(f"trial {trial.number}: {err}") from None

    names = study.user_attrs.get("objectives", [])
    optimized = tuple(
        Objective(metric=n, direction=d.name.lower(), value=v)
        for n, d, v in zip(names, study.directions, trial.values or [], strict=False)
    )
    with session_scope(engine) as session:
        evals = session.scalars(sa.select(Evaluation).where(
            Evaluation.study == name, Evaluation.trial == source.trial)
            .order_by(Evaluation.id)).all()
    provenance = Provenance(
        study=name, trial=trial.number, weights_trial=source.trial,
        storage=sa.engine.make_url(storage).render_as_string(hide_password=True),
        status=cand.status, optimized=optimized, objectives=dict(cand.objectives or {}),
        evaluations=tuple(EvalRow(task=e.task, metric=e.metric, value=e.value, stderr=e.stderr,
                                  harness=e.harness) for e in evals),
        task=cand.task, task_fingerprint=cand.task_fingerprint, corpus_hash=cand.corpus_hash,
        code_version=source.code_version, checkpoint=str(path),
        checkpoint_sha256=artifact.sha256, checkpoint_step=meta.get("step"),
        state_context=cand.state_context,
    )
    return _Resolved(trial=trial, arch=arch, weights=path / MODEL_FILE,
                     weights_trial=source.trial, provenance=provenance)


def export_study(
    study: str | None,
    *,
    selection: Selection,
    fmt: str,
    out: str | Path,
    storage: str | None = None,
    lossy: bool = False,
    task: str | None = None,
    runs_dir: str | Path = "runs",
) -> StudyExport:
    """Export the chosen trials of a study in ``fmt`` to ``out``, all or nothing.

    ``selection``: a trial number; "best" (single objective: the best trial; several objectives:
    every Pareto-optimal trial); or "pareto". One trial is written to ``out`` itself (except for
    "pareto"); several go to ``out/trial_NNNN/`` with a ``selection.json`` listing them. Trials that
    reuse the weights of another selected trial are exported once.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, url = resolve_study(study, storage, runs_dir)
    loaded = optuna.load_study(study_name=name, storage=url)
    trials, description = _select(loaded, selection)
    engine = make_engine(url)
    try:
        skipped: list[str] = []
        chosen: list[_Resolved] = []
        weights_of: dict[int, int] = {}
        # Every chosen trial is checked before anything is written.
        for trial in trials:
            item = _resolve(engine, loaded, trial, task=task, storage=url)
            if item.weights_trial in weights_of:
                skipped.append(f"trial {trial.number}: the same weights as trial "
                               f"{weights_of[item.weights_trial]} (trained by trial "
                               f"{item.weights_trial}), exported once")
                continue
            weights_of[item.weights_trial] = trial.number
            chosen.append(item)
    finally:
        engine.dispose()

    out = Path(out)
    results: list[ExportResult] = []
    with atomic_folder(out) as tmp:
        if len(chosen) == 1 and selection != "pareto":
            results.append(write_export(chosen[0].build(), fmt, tmp, lossy=lossy,
                                        provenance=chosen[0].provenance))
        else:
            for item in chosen:
                sub = tmp / f"trial_{item.trial.number:04d}"
                sub.mkdir()
                results.append(write_export(item.build(), fmt, sub, lossy=lossy,
                                            provenance=item.provenance))
            write_json(tmp / SELECTION_FILE, {
                "study": name, "selection": description, "format": fmt, "skipped": skipped,
                "trials": [{"trial": i.trial.number, "folder": f"trial_{i.trial.number:04d}",
                            "values": i.trial.values, "pattern": i.arch.pattern}
                           for i in chosen],
            })
    results = [_moved(r, tmp, out) for r in results]
    return StudyExport(out=out, description=description, exports=tuple(results),
                       skipped=tuple(skipped))


def _moved(result: ExportResult, tmp: Path, out: Path) -> ExportResult:
    """The result with its folder under ``out`` instead of the temporary folder."""
    return replace(result, folder=out / result.folder.relative_to(tmp))
