"""Best and top-k trial selection against a brute-force ranking, on both database backends."""

import random

import optuna
import pytest

from hybridlab.store import best_trials, load_study, top_trials


def _study(url: str, directions: list[str], values: list[list[float]]) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=url, directions=directions)
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=v, params={},
                                                  distributions={}))
    # A failed trial has no values and must never be selected.
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    return load_study("s", url)


def _naive_pareto(values: list[list[float]], directions: list[str]) -> list[int]:
    signs = [1 if d == "minimize" else -1 for d in directions]
    keyed = [[s * x for s, x in zip(signs, v, strict=True)] for v in values]
    front = []
    for i, a in enumerate(keyed):
        dominated = any(all(y <= x for x, y in zip(a, b, strict=True)) and b != a
                        for b in keyed)
        if not dominated:
            front.append(i)
    return front


@pytest.mark.parametrize("seed", [0, 1])
def test_single_objective_best_and_top(storage_url, seed):
    rng = random.Random(seed)
    # Rounded values make ties, which go to the earlier trial.
    values = [[round(rng.uniform(0, 1), 1)] for _ in range(9)]
    study = _study(storage_url, ["maximize"], values)
    order = sorted(range(len(values)), key=lambda i: (-values[i][0], i))
    assert [t.number for t in top_trials(study, 4)] == order[:4]
    assert [t.number for t in top_trials(study, 100)] == order
    assert [t.value for t in best_trials(study)] == [values[order[0]][0]]


@pytest.mark.parametrize("directions", [["minimize", "maximize"], ["minimize", "minimize"]])
def test_several_objectives_select_the_pareto_front(storage_url, directions):
    rng = random.Random(len(directions[1]))
    values = [[rng.randint(0, 5), rng.randint(0, 5)] for _ in range(12)]
    study = _study(storage_url, directions, values)
    front = _naive_pareto(values, directions)
    assert [t.number for t in best_trials(study)] == front
    sign = 1 if directions[0] == "minimize" else -1
    by_first = sorted(front, key=lambda i: (sign * values[i][0], i))
    assert [t.number for t in top_trials(study, 2)] == by_first[:2]


def test_no_complete_trial_selects_nothing(storage_url):
    study = _study(storage_url, ["minimize"], [])
    assert best_trials(study) == []
    assert top_trials(study, 3) == []
