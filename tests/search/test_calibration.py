"""Proxy calibration: the panel's architectures, the ordering verdicts on planted results, and a
tiny real calibration that stores its runs and resumes."""

import dataclasses
import math
import random
from pathlib import Path

import pytest
import sqlalchemy as sa

from hybridlab.cli import main
from hybridlab.config import ConfigError
from hybridlab.search import calibration as calibration_module
from hybridlab.search.calibration import REFERENCES, calibrate, reference_arch
from hybridlab.search.space import load_space
from hybridlab.store import CalibrationRun, create_tables, make_engine
from hybridlab.store.calibration import Measured, calibration_runs, rank_agreement, verdicts
from hybridlab.train import TrainResult

TINY = Path(__file__).parent / "tiny_space.yaml"


def planted(task: str, means: dict[str, float], *, spread: float, seeds: int = 3,
            metric: str = "accuracy", seed: int = 0) -> list[Measured]:
    """Runs whose values are each reference's mean plus noise of about ``spread``."""
    rng = random.Random(seed)
    out = []
    for ref, mean in means.items():
        noise = [rng.gauss(0, 1) for _ in range(seeds)]
        centre = sum(noise) / seeds
        scale = spread / max(1e-12, math.sqrt(sum((n - centre) ** 2 for n in noise)
                                              / max(1, seeds - 1)))
        out += [Measured(task=task, reference=ref, pattern=REFERENCES[ref], params=1000,
                         seed=i, metric=metric, value=mean + (n - centre) * scale,
                         seconds=1.0, budget_scale=1.0, settings="s")
                for i, n in enumerate(noise)]
    return out


@pytest.mark.parametrize("task", ["mqar", "mad:in_context_recall", "mad:selective_copying"])
def test_attention_ahead_is_detected_and_a_reversal_flagged(task):
    ahead = {"transformer": 0.95, "hybrid": 0.90, "mamba1": 0.30, "mamba2": 0.40}
    [v] = verdicts(planted(task, ahead, spread=0.02))
    assert v.held and v.separated
    # worse attention (0.90) minus better SSM (0.40), over the rms of their spreads (0.02)
    assert v.margin == pytest.approx(0.5 / 0.02)
    reversed_ = {"transformer": 0.35, "hybrid": 0.3, "mamba1": 0.9, "mamba2": 0.8}
    [r] = verdicts(planted(task, reversed_, spread=0.02))
    assert r.held is False and r.separated is False and r.margin < 0
    close = {"transformer": 0.52, "hybrid": 0.51, "mamba1": 0.50, "mamba2": 0.49}
    [c] = verdicts(planted(task, close, spread=0.02))
    assert c.held and not c.separated and 0 < c.margin < 2


def test_each_attention_reference_gets_its_own_margin_over_the_better_ssm():
    # The hybrid separates; the transformer trails the SSMs: the task's verdict is the worse.
    means = {"transformer": 0.35, "hybrid": 0.99, "mamba1": 0.80, "mamba2": 0.90}
    [v] = verdicts(planted("mad:in_context_recall", means, spread=0.03))
    assert v.ahead["hybrid"] == pytest.approx(0.09 / 0.03)
    assert v.ahead["transformer"] == pytest.approx(-0.55 / 0.03)
    assert v.margin == v.ahead["transformer"] and v.held is False
    assert set(v.ahead) == {"transformer", "hybrid"}


def test_a_minimised_metric_orders_the_other_way():
    lower_is_better = {"transformer": 1.0, "hybrid": 1.1, "mamba1": 2.0, "mamba2": 1.9}
    [v] = verdicts(planted("mqar", lower_is_better, spread=0.05, metric="loss"))
    assert v.held and v.margin == pytest.approx(0.8 / 0.05)


def test_memorization_must_not_depend_on_the_mixer():
    same = {"transformer": 0.9, "hybrid": 0.9, "mamba1": 0.9, "mamba2": 0.9}
    [v] = verdicts(planted("mad:memorization", same, spread=0.03))
    assert v.held and v.expectation == "mixer-blind"
    apart = {"transformer": 0.9, "hybrid": 0.9, "mamba1": 0.3, "mamba2": 0.9}
    [w] = verdicts(planted("mad:memorization", apart, spread=0.03))
    assert w.held is False


def test_one_seed_gives_no_margin():
    [v] = verdicts(planted("mqar", {"transformer": 0.9, "mamba2": 0.1}, spread=0.0, seeds=1))
    assert (v.margin, v.held, v.separated) == (None, None, None)


def test_other_tasks_report_without_a_verdict():
    [v] = verdicts(planted("corpus", {"transformer": 1.2, "mamba2": 1.3}, spread=0.1,
                           metric="bits_per_byte"))
    assert v.expectation is None and v.held is None
    assert v.summaries["transformer"].n == 3
    assert v.summaries["transformer"].spread == pytest.approx(0.1)


