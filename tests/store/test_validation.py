"""Validation of the proxy ranking: rank correlations against scipy, winners, the store reader.

``write_proxy_study`` and ``write_promotions`` write a study and its promoted runs the way the
search and ``promote`` do, without training; the status and dashboard tests use them too.
"""

import itertools
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import create_trial
from scipy import stats

from hybridlab.store import (
    Candidate,
    Promotion,
    create_tables,
    make_engine,
    rung_study_name,
    session_scope,
)
from hybridlab.store.validation import (
    EXACT_SPEARMAN_MAX,
    MIN_RUNS,
    PromotedRun,
    rank_correlation,
    study_validation,
    validate_rung,
)


def write_proxy_study(url: str, study: str, values: list[float], *, metric: str,
                      direction: str, patterns: list[str] | None = None) -> None:
    """A finished proxy study: one complete trial (and trained candidate row) per value."""
    engine = make_engine(url)
    create_tables(engine)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    created = optuna.create_study(study_name=study, storage=url, direction=direction)
    created.set_user_attr("objectives", [metric])
    patterns = patterns or ["M*M"] * len(values)
    with session_scope(engine) as session:
        for number, (value, pattern) in enumerate(zip(values, patterns, strict=True)):
            created.add_trial(create_trial(value=value, user_attrs={"pattern": pattern}))
            session.add(Candidate(study=study, trial=number, pattern=pattern, params=1000,
                                  task="corpus", task_fingerprint={"name": "corpus"},
                                  code_version="test", status="trained",
                                  objectives={metric: value}))
    engine.dispose()


def run(key: str, *, role: str = "candidate", source: int | None = None,
        proxy: float | None = None, value: float | None = None, status: str = "trained",
        reason: str | None = None, pattern: str = "M*M", params: int = 4000) -> dict[str, Any]:
    """One promoted run as ``write_promotions`` takes it."""
    return {"key": key, "role": role, "source_trial": source, "proxy_value": proxy,
            "value": value, "status": status, "reason": reason, "pattern": pattern,
            "params": params}


