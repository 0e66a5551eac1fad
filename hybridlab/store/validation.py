"""Does the proxy's ranking survive promotion? Rank correlations and winners, per study and rung.

Read from ``hl_promotion`` alone (no training, no Ray), so ``hybridlab status`` and the dashboard
show the same figures. Per rung, the promoted candidates that trained give pairs (proxy value,
promoted value) of the promotion metric; Spearman's and Kendall's coefficients are computed on
those raw values, so a positive coefficient means the promoted runs keep the proxy's order
whichever way the metric is better. The winners use the metric's direction: for a "minimize"
metric (bits per byte) the best is the lowest.

Spearman's p-value from ``scipy.stats.spearmanr`` is a t approximation that says p = 0 for three
candidates in perfect order; up to ``EXACT_SPEARMAN_MAX`` candidates the exact permutation p-value
(``scipy.stats.permutation_test`` over every pairing) is given instead. Kendall's comes from
``scipy.stats.kendalltau`` (exact for small samples without ties).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from scipy import stats
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from hybridlab.metrics import METRICS, Direction
from hybridlab.store.models import Promotion, PromotionRole, PromotionStatus

# Fewer promoted candidates with both values than this: no coefficient, a note says so.
MIN_RUNS = 3
# n! pairings are enumerated for the exact p-value: 40320 at 8.
EXACT_SPEARMAN_MAX = 8


@dataclass(frozen=True)
class Correlation:
    """Rank correlation between proxy and promoted values; ``note`` says why a value is None."""

    n: int
    spearman: float | None
    spearman_p: float | None
    kendall: float | None
    kendall_p: float | None
    note: str | None

    def describe(self) -> str:
        """``Spearman 0.80 (p=0.33), Kendall 0.67 (p=0.33) over 4 candidates``, or the note."""
        if self.spearman is None or self.kendall is None:
            return str(self.note)
        return (f"Spearman {self.spearman:.2f} (p={self.spearman_p:.2g}), "
                f"Kendall {self.kendall:.2f} (p={self.kendall_p:.2g}) over {self.n} candidates")


def rank_correlation(proxy: Sequence[float], promoted: Sequence[float]) -> Correlation:
    """Spearman and Kendall coefficients (two-sided p-values) of paired finite values.

    Fewer than ``MIN_RUNS`` pairs, or a side whose values are all equal (no order to compare),
    give no coefficient and a note instead.
    """
    if len(proxy) != len(promoted):
        raise ValueError(f"rank correlation needs paired values: {len(proxy)} proxy values, "
                         f"{len(promoted)} promoted values")
    for name, values in (("proxy", proxy), ("promoted", promoted)):
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise ValueError(f"{name}[{i}] is {value}: rank correlation needs finite values")
    n = len(proxy)
    if n < MIN_RUNS:
        return Correlation(n, None, None, None, None,
                           f"too few promoted candidates ({n} < {MIN_RUNS}) "
                           "for a rank correlation")
    constant = [name for name, values in (("proxy", proxy), ("promoted", promoted))
                if len(set(values)) == 1]
    if constant:
        return Correlation(n, None, None, None, None,
                           f"every {' and every '.join(constant)} value is equal "
                           f"({n} candidates): no order to correlate")
    x = np.asarray(proxy, dtype=float)
    y = np.asarray(promoted, dtype=float)
    spearman = stats.spearmanr(x, y)
    spearman_p = float(spearman.pvalue)
    if n <= EXACT_SPEARMAN_MAX:
        spearman_p = _exact_spearman_p(x, y)
    kendall = stats.kendalltau(x, y)
    return Correlation(n, float(spearman.statistic), spearman_p, float(kendall.statistic),
                       float(kendall.pvalue), None)


def _exact_spearman_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided p-value of Spearman's rho over all n! pairings of ``y`` with ``x``."""
    x_centred = stats.rankdata(x) - (len(x) + 1) / 2

    def rho(values: np.ndarray, axis: int = -1) -> np.ndarray:
        ranks = stats.rankdata(values, axis=axis)
        centred = ranks - ranks.mean(axis=axis, keepdims=True)
        return (centred * x_centred).sum(axis=axis) / np.sqrt(
            (centred**2).sum(axis=axis) * (x_centred**2).sum())

    result = stats.permutation_test((y,), rho, permutation_type="pairings", vectorized=True,
                                    n_resamples=math.inf, alternative="two-sided")
    return float(result.pvalue)


