"""What a running trial is doing, for the driver to show while it trains.

A worker keeps its trial's latest task, step, train loss and test metric in the trial's
``progress`` user attribute (so any process reading the study sees it); the driver prints one line
per running trial of its run from it at a steady interval, between the lines it prints when
trials end. Progress is cosmetic: a failed write or a malformed attribute costs a line, never a
trial or the driver. Trials trained data-parallel (``workers_per_trial > 1``) report none.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial

PROGRESS_ATTR = "progress"
# A write is one storage round trip; a trial logs every few steps, so writes are spaced out.
WRITE_SECONDS = 5.0


class TrialProgress:
    """Records one trial's progress on one task; ``logged`` and ``evaluated`` are the trainer's
    ``on_log`` and evaluation hooks. Train-loss updates are written at most every
    ``WRITE_SECONDS``; an evaluation is written at once."""

    def __init__(self, trial: optuna.Trial, task: str, steps: int, metric: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._trial, self._clock = trial, clock
        self._state: dict = {"task": task, "step": 0, "steps": steps, "metric": metric}
        self._written = -WRITE_SECONDS

    def logged(self, step: int, loss: float) -> None:
        self._state.update(step=step, loss=loss)
        if self._clock() - self._written >= WRITE_SECONDS:
            self._write()

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        metric = self._state["metric"]
        self._state["step"] = step
        if metric in metrics:
            self._state["value"] = metrics[metric]
        self._write()

    def _write(self) -> None:
        now = self._clock()
        self._written = now
        # Storage errors are retried by the storage; one that still fails must not fail training.
        with contextlib.suppress(Exception):
            self._trial.set_user_attr(PROGRESS_ATTR, {**self._state, "time": now})


def running_lines(study: optuna.Study, now: float | None = None, *,
                  run: tuple[str, str] | None = None) -> list[str]:
    """One line per running trial that has reported progress, by trial number; with ``run`` =
    (user attribute, value), only the trials carrying it (one driver's)."""
    now = time.time() if now is None else now
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if run is not None:
        running = [t for t in running if t.user_attrs.get(run[0]) == run[1]]
    return [line for t in sorted(running, key=lambda t: t.number)
            if (line := describe(t, now)) is not None]


def describe(trial: FrozenTrial, now: float) -> str | None:
    """``#3 M-*- mqar step 400/600 loss 1.234 accuracy 0.52 (4 s ago)``, or None before the
    trial's first report (or for an attribute this module did not write)."""
    p = trial.user_attrs.get(PROGRESS_ATTR)
    try:
        line = (f"#{trial.number} {trial.user_attrs.get('pattern', '?')} {p['task']} "
                f"step {p['step']}/{p['steps']}")
        if "loss" in p:
            line += f" loss {p['loss']:.4f}"
        if "value" in p:
            line += f" {p['metric']} {p['value']:.4g}"
        return line + f" ({max(0.0, now - p['time']):.0f} s ago)"
    except (KeyError, TypeError, ValueError):
        return None
