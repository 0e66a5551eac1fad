"""Pick trials from a study database and export them with their verified trained weights, or
extrapolated to a larger size as untrained configs.

The architecture comes from the trial's ``Candidate.arch``; the weights from the checkpoint
``Artifact`` of the trial that trained them (for a reused genome, ``Candidate.reused_from``),
checked against the database's sha256 and the checkpoint's own hashes before anything is written.
``export_scaled`` needs no weights: it extrapolates the architecture (``hybridlab.scale``) and
writes the config alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from safetensors.torch import load_model
from sqlalchemy.engine import Engine

from hybridlab.checkpoint import MODEL_FILE, CheckpointError, verify_checkpoint
from hybridlab.config import ArchConfig, ConfigError
from hybridlab.data.tokenizer import Tokenizer, tokenizer_of
from hybridlab.export.card import EvalRow, OptimizedValue, Provenance
from hybridlab.export.common import ExportError, atomic_folder, write_json
from hybridlab.export.writer import ExportResult, write_config_export, write_export
from hybridlab.model import HybridLM
from hybridlab.scale import ScaleError, Strategy, Target, scale
from hybridlab.store import (
    Candidate,
    Evaluation,
    StorageError,
    best_trials,
    display_url,
    load_study,
    open_engine,
    resolve_study,
    session_scope,
    trial_weights,
)

Selection = Literal["best", "pareto"] | int
SELECTION_FILE = "selection.json"


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
    tokenizer: Tokenizer | None
    notes: tuple[str, ...]

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
    chosen = best_trials(study)
    if selection == "best" and len(study.directions) == 1:
        best = chosen[0]
        return [best], f"best trial {best.number} ({objectives} = {best.value:.6g})"
    numbers = ", ".join(str(t.number) for t in chosen)
    if selection == "best":
        return chosen, (f"--best on a study with {len(study.directions)} objectives "
                        f"({objectives}) exports every Pareto-optimal trial: {numbers}")
    return chosen, f"Pareto-optimal trials ({objectives}): {numbers}"


def _resolve(
    engine: Engine, study: optuna.Study, trial: FrozenTrial, *, task: str | None, storage: str
) -> _Resolved:
    """The trial's architecture and verified trained weights, and where they came from."""
    name = study.study_name
    try:
        weights = trial_weights(engine, name, trial.number)
        artifact = weights.checkpoint(task)
    except StorageError as err:
        raise ExportError(str(err)) from None
    cand = weights.candidate
    path = Path(artifact.path)
    try:
        meta = verify_checkpoint(path)
        arch = ArchConfig.from_dict(cand.arch, source=f"trial {trial.number} arch")
    except (CheckpointError, ConfigError) as err:
        raise ExportError(f"trial {trial.number}: {err}") from None

    names = study.user_attrs.get("objectives", [])
    optimized = tuple(
        OptimizedValue(metric=n, direction=d.name.lower(), value=v)
        for n, d, v in zip(names, study.directions, trial.values or [], strict=False)
    )
    with session_scope(engine) as session:
        evals = Evaluation.of_trial(session, name, weights.owner)
    provenance = Provenance(
        study=name, trial=trial.number, weights_trial=weights.owner,
        storage=display_url(storage),
        status=cand.status, optimized=optimized, objectives=dict(cand.objectives or {}),
        evaluations=tuple(EvalRow(task=e.task, metric=e.metric, value=e.value, stderr=e.stderr,
                                  harness=e.harness) for e in evals),
        task=cand.task, task_fingerprint=cand.task_fingerprint, corpus_hash=cand.corpus_hash,
        code_version=weights.trained.code_version, checkpoint=str(path),
        checkpoint_sha256=artifact.sha256, checkpoint_step=meta.get("step"),
        state_context=cand.state_context,
    )
    tokenizer, note = tokenizer_of(cand.task_fingerprint, _tokenizer_option(study))
    return _Resolved(trial=trial, arch=arch, weights=path / MODEL_FILE,
                     weights_trial=weights.owner, provenance=provenance, tokenizer=tokenizer,
                     notes=() if note is None else (note,))