def test_rank_agreement_is_spearman_of_the_panel():
    cheap = planted("mqar", {"transformer": 0.9, "hybrid": 0.8, "mamba1": 0.2, "mamba2": 0.3},
                    spread=0.01)
    same_order = planted("mqar", {"transformer": 1.0, "hybrid": 0.95, "mamba1": 0.5,
                                  "mamba2": 0.6}, spread=0.01)
    flipped = planted("mqar", {"transformer": 0.1, "hybrid": 0.2, "mamba1": 0.9,
                               "mamba2": 0.8}, spread=0.01)
    assert rank_agreement(cheap, same_order) == {"mqar": pytest.approx(1.0)}
    assert rank_agreement(cheap, flipped) == {"mqar": pytest.approx(-1.0)}


def test_panel_takes_the_space_sizes():
    space = load_space(TINY)
    patterns = {r: reference_arch(r, space, 64).pattern for r in REFERENCES}
    # tiny: depth 1..2 (middle 1), no MLPs; the hybrid needs both of its mixers
    assert patterns == {"transformer": "*", "mamba1": "m", "mamba2": "M", "hybrid": "M*"}
    arch = reference_arch("hybrid", space, 64)
    assert arch.d_model == 32
    assert arch.layers[0].d_state == 8 and arch.layers[1].n_heads == 2
    with pytest.raises(ConfigError, match="unknown reference 'rwkv'"):
        reference_arch("rwkv", space, 64)


def test_a_tiny_calibration_stores_its_runs_and_a_rerun_trains_nothing(tmp_path, capsys,
                                                                       monkeypatch):
    url = f"sqlite:///{tmp_path / 'cal.db'}"
    argv = ["calibrate", str(TINY), "--seeds", "3", "--storage", url,
            "--references", "transformer,mamba2"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "attention ahead" in first and "transformer" in first
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(CalibrationRun)).all()
    assert len(rows) == 6 and {r.reference for r in rows} == {"transformer", "mamba2"}
    assert {r.seed for r in rows} == {0, 1, 2} and all(r.steps == 20 for r in rows)
    assert len({r.settings for r in rows}) == 1
    # The rerun reads every run back: nothing trains, same values, no new rows.
    monkeypatch.setattr(calibration_module, "train", lambda *a, **k: pytest.fail("trained"))
    space = load_space(TINY)
    again = calibrate(space, engine, seeds=3, references=("transformer", "mamba2"),
                      echo=lambda line: None)
    assert sorted(m.value for m in again) == sorted(r.value for r in rows)
    assert sorted(calibration_runs(engine, "tiny"), key=lambda m: (m.reference, m.seed)) == \
        sorted(again, key=lambda m: (m.reference, m.seed))
    assert calibration_runs(engine, "other") == []
    # A changed space trains afresh, and the stored view is the latest settings only.
    monkeypatch.undo()
    changed = dataclasses.replace(space, train=dataclasses.replace(space.train, lr=0.01))
    fresh = calibrate(changed, engine, seeds=3, references=("transformer", "mamba2"),
                      echo=lambda line: None)
    assert len({m.settings for m in fresh}) == 1 and fresh[0].settings != rows[0].settings
    assert sorted(calibration_runs(engine, "tiny"), key=lambda m: (m.reference, m.seed)) == \
        sorted(fresh, key=lambda m: (m.reference, m.seed))
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(CalibrationRun)).scalar() == 12
    engine.dispose()


def test_a_diverged_run_is_left_out(tmp_path, monkeypatch):
    diverged = TrainResult(status="diverged", reason="loss became nan at step 3", steps=2,
                           tokens=0, seconds=0.1, metrics={})
    monkeypatch.setattr(calibration_module, "train", lambda *a, **k: diverged)
    engine = make_engine(f"sqlite:///{tmp_path / 'cal.db'}")
    create_tables(engine)
    lines = []
    assert calibrate(load_space(TINY), engine, seeds=1, references=("mamba2",),
                     echo=lines.append) == []
    assert lines[-1] == "mqar mamba2 seed 0: left out, loss became nan at step 3"
    assert calibration_runs(engine, "tiny") == []
    engine.dispose()


def test_bad_flags_are_refused_before_anything_is_written(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cal.db'}"
    for flags, message in ((["--references", "transformer,rwkv"],
                            "--references: unknown reference 'rwkv'"),
                           (["--references", "mamba2,mamba2"],
                            "--references: must name each reference once"),
                           (["--budget-scale", "0"], "--budget-scale: must be positive")):
        assert main(["calibrate", str(TINY), "--storage", url, *flags]) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "cal.db").exists()


def test_create_tables_adds_the_calibration_table_to_an_older_database(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    create_tables(engine)
    CalibrationRun.__table__.drop(engine)
    create_tables(engine)
    assert "hl_calibration" in sa.inspect(engine).get_table_names()
    engine.dispose()
