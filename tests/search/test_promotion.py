"""Promotion: proxy winners and baselines extrapolated, retrained, recorded and resumed."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState, create_trial

from hybridlab import code_version
from hybridlab.config import ArchConfig, AttentionSpec, ConfigError, Mamba1Spec, Mamba2Spec, MLPSpec
from hybridlab.cost import param_count
from hybridlab.layers import MoESpec, ParallelSpec
from hybridlab.search.promotion import (
    KEY_ATTR,
    baseline,
    promote,
    promotion_sources,
)
from hybridlab.search.space import parse_space
from hybridlab.store import (
    Candidate,
    CurvePoint,
    Promotion,
    PromotionRole,
    create_tables,
    load_study,
    make_engine,
    rung_study_name,
    transaction,
)
from tests.search.corpus_space import corpus_space, write_corpus


def space_text(corpus: Path, cache: Path, *, rung: str, steps: int = 12,
               checkpoint_every: int = 4, top_k: int = 2) -> str:
    return corpus_space(
        name="promo", corpus=corpus, cache=cache, trials=3, workers=1, depth=(2, 2),
        train="{steps: 8, batch_size: 4, lr: 0.003, warmup_steps: 2, eval_every: 4, "
              "eval_batch_size: 16}",
        tail=f"""promotion:
  top_k: {top_k}
  rungs:
    - {{scale: {rung}, strategy: both, workers_per_trial: 1,
       train: {{steps: {steps}, checkpoint_every: {checkpoint_every}, eval_every: 6}}}}
