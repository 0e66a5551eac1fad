"""seed_architectures: validated at load time, made at the space's proxy size from the design's
layout and the space's layer sizes, enqueued once as a study's first trials, trained as given and
labelled."""

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hybridlab import published
from hybridlab.config import ArchConfig, AttentionSpec, ConfigError, Mamba2Spec
from hybridlab.cost import param_count
from hybridlab.search import runner
from hybridlab.search.seeds import blocks, proxy_seeds, sample_blocks, typical_params
from hybridlab.search.space import load_space, parse_space
from hybridlab.search.status import study_table
from hybridlab.store import (
    SEED_ARCH_ATTR,
    SEED_ATTR,
    SEED_RULE_ATTR,
    Candidate,
    make_engine,
    session_scope,
)
from hybridlab_dashboard.data import StudyDatabase

TINY_SPACE = (Path(__file__).parent / "tiny_space.yaml").read_text()
VOCAB = 64


def seeded(entries: str, *, trials: int = 6, extra: str = "") -> str:
    return TINY_SPACE.replace("trials: 4", f"trials: {trials}") + (
        f"seed_architectures:\n{entries}{extra}")


def test_seeds_are_made_from_the_design_layout_and_the_space_sizes():
    space = parse_space(seeded("  - nemotron-h-8b\n  - jamba-v0.1-dense\n"))
    nemotron, jamba = proxy_seeds(space, VOCAB)
    for seed, design in ((nemotron, "nemotron-h-8b"), (jamba, "jamba-v0.1-dense")):
        source = published.layout(design)
        arch = seed.arch
        assert (arch.d_model, arch.vocab_size) == (32, VOCAB)
        assert arch.tie_embeddings == source.tie_embeddings
        # Every block kind of the design, and no other, in the design's order of kinds.
        kinds = {tuple(s.type for s in b) for b in blocks(source.layers)}
        assert {tuple(s.type for s in b) for b in blocks(arch.layers)} == kinds
        assert param_count(arch) <= 100_000  # the space's budget
        assert seed.params == param_count(arch) and seed.name in seed.rule
    mamba = next(s for s in nemotron.arch.layers if isinstance(s, Mamba2Spec))
    # The space's sizes (d_state 8, headdim 16, chunk 16), the design's expand and 8 groups
    # would not divide 4 heads: ngroups is a size the space leaves to hybridlab's default.
    assert (mamba.d_state, mamba.headdim, mamba.chunk_size, mamba.expand, mamba.ngroups) == (
        8, 16, 16, 2, 1)
    attention = next(s for s in nemotron.arch.layers if isinstance(s, AttentionSpec))
    # The space's 2 heads at Nemotron-H's GQA ratio of 4 (one KV head), no RoPE as there.
    assert (attention.n_heads, attention.kv_heads(), attention.rope) == (2, 1, False)


