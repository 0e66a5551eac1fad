"""Proxy calibration results: the stored runs of ``hybridlab calibrate`` and what they show.

Read from ``hl_calibration`` alone (no training), so the calibrate command and the dashboard give
the same figures. Per task, each reference architecture's mean and spread over seeds, and where
the literature gives one, a verdict on the ordering:

- **attention ahead** (MQAR, Zoology; MAD's in-context, fuzzy and noisy recall and selective
  copying): every attention-containing reference beats every pure SSM. Each attention-containing
  reference's margin (``ahead``) is its gap to the better SSM mean in units of the seed spread
  (the root-mean-square of those two references' standard deviations); the task's margin is the
  least of them: the ordering holds when it is positive, and separates when it is at least
  ``SEPARATION`` spreads.
- **mixer-blind** (MAD memorization): which mixer is used should not matter; the margin is
  (largest minus smallest reference mean) over the spread, and the expectation holds when it is
  below ``SEPARATION``.

Other tasks, and any task with a reference measured at fewer than two seeds (no spread), report
means and spreads without a verdict. ``rank_agreement`` compares two budgets:
Spearman's correlation between the panel's rankings on each task.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from scipy.stats import spearmanr
from sqlalchemy.engine import Engine

from hybridlab.metrics import METRICS
from hybridlab.store.engine import transaction
from hybridlab.store.models import CalibrationRun

SEPARATION = 2.0
ATTENTION_AHEAD = "attention ahead"
MIXER_BLIND = "mixer-blind"
RECALL_TASKS = ("mqar", "mad:in_context_recall", "mad:fuzzy_in_context_recall",
                "mad:noisy_in_context_recall", "mad:selective_copying")
EXPECTATIONS: dict[str, str] = {**dict.fromkeys(RECALL_TASKS, ATTENTION_AHEAD),
                                "mad:memorization": MIXER_BLIND}


@dataclass(frozen=True)
class Measured:
    """One stored calibration run."""

    task: str
    reference: str
    pattern: str
    params: int
    seed: int
    metric: str
    value: float
    seconds: float
    budget_scale: float
    # One calibration's settings (space, panel, tasks, training, metric), seeds aside.
    settings: str

    @property
    def has_attention(self) -> bool:
        return "*" in self.pattern


def stored_run(engine: Engine, key: str) -> Measured | None:
    """The run stored under ``key``, or None."""
    row = transaction(engine, lambda s: s.scalars(
        sa.select(CalibrationRun).where(CalibrationRun.fingerprint == key)).first())
    return None if row is None else _measured(row)


def store_run(engine: Engine, space: str, key: str, m: Measured, steps: int) -> None:
    """Record one run under its fingerprint (once: a repeated call adds nothing)."""
    def add(session) -> None:
        if session.scalars(sa.select(CalibrationRun.id)
                           .where(CalibrationRun.fingerprint == key)).first() is None:
            session.add(CalibrationRun(
                space=space, fingerprint=key, budget_scale=m.budget_scale, task=m.task,
                reference=m.reference, pattern=m.pattern, params=m.params, seed=m.seed,
                metric=m.metric, value=m.value, steps=steps, seconds=m.seconds,
                settings=m.settings))
    transaction(engine, add)


def calibration_runs(engine: Engine, space: str) -> list[Measured]:
    """The stored runs of ``space``'s latest calibration at each budget scale: of the settings
    stored for a scale, those of the most recent run (a changed space leaves older settings
    behind, which are not mixed in). None in a database older than calibration."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(CalibrationRun.__tablename__):
            return []
        rows = conn.execute(sa.select(CalibrationRun).where(CalibrationRun.space == space)
                            .order_by(CalibrationRun.id)).all()
    latest = {row.budget_scale: row.settings for row in rows}
    return [_measured(row) for row in rows if latest[row.budget_scale] == row.settings]


def _measured(row) -> Measured:
    return Measured(task=row.task, reference=row.reference, pattern=row.pattern,
                    params=row.params, seed=row.seed, metric=row.metric, value=row.value,
                    seconds=row.seconds, budget_scale=row.budget_scale, settings=row.settings)


@dataclass(frozen=True)
class Summary:
    """A reference's values on one task across seeds."""

    mean: float
    spread: float  # sample standard deviation (0 for one seed)
    n: int
    seconds: float  # mean training time of one run


@dataclass(frozen=True)
class Verdict:
    task: str
    metric: str
    summaries: dict[str, Summary]
    expectation: str | None
    margin: float | None  # in seed spreads; inf when the spread is 0 and the gap is not
    held: bool | None
    separated: bool | None
    # Attention ahead: each attention-containing reference's margin over the better SSM, which
    # tells a hybrid that separates from a transformer that does not (``margin`` is the least).
    ahead: dict[str, float] = field(default_factory=dict)


