"""``make_task``: a task spec string and knob overrides -> a ``TaskData``."""

from __future__ import annotations

import dataclasses
from typing import Any

from hybridlab.data.corpus import CorpusConfig, CorpusTask
from hybridlab.data.state_tracking import STATE_TASKS
from hybridlab.data.synthetic import MAD_TASKS, MQAR, SyntheticTask
from hybridlab.data.task import TaskData

SPECS = ("mqar", *(f"mad:{name}" for name in MAD_TASKS),
         *(f"state:{name}" for name in STATE_TASKS), "corpus", "corpus:<path>")


def _config(cls: type, spec: str, overrides: dict[str, Any]) -> Any:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"task {spec!r}: unknown knob {unknown[0]!r}; "
                         f"valid knobs: {', '.join(valid)}")
    try:
        return cls(**overrides)
    except ValueError as e:
        raise ValueError(f"task {spec!r}: {e}") from e


def task_knobs(spec: str) -> dict[str, Any]:
    """The knobs of a task spec and their defaults."""
    cls = _config_class(spec)
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def _task_class(spec: str) -> type[SyntheticTask] | None:
    if spec == "mqar":
        return MQAR
    if spec.startswith("mad:"):
        # MAD-lab spells task names with hyphens; accept both.
        name = spec.removeprefix("mad:").replace("-", "_")
        if name in MAD_TASKS:
            return MAD_TASKS[name]
    if spec.startswith("state:"):
        name = spec.removeprefix("state:").replace("-", "_")
        if name in STATE_TASKS:
            return STATE_TASKS[name]
    return None


def _config_class(spec: str) -> type:
    task = _task_class(spec)
    if task is not None:
        return task.config_class
    if spec == "corpus" or spec.startswith("corpus:"):
        return CorpusConfig
    raise ValueError(f"unknown task {spec!r}; valid tasks: {', '.join(SPECS)}")


def make_task(spec: str, *, seed: int, **overrides: Any) -> TaskData:
    """Build a task from its spec and knob overrides.

    ``spec``: "mqar", "mad:<task>" (in_context_recall, fuzzy_in_context_recall,
    noisy_in_context_recall, selective_copying, compression, memorization), "state:<task>"
    (parity, modular_addition, permutation: see ``state_tracking``), "corpus" (the
    default offline corpus) or "corpus:<path>" (a text file, a folder of text files, or JSONL).
    ``overrides`` set the knobs of the task's config (``task_knobs(spec)`` lists them). ``seed``
    fixes a synthetic task's data; a corpus split does not depend on it.
    Unknown tasks or knobs raise ValueError naming them and listing the valid ones.
    """
    config = _config(_config_class(spec), spec, overrides)
    task = _task_class(spec)
    if task is not None:
        return task(config, seed=seed)
    path = spec.removeprefix("corpus").removeprefix(":")
    if spec.startswith("corpus:") and not path:
        raise ValueError("task 'corpus:' needs a path after the colon (or use 'corpus')")
    return CorpusTask(path or None, config)
