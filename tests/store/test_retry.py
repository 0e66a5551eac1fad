"""Storage calls retried after a connection broke behind a committed write do not repeat it."""

import sqlite3
import threading

import optuna
import pytest
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.storages._rdb import models as optuna_models
from optuna.trial import TrialState

import hybridlab.store.retry
from hybridlab.store import RetryingRDBStorage, engine_kwargs, is_transient, retrying


def lost_connection() -> optuna.exceptions.StorageInternalError:
    """What Optuna raises when the server went away during a commit."""
    cause = sa.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))
    err = optuna.exceptions.StorageInternalError("commit failed")
    err.__cause__ = cause
    return err


def fail_after_first_commit(monkeypatch, name: str) -> list[int]:
    """Make RDBStorage.<name> commit, then report a lost connection, once."""
    calls: list[int] = []
    original = getattr(RDBStorage, name)

    def flaky(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise lost_connection()
        return result

    monkeypatch.setattr(RDBStorage, name, flaky)
    return calls


def test_retried_trial_creation_that_had_committed_creates_no_duplicate(tmp_path, monkeypatch):
    storage = RetryingRDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=storage, study_name="s")
    calls = fail_after_first_commit(monkeypatch, "_create_new_trial")
    trial = study.ask()
    assert len(calls) == 1
    assert [t.number for t in study.get_trials()] == [trial.number] == [0]


def test_retried_completion_that_had_committed_does_not_fail_the_trial(tmp_path, monkeypatch):
    storage = RetryingRDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    fail_after_first_commit(monkeypatch, "set_trial_state_values")
    study.tell(trial, 0.5)
    (done,) = study.get_trials()
    assert done.state == TrialState.COMPLETE and done.value == 0.5


def test_only_transient_errors_are_retried():
    attempts: list[int] = []

    def integrity(attempt: int) -> None:
        attempts.append(attempt)
        raise sa.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(sa.exc.IntegrityError):
        retrying(integrity)
    assert attempts == [0]
    assert is_transient(lost_connection())
    no_table = sqlite3.OperationalError("no such table: hl_run")
    assert not is_transient(sa.exc.OperationalError("SELECT", {}, no_table))
    locked = sqlite3.OperationalError("database is locked")
    assert is_transient(sa.exc.OperationalError("INSERT", {}, locked))
    assert not is_transient(optuna.exceptions.StorageInternalError("too long a string"))


@pytest.mark.parametrize(("read", "model"), [
    ("get_trial_user_attrs", "TrialUserAttributeModel"),
    ("get_trial_system_attrs", "TrialSystemAttributeModel"),
])
def test_trial_attribute_reads_ride_out_a_lost_connection(tmp_path, monkeypatch, read, model):
    storage = RetryingRDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    trial.set_user_attr("k", 1)
    storage.set_trial_system_attr(trial._trial_id, "k", 1)
    rows = getattr(optuna_models, model)
    original, calls = rows.where_trial_id, []

    def flaky(trial_id, session):
        calls.append(1)
        if len(calls) == 1:
            raise lost_connection()
        return original(trial_id, session)

    monkeypatch.setattr(rows, "where_trial_id", staticmethod(flaky))
    assert getattr(storage, read)(trial._trial_id)["k"] == 1
    assert len(calls) == 2


def claim_concurrently(url: str, storage_class, workers: int, waiting: int) -> dict[int, int]:
    """``workers`` threads, each with its own storage, pop ``waiting`` enqueued trials as
    Optuna's ``_pop_waiting_trial_id`` does; how many threads won each trial."""
    study = optuna.create_study(storage=storage_class(url), study_name="s")
    for x in range(waiting):
        study.enqueue_trial({"x": float(x)})
    ids = [t._trial_id for t in study.get_trials()]
    start = threading.Barrier(workers)
    wins = dict.fromkeys(ids, 0)
    lock = threading.Lock()

    def claim() -> None:
        storage = storage_class(url, engine_kwargs=engine_kwargs(url))
        start.wait()
        for trial_id in ids:
            if storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                with lock:
                    wins[trial_id] += 1
        storage.engine.dispose()

    threads = [threading.Thread(target=claim) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins


def test_a_waiting_trial_is_claimed_by_exactly_one_worker(storage_url):
    # SQLite ignores Optuna's SELECT ... FOR UPDATE, so two workers could both read WAITING and
    # both run the trial (seen in CI as "Cannot tell a COMPLETE trial" on a resumed search).
    wins = claim_concurrently(storage_url, RetryingRDBStorage, workers=6, waiting=40)
    assert list(wins.values()) == [1] * 40
    study = optuna.load_study(study_name="s", storage=storage_url)
    assert all(t.state == TrialState.RUNNING and t.datetime_start is not None
               for t in study.get_trials())


def test_a_retried_claim_tells_its_own_committed_claim_from_another_workers(tmp_path,
                                                                           monkeypatch):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(storage=RetryingRDBStorage(url), study_name="s")
    for x in (0.0, 1.0):
        study.enqueue_trial({"x": x})
    mine, theirs = (t._trial_id for t in study.get_trials())
    RetryingRDBStorage(url).set_trial_state_values(theirs, TrialState.RUNNING)
    # Every call runs twice, as when the first attempt committed and then lost its connection.
    monkeypatch.setattr(hybridlab.store.retry, "retrying",
                        lambda work, **_: (work(0), work(1))[1])
    storage = RetryingRDBStorage(url)
    assert storage.set_trial_state_values(mine, TrialState.RUNNING) is True
    assert storage.set_trial_state_values(theirs, TrialState.RUNNING) is False
    study.tell(study.trials[1].number, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(theirs, TrialState.RUNNING)
