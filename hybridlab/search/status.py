"""A text table of a study's trials, read from the database alone."""

from __future__ import annotations

from pathlib import Path

import optuna
import sqlalchemy as sa

from hybridlab.search.storage import (
    Candidate,
    StorageError,
    default_sqlite_url,
    is_sqlite,
    make_engine,
    session_scope,
)


def resolve_study(study: str | None, storage: str | None, runs_dir: str | Path) -> tuple[str, str]:
    """(study name, storage URL); refuses a missing SQLite file instead of creating one."""
    if storage is None:
        if study is None:
            raise StorageError("give --study or --storage")
        storage = default_sqlite_url(study, Path(runs_dir).resolve())
    if is_sqlite(storage):
        database = sa.engine.make_url(storage).database
        if not database or not Path(database).is_file():
            raise StorageError(f"no study database at {storage}")
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if study is None:
        if len(names) != 1:
            raise StorageError(f"{storage} holds studies {names}; choose one with --study")
        study = names[0]
    if study not in names:
        raise StorageError(f"no study {study!r} in {storage} (studies: {names})")
    return study, storage


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def study_table(study: str | None, storage: str | None, *, runs_dir: str | Path = "runs") -> str:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, url = resolve_study(study, storage, runs_dir)
    loaded = optuna.load_study(study_name=name, storage=url)
    objectives = loaded.user_attrs.get("objectives", ["value"])
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            rows = session.scalars(sa.select(Candidate).where(Candidate.study == name)).all()
            candidates = {c.trial: c for c in rows}
    finally:
        engine.dispose()
    header = ["#", "state", "pattern", "params", "state@L", "tok/s", *objectives, "note"]
    lines = [header]
    for t in loaded.get_trials(deepcopy=False):
        c = candidates.get(t.number)
        values = [f"{v:.4g}" for v in t.values] if t.values else ["-"] * len(objectives)
        note = ""
        if c is not None and c.status in ("rejected", "reused", "failed", "pruned"):
            note = f"{c.status}: {c.reason}" if c.reason else c.status
        if "failed_trial" in t.system_attrs:
            note = (note + f" retry of #{t.system_attrs['failed_trial']}").strip()
        lines.append([
            str(t.number), t.state.name.lower(),
            (c.pattern if c and c.pattern else t.user_attrs.get("pattern", "-")),
            _size(c.params if c else None), _size(c.state_bytes if c else None),
            _size(c.tokens_per_second if c else None), *values, note[:60],
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [f"study {name} ({url}): {len(lines) - 1} trials"]
    text += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in lines]
    return "\n".join(text)