def write_promotions(url: str, study: str, rung: int, runs: list[dict[str, Any]], *,
                     metric: str, direction: str, target: str = "4x params",
                     strategy: str = "both") -> None:
    """The rung's study with one complete trial per trained run, and its hl_promotion rows."""
    engine = make_engine(url)
    create_tables(engine)
    run_study = rung_study_name(study, rung)
    created = optuna.create_study(study_name=run_study, storage=url, direction=direction,
                                  load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        created.set_metric_names([metric])
    with session_scope(engine) as session:
        for r in runs:
            run_trial = None
            if r["status"] == "trained":
                created.add_trial(create_trial(value=r["value"],
                                               user_attrs={"pattern": r["pattern"]}))
                run_trial = len(created.trials) - 1
                session.add(Candidate(study=run_study, trial=run_trial, pattern=r["pattern"],
                                      params=r["params"], task="corpus",
                                      task_fingerprint={"name": "corpus"},
                                      code_version="test", status="trained",
                                      objectives={metric: r["value"]}))
            session.add(Promotion(
                study=study, rung=rung, run_study=run_study, run_trial=run_trial, metric=metric,
                genome_hash=f"hash-{r['key']}", arch={}, source_params=1000, strategy=strategy,
                target=target, workers=2, nodes=["node-a"],
                seconds=None if run_trial is None else 12.5, **r))
    engine.dispose()


def promoted_run(key: str, **fields: Any) -> PromotedRun:
    values = run(key, **fields)
    return PromotedRun(run_study="s.rung1", run_trial=None, source_params=1000, workers=1,
                       seconds=None, **values)


def exact_spearman_p(x, y) -> float:
    """Two-sided p by enumeration: the share of pairings at least as correlated as observed
    (Spearman's rho being Pearson's r of the average ranks)."""
    x_ranks, y_ranks = stats.rankdata(x), stats.rankdata(y)
    observed = abs(np.corrcoef(x_ranks, y_ranks)[0, 1])
    extreme = [abs(np.corrcoef(x_ranks, p)[0, 1]) >= observed - 1e-12
               for p in itertools.permutations(y_ranks)]
    return sum(extreme) / len(extreme)


@pytest.mark.parametrize("n", [EXACT_SPEARMAN_MAX + 1, 13, 40])
@pytest.mark.parametrize("ties", [False, True])
def test_rank_correlation_matches_scipy(n, ties):
    rng = np.random.default_rng(1000 * n + ties)
    for _ in range(5):
        proxy = (rng.integers(0, 4, n) if ties else rng.normal(size=n)).astype(float)
        promoted = (rng.integers(0, 4, n) if ties else 0.5 * proxy + rng.normal(size=n))
        promoted = promoted.astype(float)
        got = rank_correlation(proxy.tolist(), promoted.tolist())
        spearman = stats.spearmanr(proxy, promoted)
        kendall = stats.kendalltau(proxy, promoted)
        assert got.n == n and got.note is None
        assert got.spearman == pytest.approx(spearman.statistic, abs=1e-12)
        assert got.spearman_p == pytest.approx(spearman.pvalue, rel=1e-9)
        assert got.kendall == pytest.approx(kendall.statistic, abs=1e-12)
        assert got.kendall_p == pytest.approx(kendall.pvalue, rel=1e-9)


@pytest.mark.parametrize("n", [MIN_RUNS, 4, 5, 6, 7])
def test_small_samples_get_the_exact_spearman_p_value(n):
    rng = np.random.default_rng(n)
    for ties in (False, True):
        proxy = (rng.integers(0, 3, n) if ties else rng.normal(size=n)).astype(float).tolist()
        promoted = rng.normal(size=n).tolist()
        if len(set(proxy)) == 1:
            proxy[0] += 1.0
        got = rank_correlation(proxy, promoted)
        assert got.spearman == pytest.approx(stats.spearmanr(proxy, promoted).statistic)
        assert got.spearman_p == pytest.approx(exact_spearman_p(proxy, promoted), abs=1e-12)
        assert got.kendall == pytest.approx(stats.kendalltau(proxy, promoted).statistic)
        assert got.kendall_p == pytest.approx(stats.kendalltau(proxy, promoted).pvalue)


def test_a_perfect_order_has_coefficient_one_and_its_exact_p():
    concordant = rank_correlation([3.0, 1.0, 2.0], [30.0, 10.0, 20.0])
    assert (concordant.spearman, concordant.kendall) == (pytest.approx(1.0), pytest.approx(1.0))
    # Of the 3! pairings, two (the order and its reverse) reach |rho| = 1.
    assert concordant.spearman_p == pytest.approx(2 / 6)
    assert concordant.kendall_p == pytest.approx(2 / 6)
    reversed_ = rank_correlation([1.0, 2.0, 3.0, 4.0], [8.0, 6.0, 4.0, 2.0])
    assert (reversed_.spearman, reversed_.kendall) == (pytest.approx(-1.0), pytest.approx(-1.0))
    assert reversed_.spearman_p == pytest.approx(2 / 24)
    assert concordant.describe() == ("Spearman 1.00 (p=0.33), Kendall 1.00 (p=0.33) "
                                     "over 3 candidates")


def test_ties_are_ranked_as_scipy_ranks_them():
    proxy, promoted = [1.0, 1.0, 2.0, 3.0, 3.0], [1.0, 2.0, 2.0, 3.0, 5.0]
    got = rank_correlation(proxy, promoted)
    assert got.spearman == pytest.approx(stats.spearmanr(proxy, promoted).statistic)
    assert got.kendall == pytest.approx(stats.kendalltau(proxy, promoted).statistic)
    assert got.spearman_p == pytest.approx(exact_spearman_p(proxy, promoted))


@pytest.mark.parametrize(("proxy", "promoted", "which"), [
    ([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0], "every proxy value is equal"),
    ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], "every promoted value is equal"),
    ([1.0, 1.0, 1.0], [5.0, 5.0, 5.0], "every proxy and every promoted value is equal"),
])
def test_constant_values_give_no_coefficient_and_say_why(proxy, promoted, which):
    got = rank_correlation(proxy, promoted)
    assert (got.spearman, got.spearman_p, got.kendall, got.kendall_p) == (None,) * 4
    assert got.note.startswith(which) and got.n == len(proxy)
    assert got.describe() == got.note


