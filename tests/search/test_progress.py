"""Live progress of running trials: what workers record and what the driver prints from it."""

import optuna
import pytest

from hybridlab.search.progress import PROGRESS_ATTR, WRITE_SECONDS, TrialProgress, running_lines


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def study() -> optuna.Study:
    return optuna.create_study(storage=optuna.storages.InMemoryStorage())


def test_loss_updates_are_spaced_and_evaluations_written_at_once(study) -> None:
    clock = Clock()
    trial = study.ask()
    trial.set_user_attr("pattern", "M-*-")
    live = TrialProgress(trial, "mqar", 600, "accuracy", clock=clock)

    def stored() -> dict:
        return study.trials[trial.number].user_attrs[PROGRESS_ATTR]

    live.logged(10, 3.5)
    assert stored() == {"task": "mqar", "step": 10, "steps": 600, "metric": "accuracy",
                        "loss": 3.5, "time": 1000.0}
    clock.now += WRITE_SECONDS / 2
    live.logged(20, 3.0)
    assert stored()["step"] == 10  # too soon: not written
    clock.now += WRITE_SECONDS / 2
    live.logged(30, 2.5)
    assert (stored()["step"], stored()["loss"]) == (30, 2.5)
    clock.now += 1
    live.evaluated(40, {"accuracy": 0.25, "loss": 2.0})
    assert (stored()["step"], stored()["value"], stored()["time"]) == (40, 0.25, clock.now)

    assert running_lines(study, now=clock.now + 7) == [
        f"#{trial.number} M-*- mqar step 40/600 loss 2.5000 accuracy 0.25 (7 s ago)"]


def test_only_running_trials_that_reported_are_listed(study) -> None:
    clock = Clock()
    silent, done, busy = study.ask(), study.ask(), study.ask()
    for trial, task in ((done, "mad:compression"), (busy, "state:parity")):
        TrialProgress(trial, task, 100, "accuracy", clock=clock).logged(50, 0.5)
    study.tell(done, 0.9)
    lines = running_lines(study, now=clock.now)
    assert lines == [f"#{busy.number} ? state:parity step 50/100 loss 0.5000 (0 s ago)"]
    assert silent.number not in (int(line.split()[0][1:]) for line in lines)


def test_a_malformed_attribute_or_another_runs_trial_is_not_listed(study) -> None:
    clock = Clock()
    odd, other, mine = study.ask(), study.ask(), study.ask()
    odd.set_user_attr(PROGRESS_ATTR, {"step": "?"})
    for trial, run in ((other, "a"), (mine, "b")):
        trial.set_user_attr("run", run)
        TrialProgress(trial, "mqar", 10, "accuracy", clock=clock).logged(5, 1.0)
    assert [line.split()[0] for line in running_lines(study, now=clock.now)] == [
        f"#{other.number}", f"#{mine.number}"]
    assert running_lines(study, now=clock.now, run=("run", "b")) == [
        f"#{mine.number} ? mqar step 5/10 loss 1.0000 (0 s ago)"]


def test_a_failed_write_does_not_fail_training(study, monkeypatch) -> None:
    trial = study.ask()
    live = TrialProgress(trial, "mqar", 10, "accuracy")

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(trial, "set_user_attr", broken)
    live.logged(5, 1.0)
    live.evaluated(10, {"accuracy": 0.5})
    assert PROGRESS_ATTR not in study.trials[trial.number].user_attrs