def test_the_goal_defaults_to_the_median_sampled_candidate_and_can_be_set():
    space = parse_space(seeded("  - samba-421m\n"))
    (samba,) = proxy_seeds(space, VOCAB)
    assert samba.goal == typical_params(space, VOCAB)
    assert "median of 64 candidates" in samba.rule
    bigger = parse_space(seeded("  - {arch: samba-421m, params: 90k}\n"))
    (stacked,) = proxy_seeds(bigger, VOCAB)
    assert stacked.goal == 90_000 and stacked.arch.n_layers > samba.arch.n_layers
    # Stacked by whole units of the design: m-*- repeated.
    assert stacked.arch.pattern == "m-*-" * (stacked.arch.n_layers // 4)
    assert "stack" in stacked.rule
    assert proxy_seeds(parse_space(seeded("  - samba-421m\n", extra="seed_params: 90k\n")),
                       VOCAB)[0].arch == stacked.arch


def test_sampled_blocks_keep_order_and_every_kind():
    unit = tuple("AAAABAAAAC")
    for count in range(3, len(unit) + 1):
        picked = sample_blocks(unit, count)
        assert len(picked) == count and set(picked) == {"A", "B", "C"}
        rest = iter(unit)
        assert all(block in rest for block in picked)  # a subsequence: the design's order


@pytest.mark.parametrize(("entries", "field", "words"), [
    ("  - nemotron\n", "seed_architectures[0]", "neither a shipped layout"),
    ("  - {arch: samba-421m, params: 4x}\n", "seed_architectures[0].params",
     "must be a parameter count"),
    ("  - samba-421m\n  - samba-421m\n", "seed_architectures[1].name", "earlier seed"),
    ("  - {arch: samba-421m, lossy: yes please}\n", "seed_architectures[0].lossy",
     "true or false"),
    ("  - {model: samba-421m}\n", "seed_architectures[0].model", "unknown field"),
])
def test_bad_seed_entries_name_the_field_and_line(tmp_path, entries, field, words):
    path = tmp_path / "space.yaml"
    path.write_text(seeded(entries))
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert err.value.field == field and words in err.value.message
    assert err.value.source == str(path) and err.value.line is not None


def test_seeds_count_toward_trials_and_must_fit_the_budget(tmp_path):
    with pytest.raises(ConfigError, match="2 seeds but only 1 trials"):
        parse_space(seeded("  - samba-421m\n  - bamba-9b\n", trials=1))
    tight = seeded("  - jamba-v0.1-dense\n").replace("max_params: 100000", "max_params: 20000")
    with pytest.raises(ConfigError, match=r"seed_architectures\[0\]: jamba-v0.1-dense fits none"):
        parse_space(tight)


def test_a_foreign_config_seeds_through_the_importer(tmp_path):
    arch = ArchConfig.from_pattern("M*", d_model=64, vocab_size=100,
                                   mamba2=Mamba2Spec(headdim=16, d_state=16),
                                   attention=AttentionSpec(n_heads=4, n_kv_heads=2))
    arch.save(tmp_path / "mine.yaml")
    path = tmp_path / "space.yaml"
    path.write_text(seeded("  - mine.yaml\n"))
    (seed,) = proxy_seeds(load_space(path), VOCAB)
    assert seed.name == "mine" and seed.arch.pattern == "M*"
    assert seed.arch.layers[1].kv_heads() == 1  # 2 heads at the ratio 2


def run_worker(text: str, tmp_path: Path, *, trials: int) -> tuple[optuna.Study, int]:
    """prepare_study then one in-process worker (no Ray) to the end of the study; the study
    and how many trials were queued before the worker started."""
    space = parse_space(text)
    opts = runner.RunOptions(study="tiny", storage_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                             trials=trials, workers=1, artifacts_dir=tmp_path / "runs",
                             poll_seconds=0.01, heartbeat_interval=1, grace_period=2)
    seeds = runner.seed_trials(space)
    study = runner.prepare_study(space, text, opts, seeds=seeds)
    # A second driver on the same study (or a restart before any trial ran) queues nothing.
    runner.prepare_study(space, text, opts, seeds=seeds)
    waiting = len(study.get_trials(states=(TrialState.WAITING,)))
    runner.worker_loop(text, None, opts, 0)
    return study, waiting


def test_seeds_are_queued_once_trained_first_and_labelled(tmp_path):
    text = seeded("  - samba-421m\n  - nemotron-h-8b\n", trials=3)
    study, waiting = run_worker(text, tmp_path, trials=3)
    assert waiting == 2
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.user_attrs.get(SEED_ATTR) for t in trials] == ["samba-421m", "nemotron-h-8b", None]
    assert all(t.state == TrialState.COMPLETE for t in trials[:2])
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with session_scope(engine) as session:
        rows = Candidate.of_study(session, "tiny")
        for t in trials[:2]:
            assert rows[t.number].arch == t.user_attrs[SEED_ARCH_ATTR]
            assert rows[t.number].status == "trained"
            assert t.user_attrs[SEED_ATTR] in t.user_attrs[SEED_RULE_ATTR]
    engine.dispose()
    # The status table and the dashboard say which trials are seeds, and from what.
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    rows = study_table("tiny", url).splitlines()[2:]
    assert ["seed samba-421m" in rows[0], "seed nemotron-h-8b" in rows[1], "seed" in rows[2]] == [
        True, True, False]
    database = StudyDatabase(url)
    shown = sorted(database.snapshot("tiny")["trials"], key=lambda t: t["number"])
    database.close()
    assert [t["seed"] and t["seed"]["name"] for t in shown] == ["samba-421m", "nemotron-h-8b", None]
    assert shown[0]["seed"]["rule"] == trials[0].user_attrs[SEED_RULE_ATTR]
    # A resumed study (more trials, same seeds) queues none of them again.
    again, waiting = run_worker(text, tmp_path, trials=4)
    assert waiting == 0
    assert sum(SEED_ATTR in t.user_attrs for t in again.get_trials()) == 2
    assert again.user_attrs[runner.SEEDS_ATTR] == ["samba-421m", "nemotron-h-8b"]


def test_a_search_through_ray_trains_its_seeds_first(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(seeded("  - bamba-9b\n", trials=3))
    summary = runner.run_search(path, runs_dir=tmp_path / "runs", echo=lambda line: None,
                                heartbeat_interval=1, grace_period=4)
    study = optuna.load_study(study_name="tiny", storage=summary.storage_url)
    first = min(study.get_trials(), key=lambda t: t.number)
    assert summary.finished == 3 and first.user_attrs[SEED_ATTR] == "bamba-9b"
    assert first.state == TrialState.COMPLETE