""")


# The byte tokenizer's vocabulary: 256 bytes and an end-of-document token.
VOCAB = 257
SOURCES = (
    ("M-*-", 2.10),
    ("*-M-", 2.30),
    ("M-M-", 2.20),
)


def make_proxy_study(url: str, text: str, *, sources=SOURCES) -> None:
    """A finished proxy study as a search leaves it: complete trials with trained candidates."""
    engine = make_engine(url)
    create_tables(engine)
    study = optuna.create_study(study_name="promo", storage=url, directions=["minimize"])
    study.set_user_attr("space", text)
    study.set_user_attr("objectives", ["bits_per_byte"])
    for number, (pattern, value) in enumerate(sources):
        arch = ArchConfig.from_pattern(
            pattern, d_model=32, vocab_size=VOCAB,
            mamba2=Mamba2Spec(d_state=8, headdim=16, chunk_size=16),
            attention=AttentionSpec(n_heads=2), mlp=MLPSpec(multiplier=2.0))
        study.add_trial(create_trial(value=value, user_attrs={"pattern": pattern}))
        transaction(engine, lambda session, n=number, a=arch, v=value: Candidate.upsert(
            session, "promo", n, {
                "genome_hash": a.canonical_hash(), "pattern": a.pattern, "arch": a.to_dict(),
                "params": param_count(a), "task": "corpus", "task_fingerprint": {},
                "code_version": code_version(), "status": "trained",
                "objectives": {"bits_per_byte": v, "params": param_count(a)}}))
    engine.dispose()


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def test_promotion_section_is_parsed_and_checked(corpus, tmp_path):
    text = space_text(corpus, tmp_path / "cache", rung="{params: 4x}")
    stage = parse_space(text, check_task=False).promotion
    assert stage.top_k == 2 and stage.metric == "bits_per_byte"
    assert stage.baselines == ("transformer", "ssm")
    rung = stage.rungs[0]
    assert rung.target.ratio == 4 and rung.strategy == "both" and rung.train.steps == 12
    # The rung's train settings start from the space's.
    assert rung.train.batch_size == 4 and rung.train.lr == 0.003
    bad = {
        ("{params: 4y}", "strategy: both"): "promotion.rungs[0].scale.params",
        ("{params: 4x}", "strategy: grow"): "promotion.rungs[0].strategy",
    }
    for (rung_text, strategy), field in bad.items():
        with pytest.raises(ConfigError) as err:
            parse_space(space_text(corpus, tmp_path, rung=rung_text).replace(
                "strategy: both", strategy), check_task=False)
        assert err.value.field == field
    uneven = space_text(corpus, tmp_path, rung="{params: 4x}").replace(
        "workers_per_trial: 1", "workers_per_trial: 3")
    with pytest.raises(ConfigError, match="split evenly over 3 workers") as err:
        parse_space(uneven, check_task=False)
    line = next(i for i, text in enumerate(uneven.splitlines(), 1) if "workers_per_trial" in text)
    assert err.value.field == "promotion.rungs[0].workers_per_trial" and err.value.line == line
    seeded = space_text(corpus, tmp_path, rung="{params: 4x}").replace("steps: 12", "seed: 3")
    with pytest.raises(ConfigError, match="space's seed"):
        parse_space(seeded, check_task=False)


def test_baselines_swap_every_mixer_and_keep_the_rest(corpus, tmp_path):
    space = parse_space(space_text(corpus, tmp_path, rung="2x"), check_task=False)
    arch = ArchConfig.from_pattern(
        "M-*-m-", d_model=32, vocab_size=256, mamba2=Mamba2Spec(d_state=8, headdim=16),
        mamba1=Mamba1Spec(d_state=4), attention=AttentionSpec(n_heads=4, n_kv_heads=2))
    transformer = baseline(arch, PromotionRole.TRANSFORMER, space)
    ssm = baseline(arch, PromotionRole.SSM, space)
    assert transformer.pattern == "*-*-*-" and ssm.pattern == "M-M-m-"
    assert all(layer == arch.layers[2] for layer in transformer.layers if layer.type == "attention")
    assert ssm.layers[2] == arch.layers[0]  # the candidate's own Mamba-2 settings
    assert transformer.layers[1] == arch.layers[1]  # MLPs untouched
    pure = ArchConfig.from_pattern("M-M-", d_model=32, vocab_size=256,
                                   mamba2=Mamba2Spec(d_state=8, headdim=16))
    # No attention layer to copy: the space's attention settings (n_heads: 2).
    assert baseline(pure, PromotionRole.TRANSFORMER, space).layers[0] == AttentionSpec(n_heads=2)
    # Parallel blocks are mixers too (swapped by both baselines); MoE layers are per-token.
    mixed = ArchConfig.from_pattern(
        "PE*-M-", d_model=32, vocab_size=256, mamba2=Mamba2Spec(d_state=8, headdim=16),
        parallel=ParallelSpec(n_heads=2, d_state=8, headdim=16), attention=AttentionSpec(
            n_heads=4), moe=MoESpec(n_experts=4))
    assert baseline(mixed, PromotionRole.TRANSFORMER, space).pattern == "*E*-*-"
    assert baseline(mixed, PromotionRole.SSM, space).pattern == "MEM-M-"


def test_promoted_runs_link_to_their_sources_and_rerun_skips_them(corpus, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    url = f"sqlite:///{runs / 'promo.db'}"
    text = space_text(corpus, tmp_path / "cache", rung="{params: 3x}")
    make_proxy_study(url, text)
    space = parse_space(text, check_task=False)
    lines: list[str] = []
    summary = promote("promo", url, space=space, runs_dir=runs, echo=lines.append)
    assert summary.trained == 4 and summary.skipped == 0 and not summary.failed
    assert any("the same architecture as trial:2" in line for line in lines)

    engine = make_engine(url)
    with engine.connect() as conn:
        promoted = {row.key: row for row in conn.execute(sa.select(Promotion)).all()}
        curves = conn.execute(sa.select(CurvePoint.trial).where(
            CurvePoint.study == "promo.rung1").distinct()).scalars().all()
        candidates = {row.trial: row for row in conn.execute(sa.select(Candidate).where(
            Candidate.study == "promo.rung1")).all()}
    engine.dispose()
    # The top 2 distinct proxy trials (0: 2.10, 2: 2.20) and both baselines.
    assert set(promoted) == {"trial:0", "trial:2", "transformer", "ssm"}
    assert promoted["trial:0"].source_trial == 0 and promoted["trial:0"].proxy_value == 2.10
    assert promoted["transformer"].source_trial is None
    goal = 3 * max(promoted[k].source_params for k in ("trial:0", "trial:2"))
    rung_study = load_study(rung_study_name("promo", 1), url)
    trials = {t.user_attrs[KEY_ATTR]: t for t in rung_study.get_trials()}
    # The SSM baseline of the best ("M-*-" -> "M-M-") is trial 2's architecture: one run.
    assert set(trials) == {"trial:0", "trial:2", "transformer"}
    assert all(t.state == TrialState.COMPLETE for t in trials.values())
    trials["ssm"] = trials["trial:2"]
    for key, row in promoted.items():
        assert row.status == "trained" and row.rung == 1
        assert abs(row.params / goal - 1) <= 0.05, key
        trial = trials[key]
        assert row.run_trial == trial.number and row.value == pytest.approx(trial.value)
        assert trial.user_attrs["source_trial"] == (2 if key == "ssm" else row.source_trial)
        cand = candidates[trial.number]
        assert cand.status == "trained" and cand.params == row.params
        assert cand.objectives["bits_per_byte"] == pytest.approx(row.value)
        assert ArchConfig.from_dict(cand.arch).pattern == row.pattern
    assert set(curves) == {t.number for t in trials.values()}
    assert promoted["ssm"].genome_hash == promoted["trial:2"].genome_hash
    assert promoted["transformer"].pattern.count("M") == 0
    assert promoted["ssm"].pattern.count("*") == 0

    again = promote("promo", url, space=space, runs_dir=runs, echo=lines.append)
    assert again.trained == 0 and again.skipped == 4
    assert len(load_study(rung_study_name("promo", 1), url).get_trials()) == 3

    # The rung study lives in the proxy study's database: found by name alone.
    from hybridlab.cli import main

    assert main(["status", "--study", "promo.rung1", "--runs-dir", str(runs)]) == 0
    assert main(["status", "--runs-dir", str(runs)]) == 0  # "the only study" ignores rungs


def test_sources_rank_distinct_genomes_by_the_promoted_metric(corpus, tmp_path):
    url = f"sqlite:///{tmp_path / 'promo.db'}"
    text = space_text(corpus, tmp_path / "cache", rung="2x", top_k=3)
    # Trial 3 repeats trial 1's genome with a better value (a reused genome): counted once.
    make_proxy_study(url, text, sources=(*SOURCES, ("*-M-", 2.00)))
    space = parse_space(text, check_task=False)
    study = load_study("promo", url)
    sources = promotion_sources(study, "promo", url, space.promotion, space)
    assert [s.key for s in sources] == ["trial:3", "trial:0", "trial:2", "transformer", "ssm"]
    assert [s.proxy_value for s in sources[:3]] == [2.00, 2.10, 2.20]
    assert sources[3].arch.pattern == "*-*-" and sources[4].arch.pattern == "M-M-"
    no_baselines = replace(space.promotion, baselines=())
    assert len(promotion_sources(study, "promo", url, no_baselines, space)) == 3


def test_a_target_no_source_can_reach_is_recorded_as_failed(corpus, tmp_path):
    url = f"sqlite:///{tmp_path / 'promo.db'}"
    # Below the sources' own size: refused by the extrapolation, for every run.
    text = space_text(corpus, tmp_path / "cache", rung="{params: 1000}")
    make_proxy_study(url, text)
    space = parse_space(text, check_task=False)
    from hybridlab.search.promotion import PromotionFailed

    with pytest.raises(PromotionFailed, match="4 promoted run"):
        promote("promo", url, space=space, runs_dir=tmp_path / "runs", echo=lambda _: None)
    engine = make_engine(url)
    with engine.connect() as conn:
        statuses = conn.execute(sa.select(Promotion.status, Promotion.reason)).all()
    engine.dispose()
    assert len(statuses) == 4
    assert all(status == "failed" and reason for status, reason in statuses)


PROMOTE_SCRIPT = """
import sys
from hybridlab.search.promotion import promote
from hybridlab.search.space import parse_space
text = open(sys.argv[1]).read()
promote("promo", sys.argv[2], space=parse_space(text, check_task=False), runs_dir=sys.argv[3])
"""


@pytest.mark.slow
def test_a_promoted_run_killed_mid_training_resumes_from_its_checkpoint(corpus, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    url = f"sqlite:///{runs / 'promo.db'}"
    text = space_text(corpus, tmp_path / "cache", rung="{params: 2x}", steps=400,
                      checkpoint_every=5, top_k=1).replace("baselines", "#")
    text = text.replace("  top_k: 1\n", "  top_k: 1\n  baselines: []\n")
    make_proxy_study(url, text)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PROMOTE_SCRIPT, str(space_file), url,
                             str(runs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    checkpoints = runs / "promo" / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while not list(checkpoints.glob("*/step_*")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        assert list(checkpoints.glob("*/step_*")), "no checkpoint was written in time"
    finally:
        # The driver, its Ray and the training worker, all at once.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    engine = make_engine(url)
    with engine.connect() as conn:
        before = conn.execute(sa.select(Promotion.status)).scalars().all()
    engine.dispose()
    assert before == ["running"]

    space = parse_space(text, check_task=False)
    lines: list[str] = []
    summary = promote("promo", url, space=space, runs_dir=runs, echo=lines.append)
    assert summary.trained == 1
    trial = load_study(rung_study_name("promo", 1), url).get_trials()[0]
    assert trial.user_attrs["resumed_from_step"] >= 5
    assert any("resumed from step" in line for line in lines)


def test_promote_command_refuses_a_space_without_promotion(corpus, tmp_path, capsys):
    from hybridlab.cli import main

    runs = tmp_path / "runs"
    runs.mkdir()
    text = space_text(corpus, tmp_path / "cache", rung="2x")
    without = text[:text.index("promotion:")]
    make_proxy_study(f"sqlite:///{runs / 'promo.db'}", without)
    assert main(["promote", "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "promotion: the stored space of study 'promo' has no promotion section" in err
    other = tmp_path / "other.yaml"
    other.write_text(text.replace("top_k: 2", "top_k: 0"))
    assert main(["promote", "--runs-dir", str(runs), "--space", str(other)]) == 2
    assert "promotion.top_k: must be >= 1" in capsys.readouterr().err
    assert not list(runs.glob("promo/checkpoints/*"))


def test_a_baseline_equal_to_a_candidate_shares_its_run(corpus, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    url = f"sqlite:///{runs / 'promo.db'}"
    text = space_text(corpus, tmp_path / "cache", rung="2x", top_k=1)
    # The best trial has no attention: its SSM baseline is itself.
    make_proxy_study(url, text, sources=(("M-M-", 2.0), ("M-*-", 2.1)))
    space = parse_space(text, check_task=False)
    lines: list[str] = []
    summary = promote("promo", url, space=space, runs_dir=runs, echo=lines.append)
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = {row.key: row for row in conn.execute(sa.select(Promotion)).all()}
    engine.dispose()
    assert summary.trained == 3 and not summary.failed
    assert rows["ssm"].genome_hash == rows["trial:0"].genome_hash
    assert rows["ssm"].run_trial == rows["trial:0"].run_trial
    assert rows["ssm"].value == rows["trial:0"].value and rows["ssm"].status == "trained"
    assert "shares its run" in rows["ssm"].reason
    assert len(load_study(rung_study_name("promo", 1), url).get_trials()) == 2