def _summaries(runs: Iterable[Measured]) -> dict[str, dict[str, Summary]]:
    grouped: dict[str, dict[str, list[Measured]]] = {}
    for m in runs:
        grouped.setdefault(m.task, {}).setdefault(m.reference, []).append(m)
    return {task: {ref: Summary(
        mean=statistics.fmean(m.value for m in ms),
        spread=statistics.stdev([m.value for m in ms]) if len(ms) > 1 else 0.0,
        n=len(ms), seconds=statistics.fmean(m.seconds for m in ms)) for ref, ms in refs.items()}
        for task, refs in grouped.items()}


def _in_spreads(gap: float, spreads: Sequence[float]) -> float:
    spread = math.sqrt(statistics.fmean(s * s for s in spreads))
    if spread == 0:
        return math.copysign(math.inf, gap) if gap else 0.0
    return gap / spread


def verdicts(runs: Iterable[Measured]) -> list[Verdict]:
    """Each task's summaries and, where the literature gives one, its ordering verdict."""
    runs = list(runs)
    metric_of = {m.task: m.metric for m in runs}
    attention = {m.reference: m.has_attention for m in runs}
    out = []
    for task, summaries in _summaries(runs).items():
        metric = metric_of[task]
        sign = 1.0 if METRICS[metric].direction == "maximize" else -1.0
        expectation = EXPECTATIONS.get(task)
        margin = held = separated = None
        ahead: dict[str, float] = {}
        # Without two seeds per reference there is no spread to measure a margin in.
        spread_known = min(summary.n for summary in summaries.values()) >= 2
        if spread_known and expectation == ATTENTION_AHEAD:
            attn = [r for r in summaries if attention[r]]
            ssm = [r for r in summaries if not attention[r]]
            if attn and ssm:
                best = max(ssm, key=lambda r: sign * summaries[r].mean)
                ahead = {r: _in_spreads(sign * (summaries[r].mean - summaries[best].mean),
                                        [summaries[r].spread, summaries[best].spread])
                         for r in attn}
                margin = min(ahead.values())
                held, separated = margin > 0, margin >= SEPARATION
        elif spread_known and expectation == MIXER_BLIND and len(summaries) > 1:
            means = [s.mean for s in summaries.values()]
            margin = _in_spreads(max(means) - min(means), [s.spread for s in summaries.values()])
            held, separated = margin < SEPARATION, None
        out.append(Verdict(task=task, metric=metric, summaries=summaries,
                           expectation=expectation, margin=margin, held=held,
                           separated=separated, ahead=ahead))
    return out


def rank_agreement(cheap: Iterable[Measured], dear: Iterable[Measured]) -> dict[str, float]:
    """Per task, Spearman's correlation between the panel's mean values at two budgets (NaN
    when either ranking is constant)."""
    a, b = _summaries(cheap), _summaries(dear)
    out = {}
    for task in a.keys() & b.keys():
        refs = sorted(a[task].keys() & b[task].keys())
        if len(refs) < 2:
            continue
        with warnings.catch_warnings():  # a constant ranking: NaN, said in the docstring
            warnings.simplefilter("ignore")
            rho = spearmanr([a[task][r].mean for r in refs], [b[task][r].mean for r in refs])[0]
        out[task] = float(rho)
    return out


def format_report(found: Sequence[Verdict]) -> str:
    """A table: per task, each reference's mean +- spread (n), then the verdict and margin."""
    refs = list(dict.fromkeys(r for v in found for r in v.summaries))
    header = ["task", "metric", *refs, "expectation", "margin", "held", "each ahead by",
              "min/run"]
    rows = []
    for v in found:
        cells = [v.task, v.metric]
        for r in refs:
            s = v.summaries.get(r)
            cells.append("-" if s is None else f"{s.mean:.3f}+-{s.spread:.3f} ({s.n})")
        cells.append(v.expectation or "-")
        cells.append("-" if v.margin is None else f"{v.margin:.2f}")
        verdict = "-" if v.held is None else ("yes" if v.held else "NO")
        if v.separated is not None:
            verdict += ", separated" if v.separated else ", not separated"
        cells.append(verdict)
        cells.append(", ".join(f"{r} {m:.2f}" for r, m in v.ahead.items()) or "-")
        cells.append(f"{statistics.fmean(s.seconds for s in v.summaries.values()) / 60:.2f}")
        rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
             for row in (header, *rows)]
    per_candidate = sum(statistics.fmean(s.seconds for s in v.summaries.values()) for v in found)
    lines.append(f"minutes per candidate (every task, mean over the panel): "
                 f"{per_candidate / 60:.2f}")
    return "\n".join(lines)
