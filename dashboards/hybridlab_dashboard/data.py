"""Read-only access to a study database, shaped into the JSON the dashboard's pages draw.

The dashboard runs beside a live search, so it never writes and never holds a transaction open:
SQLite is opened through a ``mode=ro`` URI (in WAL mode readers and the search's writers do not
block each other) and PostgreSQL sessions are read-only; every read is a short transaction. A
missing or empty database is a normal state that the pages report, not an error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shlex
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import Engine

from hybridlab.config import ArchConfig, ConfigError
from hybridlab.cost import cost_report
from hybridlab.layers import LAYER_TYPES, SYMBOLS
from hybridlab.metrics import METRICS, Direction, metric_names, registry_as_json
from hybridlab.store import (
    NOTED,
    SEED_ATTR,
    SEED_RULE_ATTR,
    SEED_SOURCE_ATTR,
    Candidate,
    CurvePoint,
    Evaluation,
    StorageError,
    default_sqlite_url,
    display_url,
    home_study,
    is_sqlite,
    readonly_engine_kwargs,
    readonly_url,
    resolve_study,
    sqlite_path,
)
from hybridlab.store.calibration import Verdict, calibration_runs, verdicts
from hybridlab.store.validation import RungValidation, study_validation
from hybridlab.units import UNIT_RULES


class UnknownStudy(LookupError):
    """The database holds no study of that name."""


class DatabaseUnavailable(RuntimeError):
    """The database is missing, empty or unreadable right now; the message says which."""


@dataclass(frozen=True)
class DatabaseState:
    state: Literal["ready", "missing", "empty", "error"]
    message: str


def resolve_storage(study: str | None, storage: str | None, runs_dir: str | Path) -> str:
    """The database URL the dashboard reads: ``--storage``, else ``runs/<study>.db``, else the
    only study database under ``runs_dir`` (the rule of ``hybridlab status``).

    ``runs/<study>.db`` may not exist yet: the page waits for the search to create it.
    """
    if storage is not None:
        try:
            url = sa.engine.make_url(storage)
        except sa.exc.ArgumentError as err:
            raise StorageError(f"storage URL {storage!r} is not a database URL: {err}") from None
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            raise StorageError(f"{storage!r} names no database file; the dashboard reads a file")
        return storage
    if study is None:
        return resolve_study(None, None, runs_dir)[1]
    return default_sqlite_url(home_study(study), Path(runs_dir).resolve())


def cost_axes() -> dict[str, Direction]:
    """Quality is plotted against every cost metric of the registry, each better one way."""
    return {name: METRICS[name].direction for name in metric_names("cost")}


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the points no other point dominates; equal points are all kept.

    Sorted lexicographically in the minimising orientation, a point can only be dominated by one
    before it, and then by one already on the front, so each point is checked against the front.
    """
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    keys = [tuple(s * v for s, v in zip(signs, p, strict=True)) for p in points]
    front: list[int] = []
    for i in sorted(range(len(keys)), key=keys.__getitem__):
        if not any(_dominates(keys[j], keys[i]) for j in front):
            front.append(i)
    return sorted(front)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


@functools.lru_cache(maxsize=4096)
def _layers_of(arch_json: str, context: int) -> tuple[dict[str, Any], ...]:
    config = ArchConfig.from_dict(json.loads(arch_json))
    report = cost_report(config, context)
    return tuple(
        {
            "type": spec.type,
            "symbol": spec.symbol,
            "width": spec.width(config.d_model),
            "d_state": getattr(spec, "d_state", None),
            "state_bytes": cost.state_bytes,
            "params": cost.params,
            "spec": spec.to_dict(),
        }
        for spec, cost in zip(config.layers, report.layers, strict=True)
    )


def layers(arch: dict[str, Any] | None, pattern: str | None, context: int | None) -> list[dict]:
    """One entry per layer: type, width, state size and cost at the study's state context.

    A stored genome this version cannot parse (written by another hybridlab) still shows its
    layer types from the pattern string, without sizes.
    """
    if arch is not None and context:
        try:
            return list(_layers_of(json.dumps(arch, sort_keys=True), context))
        except ConfigError:
            pass
    return [{"type": SYMBOLS[s].name, "symbol": s} for s in pattern or "" if s in SYMBOLS]