@dataclass(frozen=True)
class PromotedRun:
    """One ``hl_promotion`` row: a promoted candidate or a baseline, and what it reached."""

    key: str
    role: str  # a PromotionRole value
    source_trial: int | None
    status: str  # a PromotionStatus value
    reason: str | None
    pattern: str
    params: int
    source_params: int
    proxy_value: float | None  # None for baselines: they have no proxy trial
    value: float | None
    run_study: str
    run_trial: int | None
    workers: int
    seconds: float | None

    @property
    def trained(self) -> bool:
        return (self.status == PromotionStatus.TRAINED.value and self.value is not None
                and math.isfinite(self.value))

    @property
    def is_candidate(self) -> bool:
        return self.role == PromotionRole.CANDIDATE.value


@dataclass(frozen=True)
class RungValidation:
    """How one rung's promoted runs compare with their proxy values and with the baselines.

    ``proxy_winner`` is the source trial best at proxy scale among the rung's candidates;
    ``promoted_winner`` the best after promotion among those trained. ``winner_kept`` is None
    until the proxy winner and at least one other candidate have trained. ``beats_baselines``
    says whether the promoted winner is strictly better than every trained baseline (None
    without either).
    """

    study: str
    rung: int
    metric: str
    direction: Direction | None  # None: a metric this version does not know, no winners
    target: str
    strategy: str
    runs: tuple[PromotedRun, ...]
    correlation: Correlation
    proxy_winner: int | None
    promoted_winner: int | None
    winner_kept: bool | None
    best_baseline: PromotedRun | None
    beats_baselines: bool | None

    @property
    def candidates(self) -> tuple[PromotedRun, ...]:
        return tuple(r for r in self.runs if r.is_candidate)

    @property
    def baselines(self) -> tuple[PromotedRun, ...]:
        return tuple(r for r in self.runs if not r.is_candidate)

    @property
    def run_study(self) -> str:
        return self.runs[0].run_study

    def heading(self) -> str:
        """``rung 1 (4x params, both)``: the rung, its target as written and its strategy."""
        return f"rung {self.rung} ({self.target}, {self.strategy})"

    def title(self) -> str:
        """``rung 1 (4x params, both): Spearman ... over 3 candidates`` (or why there is none)."""
        return f"{self.heading()}: {self.correlation.describe()}"

    def summary(self) -> str:
        """Two lines for ``hybridlab status``: correlation, winner and baselines; how to read
        them."""
        parts = [self.title()]
        if self.proxy_winner is not None:
            parts.append(f"proxy winner #{self.proxy_winner} still best: {self._kept_text()}")
        if self.baselines:
            trained = [r for r in self.baselines if r.trained]
            shown = ", ".join(f"{r.role} {r.value:.4g}" for r in trained) or "none trained yet"
            parts.append(f"baselines: {shown} {self.metric}")
        better = {"minimize": "lower is better", "maximize": "higher is better",
                  None: "direction unknown"}[self.direction]
        candidates = self.candidates
        detail = [f"{self.metric}: {better}; coefficients on the raw values (positive: the "
                  "promoted runs keep the proxy's order)",
                  f"{sum(r.trained for r in candidates)} of {len(candidates)} candidates trained"]
        if self.beats_baselines is not None:
            winner = next(r for r in candidates if r.source_trial == self.promoted_winner)
            detail.append(f"promoted winner #{self.promoted_winner} ({winner.value:.4g}) beats "
                          f"every baseline: {'yes' if self.beats_baselines else 'no'}")
        return "; ".join(parts) + "\n  " + "; ".join(detail)

    def _kept_text(self) -> str:
        if self.winner_kept is not None:
            return "yes" if self.winner_kept else f"no (#{self.promoted_winner} is)"
        winner = next(r for r in self.candidates if r.source_trial == self.proxy_winner)
        if not winner.trained:
            return f"undecided (its run is {winner.status})"
        return "undecided (no other candidate trained yet)"