@pytest.mark.parametrize("n", range(MIN_RUNS))
def test_too_few_candidates_give_no_coefficient(n):
    got = rank_correlation([float(i) for i in range(n)], [float(i) for i in range(n)])
    assert (got.spearman, got.kendall) == (None, None)
    assert got.note == f"too few promoted candidates ({n} < {MIN_RUNS}) for a rank correlation"


def test_bad_inputs_are_refused_naming_the_value():
    with pytest.raises(ValueError, match="3 proxy values, 2 promoted values"):
        rank_correlation([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"promoted\[1\] is nan"):
        rank_correlation([1.0, 2.0, 3.0], [1.0, math.nan, 2.0])


def rung_of(runs: list[PromotedRun], direction: str):
    return validate_rung(runs, study="s", rung=1, metric="m", direction=direction,
                         target="4x params", strategy="both")


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_winners_follow_the_metric_direction(direction):
    # Proxy order 1 < 2 < 3; after promotion trial 2 is lowest, trial 3 highest.
    sign = 1.0 if direction == "minimize" else -1.0
    runs = [promoted_run("trial:1", source=1, proxy=1.0, value=2.0),
            promoted_run("trial:2", source=2, proxy=2.0, value=1.0),
            promoted_run("trial:3", source=3, proxy=3.0, value=3.0),
            promoted_run("transformer", role="transformer", value=1.5),
            promoted_run("ssm", role="ssm", value=2.5)]
    rung = rung_of(runs, direction)
    assert rung.proxy_winner == (1 if sign > 0 else 3)
    assert rung.promoted_winner == (2 if sign > 0 else 3)
    assert rung.winner_kept is (sign < 0)
    assert rung.best_baseline.role == ("transformer" if sign > 0 else "ssm")
    assert rung.beats_baselines is True
    expected = rank_correlation([1.0, 2.0, 3.0], [2.0, 1.0, 3.0])
    assert rung.correlation == expected
    first, second = rung.summary().splitlines()
    kept = "yes" if sign < 0 else "no (#2 is)"
    assert first == (f"rung 1 (4x params, both): {expected.describe()}; proxy winner "
                     f"#{rung.proxy_winner} still best: {kept}; baselines: transformer 1.5, "
                     "ssm 2.5 m")
    better = "lower" if sign > 0 else "higher"
    assert second.startswith(f"  m: {better} is better; coefficients on the raw values")
    assert "3 of 3 candidates trained" in second
    assert "beats every baseline: yes" in second


def test_a_winner_that_loses_to_a_baseline_and_undecided_cases():
    runs = [promoted_run("trial:0", source=0, proxy=0.5, value=0.6),
            promoted_run("trial:4", source=4, proxy=0.4, value=0.7),
            promoted_run("transformer", role="transformer", value=0.9)]
    rung = rung_of(runs, "maximize")
    assert (rung.proxy_winner, rung.promoted_winner, rung.winner_kept) == (0, 4, False)
    assert rung.beats_baselines is False
    assert "too few promoted candidates (2 < 3)" in rung.summary()
    assert "beats every baseline: no" in rung.summary()
    # The proxy winner's run has not trained: whether it stays best is not known yet.
    pending = rung_of([promoted_run("trial:0", source=0, proxy=0.5, status="pending"),
                       *runs[1:]], "maximize")
    assert (pending.proxy_winner, pending.promoted_winner, pending.winner_kept) == (0, 4, None)
    assert "still best: undecided (its run is pending)" in pending.summary()
    alone = rung_of(runs[:1], "maximize")
    assert alone.winner_kept is None and alone.beats_baselines is None
    assert "undecided (no other candidate trained yet)" in alone.summary()
    unknown = rung_of(runs, None)
    assert (unknown.proxy_winner, unknown.promoted_winner, unknown.winner_kept) == (None,) * 3
    assert "direction unknown" in unknown.summary()


def test_ties_go_to_the_earlier_trial_and_a_tie_keeps_the_winner():
    runs = [promoted_run(f"trial:{n}", source=n, proxy=p, value=v)
            for n, p, v in [(5, 1.0, 2.0), (3, 1.0, 2.0), (8, 2.0, 3.0)]]
    rung = rung_of(runs, "minimize")
    assert (rung.proxy_winner, rung.promoted_winner, rung.winner_kept) == (3, 3, True)


def test_study_validation_reads_every_rung(storage_url):
    write_proxy_study(storage_url, "s", [1.9, 1.7, 2.2, 1.8], metric="bits_per_byte",
                      direction="minimize")
    rung1 = [run("trial:1", source=1, proxy=1.7, value=1.20),
             run("trial:3", source=3, proxy=1.8, value=1.25),
             run("trial:0", source=0, proxy=1.9, value=1.22),
             run("transformer", role="transformer", value=1.31),
             run("ssm", role="ssm", status="failed", reason="out of memory")]
    write_promotions(storage_url, "s", 1, rung1, metric="bits_per_byte", direction="minimize")
    write_promotions(storage_url, "s", 2, rung1[:2], metric="bits_per_byte",
                     direction="minimize", target="1M params", strategy="stack")
    engine = make_engine(storage_url)
    try:
        first, second = study_validation(engine, "s")
        assert study_validation(engine, "nothing") == []
    finally:
        engine.dispose()
    assert (first.rung, first.metric, first.direction) == (1, "bits_per_byte", "minimize")
    assert (second.rung, second.target, second.strategy) == (2, "1M params", "stack")
    assert [r.key for r in first.runs] == ["trial:0", "trial:1", "trial:3", "transformer", "ssm"]
    assert first.correlation == rank_correlation([1.9, 1.7, 1.8], [1.22, 1.20, 1.25])
    assert (first.proxy_winner, first.promoted_winner, first.winner_kept) == (1, 1, True)
    assert first.best_baseline.role == "transformer" and first.beats_baselines is True
    assert [r.run_trial for r in first.runs] == [2, 0, 1, 3, None]
    assert first.run_study == "s.rung1" and first.runs[-1].reason == "out of memory"
    assert second.correlation.spearman is None and second.correlation.n == 2


def test_the_rung_studys_direction_wins_over_the_registry(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    runs = [run("trial:0", source=0, proxy=1.0, value=1.0),
            run("trial:1", source=1, proxy=2.0, value=2.0)]
    # A space may turn a registry metric's direction round; the rung study records the space's.
    write_promotions(url, "s", 1, runs, metric="accuracy", direction="minimize")
    engine = make_engine(url)
    try:
        (validation,) = study_validation(engine, "s")
        assert (validation.direction, validation.promoted_winner) == ("minimize", 0)
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM study_directions"))
        (validation,) = study_validation(engine, "s")
        assert (validation.direction, validation.promoted_winner) == ("maximize", 1)
    finally:
        engine.dispose()


def test_a_database_without_the_promotion_table_has_no_validation(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    write_proxy_study(url, "s", [0.5, 0.6], metric="accuracy", direction="maximize")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {Promotion.__tablename__}"))
        assert study_validation(engine, "s") == []
        assert not sa.inspect(engine).has_table(Promotion.__tablename__)
    finally:
        engine.dispose()