def layer_types() -> list[dict[str, Any]]:
    """The registry's layer types as the page draws them: name, symbol, label and colour."""
    return [{"type": t.name, "symbol": t.spec.symbol, "label": t.label, "colour": t.colour,
             "mixer": t.mixes_sequence} for t in LAYER_TYPES.values()]


def export_command(study: str, trial: int, *, database_args: Sequence[str] = ()) -> str:
    """The command line that exports one trial; ``database_args`` find the same database."""
    return shlex.join(["hybridlab", "export", "--study", study, "--trial", str(trial),
                       "--format", "hybridlab", "--out", f"runs/export/{study}/trial-{trial}",
                       *database_args])


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


class StudyDatabase:
    """One study database, opened read-only on first use and reopened if its file comes back."""

    def __init__(self, url: str, *, database_args: Sequence[str] = ()) -> None:
        """``database_args`` are the options (``--storage URL`` or ``--runs-dir DIR``) that the
        export command lines shown for each trial need to find this database."""
        self.url = url
        self.display_url = display_url(url)
        self._database_args = tuple(database_args)
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._storage: RDBStorage | None = None

    def close(self) -> None:
        with self._lock:
            if self._storage is not None:
                self._storage.engine.dispose()
            if self._engine is not None:
                self._engine.dispose()
            self._engine = self._storage = None

    def _connect(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = sa.create_engine(readonly_url(self.url),
                                                **readonly_engine_kwargs(self.url))
            return self._engine

    def state(self) -> DatabaseState:
        """Whether there is anything to show, and if not, a sentence that says why."""
        if is_sqlite(self.url) and not sqlite_path(self.url).is_file():
            # A search may create the file later; stale connections must not outlive it.
            self.close()
            return DatabaseState("missing", f"No study database at {sqlite_path(self.url)} yet. "
                                 "It appears when a search starts (hybridlab search SPACE "
                                 "--study NAME); this page picks it up by itself.")
        try:
            with self._connect().connect() as conn:
                if not sa.inspect(conn).has_table("studies"):
                    return DatabaseState("empty", f"The database {self.display_url} holds no "
                                         "Optuna study yet.")
                studies = conn.execute(sa.text("SELECT count(*) FROM studies")).scalar_one()
        except sa.exc.DBAPIError as err:
            return DatabaseState("error", f"Cannot read {self.display_url}: "
                                 f"{str(err.orig).splitlines()[0]}")
        if not studies:
            return DatabaseState("empty", f"The database {self.display_url} holds no study yet.")
        return DatabaseState("ready", f"Reading {self.display_url}")

    def optuna_storage(self) -> RDBStorage:
        """Optuna's storage over the read-only connection; made once the study tables exist."""
        state = self.state()
        if state.state != "ready":
            raise DatabaseUnavailable(state.message)
        with self._lock:
            if self._storage is None:
                try:
                    self._storage = RDBStorage(
                        readonly_url(self.url), engine_kwargs=readonly_engine_kwargs(self.url),
                        skip_table_creation=True)
                except (sa.exc.DBAPIError, RuntimeError) as err:
                    # The search may be midway through creating Optuna's tables.
                    raise DatabaseUnavailable(f"{self.display_url} is not readable yet: "
                                              f"{str(err).splitlines()[0]}") from None
            return self._storage

    def studies(self) -> list[dict[str, Any]]:
        storage = self.optuna_storage()
        return [
            {
                "name": s.study_name,
                "directions": [d.name.lower() for d in s.directions],
                "objectives": _objective_names(s.user_attrs, len(s.directions)),
            }
            for s in storage.get_all_studies()
        ]

    def snapshot(self, study: str) -> dict[str, Any]:
        """Everything the study's pages draw except learning curves (fetched per trial)."""
        storage = self.optuna_storage()
        try:
            study_id = storage.get_study_id_from_name(study)
        except KeyError:
            raise UnknownStudy(study) from None
        directions = [d.name.lower() for d in storage.get_study_directions(study_id)]
        names = _objective_names(storage.get_study_user_attrs(study_id), len(directions))
        trials = storage.get_all_trials(study_id, deepcopy=False)
        with self._connect().connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            candidates = {} if Candidate.__tablename__ not in tables else {
                row.trial: row for row in conn.execute(
                    sa.select(Candidate.__table__).where(Candidate.study == study))}
            # Counted so that the revision, and with it the page, moves as curves grow.
            curve_points = {} if CurvePoint.__tablename__ not in tables else dict(conn.execute(
                sa.select(CurvePoint.trial, sa.func.count()).where(CurvePoint.study == study)
                .group_by(CurvePoint.trial)).all())
            evaluations = [] if Evaluation.__tablename__ not in tables else [
                dict(row._mapping) for row in conn.execute(
                    sa.select(Evaluation.trial, Evaluation.task, Evaluation.metric,
                              Evaluation.value, Evaluation.stderr, Evaluation.harness)
                    .where(Evaluation.study == study)
                    .order_by(Evaluation.trial, Evaluation.task, Evaluation.metric))]
        rows = [self._trial(study, t, candidates.get(t.number), names) | {
            "curve_points": curve_points.get(t.number, 0)} for t in trials]
        objectives = [{"metric": n, "direction": d} for n, d in zip(names, directions, strict=True)]
        axes = cost_axes()
        quality = [o for o in objectives if o["metric"] not in axes] or objectives
        complete = [r for r in rows if r["state"] == "complete" and r["values"]]
        best = pareto_front([[r["values"][n] for n in names] for r in complete], directions)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        snapshot = {
            "study": study,
            "objectives": objectives,
            "quality_metrics": quality,
            "cost_axes": axes,
            "units": UNIT_RULES,
            # The layer registry's types, so the page names and colours every type it draws.
            "layer_types": layer_types(),
            # Names, kinds, directions, units and labels: the page lists no metric of its own.
            "metrics": registry_as_json(),
            "state_context": next((c.state_context for c in candidates.values()
                                   if c.state_context), None),
            "counts": counts,
            "best": [complete[i]["number"] for i in best],
            "fronts": {q["metric"]: _fronts(complete, q["metric"], q["direction"], axes)
                       for q in quality},
            "trials": rows,
            "evaluations": evaluations,
        }
        return _with_revision(snapshot)

    def _trial(self, study: str, t: FrozenTrial, c: Any, names: list[str]) -> dict[str, Any]:
        attrs = t.user_attrs
        pattern = c.pattern if c is not None and c.pattern else attrs.get("pattern")
        per_layer = layers(c.arch if c is not None else None, pattern,
                           c.state_context if c is not None else None)
        mixers = [layer for layer in per_layer
                  if layer["type"] in LAYER_TYPES and LAYER_TYPES[layer["type"]].mixes_sequence]
        values = (dict(zip(names, t.values, strict=True))
                  if t.state == TrialState.COMPLETE and t.values else {})

        def cost(key: str) -> float | None:
            # hl_candidate has a column per cost the search measures; trials written by other
            # versions may carry a cost as a user attribute instead.
            value = getattr(c, key, None) if c is not None else None
            return value if value is not None else attrs.get(key)

        note = attrs.get("rejected")
        if c is not None and c.status in NOTED:
            note = f"{c.status}: {c.reason}" if c.reason else c.status
        return {
            "number": t.number,
            "state": t.state.name.lower(),
            "status": c.status if c is not None else None,
            "note": note,
            "reused_from": c.reused_from if c is not None else attrs.get("reused_from"),
            # A published design the study enqueued (seed_architectures:), and how it was sized.
            "seed": ({"name": attrs[SEED_ATTR], "source": attrs.get(SEED_SOURCE_ATTR),
                      "rule": attrs.get(SEED_RULE_ATTR)} if SEED_ATTR in attrs else None),
            "values": values,
            "metrics": (c.objectives if c is not None and c.objectives else {}) | values,
            "pattern": pattern,
            "layers": per_layer,
            "depth": len(per_layer) or None,
            "attention_fraction": (sum(layer["type"] == "attention" for layer in mixers)
                                   / len(mixers)) if mixers else None,
            **{key: cost(key) for key in metric_names("cost")},
            "started": _iso(t.datetime_start),
            "completed": _iso(t.datetime_complete),
            "export_command": export_command(study, t.number,
                                             database_args=self._database_args),
        }

    def _ready(self) -> Engine:
        state = self.state()
        if state.state != "ready":
            raise DatabaseUnavailable(state.message)
        return self._connect()

    def promotion(self, study: str) -> dict[str, Any]:
        """The study's promotion rungs for the proxy vs promoted charts: each run's proxy and
        promoted values, the correlation and winners (``rungs`` is empty for a study with no
        promoted runs, or a database older than promotion). Its own revision: promoted runs
        land in the rung studies, so the study's snapshot does not change when they finish."""
        rungs = [_rung(v) for v in study_validation(self._ready(), study)]
        return _with_revision({"study": study, "rungs": rungs})

    def calibration(self, study: str) -> dict[str, Any]:
        """``hybridlab calibrate``'s results for the space named like the study, one table per
        budget: per task each reference's mean and spread, and the ordering's verdict (``budgets``
        is empty when the space was never calibrated). Its own revision, like promotion's."""
        runs = calibration_runs(self._ready(), study)
        scales = sorted({m.budget_scale for m in runs})
        budgets = [{"scale": scale, "tasks": [_verdict(v) for v in verdicts(
            m for m in runs if m.budget_scale == scale)]} for scale in scales]
        return _with_revision({"study": study, "budgets": budgets})

    def curves(self, study: str, trials: Iterable[int]) -> list[dict[str, Any]]:
        """Learning curves of the given trials: one series per (trial, split, metric)."""
        wanted = sorted(set(trials))
        engine = self._ready()
        with engine.connect() as conn:
            if not wanted or not sa.inspect(conn).has_table(CurvePoint.__tablename__):
                return []
            points = conn.execute(
                sa.select(CurvePoint.trial, CurvePoint.split, CurvePoint.metric,
                          CurvePoint.step, CurvePoint.value)
                .where(CurvePoint.study == study, CurvePoint.trial.in_(wanted))
                .order_by(CurvePoint.trial, CurvePoint.split, CurvePoint.metric, CurvePoint.step)
            ).all()
        series: dict[tuple[int, str, str], dict[str, Any]] = {}
        for trial, split, metric, step, value in points:
            entry = series.setdefault((trial, split, metric), {
                "trial": trial, "split": split, "metric": metric, "steps": [], "values": []})
            entry["steps"].append(step)
            entry["values"].append(value)
        return list(series.values())


def _with_revision(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with a short hash of its content, by which the page sees that it changed."""
    text = json.dumps(payload, sort_keys=True, default=str)
    payload["revision"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return payload


def _spreads(margin: float | None) -> str | None:
    # JSON has no infinity: a zero spread with a gap is written out.
    if margin is None:
        return None
    return f"{margin:.2f}" if math.isfinite(margin) else ("inf" if margin > 0 else "-inf")


def _verdict(v: Verdict) -> dict[str, Any]:
    return {
        "task": v.task, "metric": v.metric, "expectation": v.expectation,
        "held": v.held, "separated": v.separated, "margin": _spreads(v.margin),
        "ahead": {ref: _spreads(m) for ref, m in v.ahead.items()},
        "references": [{"reference": ref, **asdict(summary)}
                       for ref, summary in v.summaries.items()],
    }


def _rung(validation: RungValidation) -> dict[str, Any]:
    best = validation.best_baseline
    return {
        "rung": validation.rung,
        "metric": validation.metric,
        "direction": validation.direction,
        "target": validation.target,
        "strategy": validation.strategy,
        "run_study": validation.run_study,
        "heading": validation.heading(),
        "correlation": asdict(validation.correlation) | {
            "text": validation.correlation.describe()},
        "summary": validation.summary(),
        "proxy_winner": validation.proxy_winner,
        "promoted_winner": validation.promoted_winner,
        "winner_kept": validation.winner_kept,
        "best_baseline": best.role if best is not None else None,
        "beats_baselines": validation.beats_baselines,
        "runs": [asdict(run) | {"trained": run.trained} for run in validation.runs],
    }


def _objective_names(user_attrs: dict[str, Any], count: int) -> list[str]:
    """hybridlab records its objective metrics on the study; other studies get numbered names."""
    names = user_attrs.get("objectives")
    if isinstance(names, list) and len(names) == count:
        return [str(n) for n in names]
    return ["value"] if count == 1 else [f"value{i}" for i in range(count)]


def _fronts(complete: list[dict[str, Any]], metric: str, direction: str,
            axes: dict[str, Direction]) -> dict[str, list[int]]:
    """Per cost axis, the trials on the 2-D Pareto front of (quality, cost)."""
    fronts = {}
    for axis, axis_direction in axes.items():
        plotted = [r for r in complete if r.get(axis) is not None and metric in r["metrics"]]
        front = pareto_front([(r["metrics"][metric], r[axis]) for r in plotted],
                             (direction, axis_direction))
        fronts[axis] = [plotted[i]["number"] for i in front]
    return fronts