def _tokenizer_option(study: optuna.Study) -> str | None:
    """The space's ``task.options.tokenizer`` (a BPE file), which the fingerprint only hashes."""
    try:
        space = yaml.safe_load(study.user_attrs.get("space") or "") or {}
        return space["task"]["options"]["tokenizer"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None


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
    name, url = resolve_study(study, storage, runs_dir)
    loaded = load_study(name, url)
    trials, description = _select(loaded, selection)
    with open_engine(url) as engine:
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

    entries = [_Entry(trial=item.trial, pattern=item.arch.pattern,
                      write=lambda folder, item=item: write_export(
                          item.build(), fmt, folder, lossy=lossy, provenance=item.provenance,
                          tokenizer=item.tokenizer, notes=item.notes))
               for item in chosen]
    return _write_selection(Path(out), entries, own_folders=selection == "pareto", index={
        "study": name, "selection": description, "format": fmt, "skipped": skipped})


@dataclass(frozen=True)
class _Entry:
    """One export to write: its trial, its pattern, and the function that writes its folder."""

    trial: FrozenTrial
    pattern: str
    write: Callable[[Path], ExportResult]


def _write_selection(
    out: Path, entries: list[_Entry], *, own_folders: bool, index: dict[str, Any],
) -> StudyExport:
    """Write one entry to ``out`` itself (unless ``own_folders``), or each to
    ``out/trial_NNNN/`` with a ``selection.json`` listing them (``index`` plus the trials)."""
    results: list[ExportResult] = []
    with atomic_folder(out) as tmp:
        if len(entries) == 1 and not own_folders:
            results.append(entries[0].write(tmp))
        else:
            for entry in entries:
                sub = tmp / f"trial_{entry.trial.number:04d}"
                sub.mkdir()
                results.append(entry.write(sub))
            write_json(tmp / SELECTION_FILE, {**index, "trials": [
                {"trial": e.trial.number, "folder": f"trial_{e.trial.number:04d}",
                 "values": e.trial.values, "pattern": e.pattern} for e in entries]})
    results = [_moved(r, tmp, out) for r in results]
    return StudyExport(out=out, description=index["selection"], exports=tuple(results),
                       skipped=tuple(index["skipped"]))


def _moved(result: ExportResult, tmp: Path, out: Path) -> ExportResult:
    """The result with its folder under ``out`` instead of the temporary folder."""
    return replace(result, folder=out / result.folder.relative_to(tmp))


@dataclass(frozen=True)
class TrialArch:
    """A chosen trial and the architecture its candidate row records."""

    trial: FrozenTrial
    arch: ArchConfig
    status: str


@dataclass(frozen=True)
class ArchSelection:
    """The outcome of ``select_archs``: which study, how the trials were chosen, their archs."""

    study: str
    storage: str
    description: str
    objectives: tuple[str, ...]
    trials: tuple[TrialArch, ...]


def select_archs(
    study: str | None, *, selection: Selection, storage: str | None = None,
    runs_dir: str | Path = "runs",
) -> ArchSelection:
    """The architectures of the chosen trials (as ``export_study`` chooses them), from
    ``Candidate.arch``; no weights are needed, so any trial whose architecture was sampled
    qualifies. Raises ExportError naming a trial without one."""
    name, url = resolve_study(study, storage, runs_dir)
    loaded = load_study(name, url)
    trials, description = _select(loaded, selection)
    chosen = []
    with open_engine(url) as engine, session_scope(engine) as session:
        for trial in trials:
            cand = Candidate.get(session, name, trial.number)
            if cand is None or cand.arch is None:
                raise ExportError(f"trial {trial.number} of study {name!r} has no recorded "
                                  "architecture (it ended before one was sampled)")
            try:
                arch = ArchConfig.from_dict(cand.arch, source=f"trial {trial.number} arch")
            except ConfigError as err:
                raise ExportError(str(err)) from None
            chosen.append(TrialArch(trial=trial, arch=arch, status=cand.status))
    names = tuple(loaded.user_attrs.get("objectives", [f"value{i}" for i in
                                                      range(len(loaded.directions))]))
    return ArchSelection(study=name, storage=url, description=description, objectives=names,
                         trials=tuple(chosen))


def export_scaled(
    study: str | None,
    *,
    selection: Selection,
    target: Target,
    fmt: str,
    out: str | Path,
    strategy: Strategy = "both",
    scale_d_state: bool = False,
    storage: str | None = None,
    lossy: bool = False,
    runs_dir: str | Path = "runs",
) -> StudyExport:
    """Export the chosen trials' architectures extrapolated to ``target``: configs only, no
    weights, labelled untrained in the model card and export.json; all or nothing.

    Every format takes a config without weights (hybridlab: arch.yaml; mamba_ssm and hf:
    config.json; megatron: its arguments), so none is refused for lacking them. Each
    extrapolation is done before anything is written; trials with the same architecture are
    exported once. Folders are laid out as ``export_study`` lays them out.
    """
    chosen = select_archs(study, selection=selection, storage=storage, runs_dir=runs_dir)
    skipped: list[str] = []
    first_of: dict[str, int] = {}
    entries = []
    for item in chosen.trials:
        number = item.trial.number
        genome = item.arch.canonical_hash()
        if genome in first_of:
            skipped.append(f"trial {number}: the same architecture as trial "
                           f"{first_of[genome]}, exported once")
            continue
        first_of[genome] = number
        try:
            scaled = scale(item.arch, target, strategy=strategy, scale_d_state=scale_d_state)
        except ScaleError as err:
            raise ScaleError(err.field, f"trial {number}: {err.message}") from None
        values = ", ".join(f"{n} = {v:.6g}" for n, v in
                           zip(chosen.objectives, item.trial.values or [], strict=False))
        label = (f"extrapolated from trial {number} of study `{chosen.study}` (pattern "
                 f"{item.arch.pattern}, {scaled.source_cost.params:,} parameters"
                 + (f"; proxy {values}" if values else "")
                 + f") by {strategy} to {target.describe()}; no weights")
        provenance = Provenance(study=chosen.study, trial=number,
                                storage=display_url(chosen.storage), status=item.status,
                                state_context=scaled.cost.context, untrained=label,
                                scale_report=scaled.report())
        entries.append(_Entry(trial=item.trial, pattern=scaled.config.pattern,
                              write=lambda folder, arch=scaled.config, prov=provenance:
                              write_config_export(arch, fmt, folder, lossy=lossy,
                                                  provenance=prov)))
    description = f"{chosen.description}, extrapolated by {strategy} to {target.describe()}"
    return _write_selection(Path(out), entries, own_folders=selection == "pareto", index={
        "study": chosen.study, "selection": description, "format": fmt, "skipped": skipped,
        "untrained": True})
