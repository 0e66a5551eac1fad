"""A text table of a study's trials, read from the database alone; for a study with promotion
rungs, a table of its promoted runs per rung and how their ranking compares with the proxy's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hybridlab.store import (
    NOTED,
    SEED_ATTR,
    Candidate,
    Promotion,
    PromotionRole,
    load_study,
    open_engine,
    resolve_study,
    session_scope,
)
from hybridlab.store.validation import RungValidation, study_validation
from hybridlab.units import format_bytes, format_count


def _cell(n: float | None, fmt: Callable[[float], str]) -> str:
    return "-" if n is None else fmt(n)


def _value(n: float | None) -> str:
    return _cell(n, lambda v: f"{v:.4g}")


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows as left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def study_table(study: str | None, storage: str | None, *, runs_dir: str | Path = "runs") -> str:
    name, url = resolve_study(study, storage, runs_dir)
    loaded = load_study(name, url)
    # A rung study names its metric through Optuna (set_metric_names) rather than user attrs.
    objectives = loaded.user_attrs.get("objectives") or loaded.metric_names or ["value"]
    with open_engine(url) as engine:
        with session_scope(engine) as session:
            candidates = Candidate.of_study(session, name)
            promoted_as = _promoted_as(session, name)
        rungs = study_validation(engine, name)
    header = ["#", "state", "pattern", "params", "state@L", "tok/s", *objectives, "note"]
    lines = [header]
    for t in loaded.get_trials(deepcopy=False):
        c = candidates.get(t.number)
        values = [f"{v:.4g}" for v in t.values] if t.values else ["-"] * len(objectives)
        note = promoted_as.get(t.number, "")
        if c is not None and c.status in NOTED:
            note = f"{c.status}: {c.reason}" if c.reason else c.status
        if SEED_ATTR in t.user_attrs:
            note = (f"seed {t.user_attrs[SEED_ATTR]} " + note).strip()
        if "failed_trial" in t.system_attrs:
            note = (note + f" retry of #{t.system_attrs['failed_trial']}").strip()
        lines.append([
            str(t.number), t.state.name.lower(),
            (c.pattern if c and c.pattern else t.user_attrs.get("pattern", "-")),
            _cell(c.params if c else None, format_count),
            _cell(c.state_bytes if c else None, format_bytes),
            _cell(c.tokens_per_second if c else None, format_count), *values, note[:60],
        ])
    text = [f"study {name} ({url}): {len(lines) - 1} trials", *_columns(lines)]
    for rung in rungs:
        text += ["", *_rung_table(rung)]
    return "\n".join(text)


def _promoted_as(session: Session, run_study: str) -> dict[int, str]:
    """For a rung study: what each of its trials was promoted from, by trial number (a baseline
    that comes out as a candidate's architecture shares that candidate's run)."""
    if not sa.inspect(session.connection()).has_table(Promotion.__tablename__):
        return {}
    rows = session.scalars(sa.select(Promotion).where(Promotion.run_study == run_study,
                                                      Promotion.run_trial.is_not(None))).all()
    sources: dict[int, list[str]] = {}
    for row in sorted(rows, key=lambda r: (r.role != PromotionRole.CANDIDATE.value, r.key)):
        sources.setdefault(row.run_trial, []).append(
            f"promoted #{row.source_trial} of {row.study}"
            if row.role == PromotionRole.CANDIDATE.value else f"{row.role} baseline of {row.study}")
    return {trial: "; ".join(notes) for trial, notes in sources.items()}


def _rung_table(rung: RungValidation) -> list[str]:
    """The rung's promoted runs (sources, sizes, both values, where each trained), then its
    correlation summary."""
    rows = [["role", "source", "pattern", "params", "proxy", "promoted", "status", "trial",
             "workers", "time", "note"]]
    for run in rung.runs:
        notes = [] if run.trained or not run.reason else [run.reason[:60]]
        if run.is_candidate and run.source_trial == rung.proxy_winner:
            notes.append("proxy winner")
        rows.append([
            run.role, "-" if run.source_trial is None else f"#{run.source_trial}", run.pattern,
            f"{format_count(run.source_params)} -> {format_count(run.params)}",
            _value(run.proxy_value), _value(run.value), run.status,
            "-" if run.run_trial is None else f"#{run.run_trial}", str(run.workers),
            _cell(run.seconds, lambda s: f"{s:.0f} s"),
            "; ".join(notes),
        ])
    heading = (f"promoted runs of rung {rung.rung} ({rung.target}, {rung.strategy}): "
               f"{rung.metric} at proxy scale and promoted, params source -> promoted, trials "
               f"of study {rung.run_study}")
    return [heading, *_columns(rows), rung.summary()]
