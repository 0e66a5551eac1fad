"""A text table of a study's trials, read from the database alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hybridlab.store import NOTED, Candidate, load_study, open_engine, resolve_study, session_scope
from hybridlab.units import format_bytes, format_count


def _cell(n: float | None, fmt: Callable[[float], str]) -> str:
    return "-" if n is None else fmt(n)


def study_table(study: str | None, storage: str | None, *, runs_dir: str | Path = "runs") -> str:
    name, url = resolve_study(study, storage, runs_dir)
    loaded = load_study(name, url)
    objectives = loaded.user_attrs.get("objectives", ["value"])
    with open_engine(url) as engine, session_scope(engine) as session:
        candidates = Candidate.of_study(session, name)
    header = ["#", "state", "pattern", "params", "state@L", "tok/s", *objectives, "note"]
    lines = [header]
    for t in loaded.get_trials(deepcopy=False):
        c = candidates.get(t.number)
        values = [f"{v:.4g}" for v in t.values] if t.values else ["-"] * len(objectives)
        note = ""
        if c is not None and c.status in NOTED:
            note = f"{c.status}: {c.reason}" if c.reason else c.status
        if "failed_trial" in t.system_attrs:
            note = (note + f" retry of #{t.system_attrs['failed_trial']}").strip()
        lines.append([
            str(t.number), t.state.name.lower(),
            (c.pattern if c and c.pattern else t.user_attrs.get("pattern", "-")),
            _cell(c.params if c else None, format_count),
            _cell(c.state_bytes if c else None, format_bytes),
            _cell(c.tokens_per_second if c else None, format_count), *values, note[:60],
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [f"study {name} ({url}): {len(lines) - 1} trials"]
    text += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in lines]
    return "\n".join(text)
