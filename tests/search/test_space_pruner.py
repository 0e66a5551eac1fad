"""The pruner's minimum step: no pruner judges a candidate before it."""

from pathlib import Path

import numpy as np
import optuna
import pytest

from hybridlab.config import ConfigError
from hybridlab.search.space import describe_pruner, load_space, make_pruner, parse_space

ROOT = Path(__file__).resolve().parents[2]
TINY_SPACE = (Path(__file__).parent / "tiny_space.yaml").read_text()


def space_text(pruner: str, *, steps: int = 600, eval_every: int = 50) -> str:
    text = TINY_SPACE.replace("pruner: none", f"pruner: {pruner}")
    return text.replace("steps: 20", f"steps: {steps}").replace(
        "eval_every: 10", f"eval_every: {eval_every}")


def first_pruned_steps(space, n_trials: int = 12, seed: int = 0) -> list[int]:
    """Run fake trials (each a seeded, noisy, steadily learning curve) under the space's pruner."""
    study = optuna.create_study(direction=space.directions[0], pruner=make_pruner(space),
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    rng = np.random.default_rng(seed)
    pruned = []
    for _ in range(n_trials):
        trial = study.ask()
        quality = rng.uniform(0, 1)
        for step in range(space.train.eval_every, space.train.steps + 1, space.train.eval_every):
            trial.report(quality * step / space.train.steps + rng.normal(0, 0.01), step)
            if trial.should_prune():
                pruned.append(step)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, quality)
    return pruned


@pytest.mark.parametrize("name", ["hyperband", "successive_halving", "median"])
def test_no_pruner_judges_before_min_step(name):
    space = parse_space(space_text(f"{{name: {name}, min_step: 300}}"))
    assert space.pruner == name and space.pruner_min_step == 300
    pruned = first_pruned_steps(space)
    # Some candidates are cut (the pruner is live), none before step 300.
    assert pruned and min(pruned) >= 300, pruned


def test_plain_name_prunes_from_the_default_min_step():
    # Default: max(eval_every, steps // 4) = 150 here, where the old pruner judged at 50.
    space = parse_space(space_text("median"))
    assert space.pruner_min_step == 150
    pruned = first_pruned_steps(space)
    assert pruned and min(pruned) >= 150, pruned
    assert parse_space(space_text("median", steps=600, eval_every=200)).pruner_min_step == 200


@pytest.mark.parametrize(("pruner", "field", "words"), [
    ("{name: hyperband, min_step: 0}", "pruner.min_step", ">= 1"),
    ("{name: hyperband, min_step: 601}", "pruner.min_step", "at most train.steps (600)"),
    ("{name: hyperband, min_step: 1.5}", "pruner.min_step", "integer"),
    ("{name: hyperband, min_steps: 300}", "pruner.min_steps", "unknown field"),
    ("{name: none, min_step: 300}", "pruner.min_step", "never prunes"),
    ("{name: hyperbnd}", "pruner.name", "must be one of"),
    ("hyperbnd", "pruner.name", "must be one of"),
])
def test_bad_pruner_settings_name_the_field(tmp_path, pruner, field, words):
    path = tmp_path / "space.yaml"
    path.write_text(space_text(pruner))
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert (info.value.field, info.value.source) == (field, str(path))
    assert words in info.value.message
    assert "pruner:" in path.read_text().splitlines()[info.value.line - 1]


@pytest.mark.parametrize(("pruner", "described"), [
    ("{name: hyperband, min_step: 300}", "hyperband(min_step=300, reduction=3)"),
    ("successive_halving", "successive_halving(min_step=150, reduction=3)"),
    ("{name: median, min_step: 200}", "median(min_step=200, startup_trials=2)"),
    ("none", "none"),
])
def test_describe_pruner(pruner, described):
    assert describe_pruner(parse_space(space_text(pruner))) == described


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_mqar_spaces_wait_for_the_recall_transition(path):
    # MQAR recall appears between steps 150 and 300: pruning earlier cuts the learners.
    space = load_space(path)
    if space.pruner != "none" and space.task == "mqar":
        assert 300 <= space.pruner_min_step <= space.train.steps