def validate_rung(runs: Sequence[PromotedRun], *, study: str, rung: int, metric: str,
                  direction: Direction | None, target: str, strategy: str) -> RungValidation:
    """The correlation, winners and baseline comparison of one rung's runs."""
    candidates = [r for r in runs if r.is_candidate
                  and r.proxy_value is not None and math.isfinite(r.proxy_value)]
    paired = [r for r in candidates if r.trained]
    correlation = rank_correlation([r.proxy_value for r in paired], [r.value for r in paired])
    baselines = [r for r in runs if not r.is_candidate and r.trained]
    proxy_winner = promoted_winner = winner_kept = best_baseline = beats = None
    if direction is not None:
        sign = 1.0 if direction == "minimize" else -1.0
        # Ties go to the earlier trial, as top_trials ranks them.
        if candidates:
            proxy_winner = min(candidates,
                               key=lambda r: (sign * r.proxy_value, r.source_trial)).source_trial
        if baselines:
            best_baseline = min(baselines, key=lambda r: sign * r.value)
        if paired:
            best = min(paired, key=lambda r: (sign * r.value, r.source_trial))
            promoted_winner = best.source_trial
            kept = next((r for r in paired if r.source_trial == proxy_winner), None)
            if kept is not None and len(paired) >= 2:
                winner_kept = sign * kept.value <= sign * best.value
            if best_baseline is not None:
                beats = sign * best.value < sign * best_baseline.value
    return RungValidation(study=study, rung=rung, metric=metric, direction=direction,
                          target=target, strategy=strategy, runs=tuple(runs),
                          correlation=correlation, proxy_winner=proxy_winner,
                          promoted_winner=promoted_winner, winner_kept=winner_kept,
                          best_baseline=best_baseline, beats_baselines=beats)


def study_validation(engine: Engine, study: str) -> list[RungValidation]:
    """One validation per rung of ``study`` that has promoted runs, by rung; [] when none (also
    for a database written before ``hl_promotion`` existed). Only reads."""
    with Session(engine) as session:
        if not sa.inspect(session.connection()).has_table(Promotion.__tablename__):
            return []
        rows = Promotion.of_study(session, study)
        directions = _study_directions(session, {row.run_study for row in rows})
        by_rung: dict[int, list[Promotion]] = {}
        for row in rows:
            by_rung.setdefault(row.rung, []).append(row)
        validations = []
        for rung, members in sorted(by_rung.items()):
            first = members[0]
            registered = METRICS.get(first.metric)
            # The rung study was created with the space's direction for the metric (which may
            # differ from the registry's default); the registry serves older databases.
            direction = directions.get(first.run_study,
                                       registered.direction if registered else None)
            validations.append(validate_rung(
                [_promoted_run(row) for row in members], study=study, rung=rung,
                metric=first.metric, direction=direction, target=first.target,
                strategy=first.strategy))
    return validations


def _promoted_run(row: Promotion) -> PromotedRun:
    return PromotedRun(key=row.key, role=row.role, source_trial=row.source_trial,
                       status=row.status, reason=row.reason, pattern=row.pattern,
                       params=row.params, source_params=row.source_params,
                       proxy_value=row.proxy_value, value=row.value, run_study=row.run_study,
                       run_trial=row.run_trial, workers=row.workers, seconds=row.seconds)


def _study_directions(session: Session, names: set[str]) -> dict[str, Direction]:
    """The single direction of each named Optuna study that exists (read from Optuna's tables,
    which store it as the enum's name)."""
    if not names or not sa.inspect(session.connection()).has_table("study_directions"):
        return {}
    studies = sa.table("studies", sa.column("study_id"), sa.column("study_name"))
    directions = sa.table("study_directions", sa.column("study_id"), sa.column("objective"),
                          sa.column("direction"))
    found = session.execute(
        sa.select(studies.c.study_name, directions.c.direction)
        .join(directions, directions.c.study_id == studies.c.study_id)
        .where(studies.c.study_name.in_(sorted(names)), directions.c.objective == 0)).all()
    named = {"MINIMIZE": "minimize", "MAXIMIZE": "maximize"}
    return {name: named[str(direction).upper()] for name, direction in found
            if str(direction).upper() in named}
