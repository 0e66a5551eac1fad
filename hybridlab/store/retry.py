"""Riding out a database outage: one retry rule for hybridlab's sessions and Optuna's storage.

A restarted PostgreSQL server (``pg_ctl restart``: under a second; a stop/start: tens of seconds)
breaks every pooled connection and refuses new ones until it is back. ``pool_pre_ping`` replaces a
broken connection; :func:`retrying` waits out the refusals with backoff for up to
``RETRY_SECONDS``. Only transient errors are retried (a lost or refused connection, a locked
SQLite file); a constraint violation or a bad query fails at once.

A retried write may have committed before its connection broke, so the non-idempotent calls of
:class:`RetryingRDBStorage` check what the first attempt left before repeating it.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.storages._rdb import models as optuna_models
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

T = TypeVar("T")

# Longer than the outages a search must survive (30 s) plus the reconnect.
RETRY_SECONDS = 60.0
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0
# Marks a trial with the id of the call that created it, so a retried creation finds it.
CREATION_TOKEN = "hl_creation_token"
# Marks a trial popped from the queue with the id of the call that claimed it (see
# ``RetryingRDBStorage._claim_waiting``).
CLAIM_TOKEN = "hl_claim_token"


def is_transient(err: BaseException) -> bool:
    """A lost, refused or locked connection: the same call may succeed a moment later."""
    if isinstance(err, optuna.exceptions.StorageInternalError):
        return err.__cause__ is not None and is_transient(err.__cause__)
    if isinstance(err, sa.exc.DBAPIError):
        if err.connection_invalidated:
            return True
        if isinstance(err.orig, sqlite3.Error):
            # SQLite's OperationalError also means "no such table" or "unable to open": only a
            # lock held past the busy timeout is worth another try.
            return "locked" in str(err.orig) or "busy" in str(err.orig)
        return isinstance(err, sa.exc.OperationalError | sa.exc.InterfaceError)
    return False


def retrying(work: Callable[[int], T], *, seconds: float = RETRY_SECONDS) -> T:
    """``work(attempt)`` (attempt 0, 1, ...), repeated after transient errors for ``seconds``."""
    deadline = time.monotonic() + seconds
    delay = FIRST_DELAY_S
    attempt = 0
    while True:
        try:
            return work(attempt)
        except Exception as err:
            if not is_transient(err) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, MAX_DELAY_S)
        attempt += 1


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    def call(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retrying(lambda _attempt: method(self, *args, **kwargs))

    call.__name__ = name
    call.__doc__ = method.__doc__
    return call


class RetryingRDBStorage(RDBStorage):
    """Optuna's RDB storage whose calls ride out database outages (see the module docstring).

    Reads and upserts (attributes, intermediate values, heartbeats) are repeated as they are;
    creating a study, a trial and changing a trial's state look first for the effect of an
    attempt that committed before its connection broke. Popping an enqueued trial is atomic.
    """

    def create_new_study(self, directions: Sequence[StudyDirection],
                         study_name: str | None = None) -> int:
        def attempt(n: int) -> int:
            if n and study_name is not None:
                try:
                    return RDBStorage.get_study_id_from_name(self, study_name)
                except KeyError:
                    pass
            return RDBStorage.create_new_study(self, directions, study_name)

        return retrying(attempt)

    def _create_new_trial(self, study_id: int,
                          template_trial: FrozenTrial | None = None) -> FrozenTrial:
        token = uuid.uuid4().hex
        if template_trial is None:
            template_trial = FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                datetime_complete=None, params={}, distributions={}, user_attrs={},
                system_attrs={}, intermediate_values={}, trial_id=-1)
        template = FrozenTrial(
            number=template_trial.number, state=template_trial.state, value=None,
            values=template_trial.values, datetime_start=template_trial.datetime_start,
            datetime_complete=template_trial.datetime_complete, params=template_trial.params,
            distributions=template_trial.distributions, user_attrs=template_trial.user_attrs,
            system_attrs={**template_trial.system_attrs, CREATION_TOKEN: token},
            intermediate_values=template_trial.intermediate_values,
            trial_id=template_trial._trial_id)

        def attempt(n: int) -> FrozenTrial:
            if n:
                created = self._trial_with_token(token)
                if created is not None:
                    return self.get_trial(created)
            return RDBStorage._create_new_trial(self, study_id, template)

        return retrying(attempt)

    def _trial_with_token(self, token: str) -> int | None:
        attrs = optuna_models.TrialSystemAttributeModel
        with self.engine.connect() as conn:
            return conn.execute(sa.select(attrs.trial_id).where(
                attrs.key == CREATION_TOKEN,
                attrs.value_json == json.dumps(token))).scalar_one_or_none()

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if state == TrialState.RUNNING and values is None:
            return self._claim_waiting(trial_id)

        def attempt(n: int) -> bool:
            if n:
                # A retry finding the state it asked for: the first attempt committed.
                current = RDBStorage.get_trial(self, trial_id)
                if current.state == state and (values is None or current.values == list(values)):
                    return True
            return RDBStorage.set_trial_state_values(self, trial_id, state, values)

        return retrying(attempt)

    def _claim_waiting(self, trial_id: int) -> bool:
        """WAITING -> RUNNING for exactly one caller: how Optuna pops an enqueued trial.

        Optuna reads the state with SELECT ... FOR UPDATE, which SQLite ignores, so two workers
        could both read WAITING and both run the trial. One conditional UPDATE is atomic on
        every backend. The winner also writes a token, so a retry after a lost connection tells
        its own committed claim from another worker's.
        """
        token = json.dumps(uuid.uuid4().hex)
        trials, attrs = optuna_models.TrialModel, optuna_models.TrialSystemAttributeModel

        def attempt(n: int) -> bool:
            with self.engine.begin() as conn:
                if n and conn.scalar(sa.select(attrs.value_json).where(
                        attrs.trial_id == trial_id, attrs.key == CLAIM_TOKEN)) == token:
                    return True
                won = conn.execute(sa.update(trials).where(
                    trials.trial_id == trial_id, trials.state == TrialState.WAITING,
                ).values(state=TrialState.RUNNING, datetime_start=datetime.now())).rowcount == 1
                if won:
                    # A retried trial is created with its predecessor's system attributes,
                    # this token among them.
                    conn.execute(sa.delete(attrs).where(attrs.trial_id == trial_id,
                                                        attrs.key == CLAIM_TOKEN))
                    conn.execute(sa.insert(attrs).values(trial_id=trial_id, key=CLAIM_TOKEN,
                                                         value_json=token))
            if not won:
                # As Optuna: a finished trial raises, an unknown one raises KeyError.
                self.check_trial_is_updatable(trial_id, RDBStorage.get_trial(self, trial_id).state)
            return won

        return retrying(attempt)


for _name in (
    "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "_set_trial_param", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_trial_user_attrs",
    "get_trial_system_attrs", "_get_trials", "_get_best_trial_id",
    "record_heartbeat", "_get_stale_trial_ids",
):
    setattr(RetryingRDBStorage, _name, _retried(_name))
