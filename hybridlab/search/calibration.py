"""Does a space's proxy tell architectures apart? Train a fixed panel of reference architectures
at the space's width, depth and budget, over several seeds, on every task of the space; the
verdicts on the orderings the literature reports are ``hybridlab.store.calibration``'s.

The panel (``REFERENCES``): a transformer, pure Mamba-1, pure Mamba-2, and a Mamba-2 / attention
hybrid, each a stack of the space's mixer count (the middle of its depth range; at least two for
the hybrid, so that it holds both mixers) with an MLP after every mixer unless the space has
none, its sizes the middle values the space gives for each layer type
(``hybridlab.search.seeds.middle``). Each (reference, task, seed) trains a fresh model
(model and data seeded by ``space.seed + seed``) with the space's train settings, its steps scaled
by ``budget_scale``, and is stored in ``hl_calibration`` under a hash of everything it depends on
(the space's name, the reference's architecture, the tasks' fingerprints, the train settings,
the metric, the seed); a rerun skips what is stored, and a changed space trains afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy.engine import Engine

from hybridlab.config import ArchConfig, ConfigError, LayerSpec
from hybridlab.cost import param_count
from hybridlab.data.task import TaskData
from hybridlab.layers import SYMBOLS
from hybridlab.metrics import METRICS
from hybridlab.model import HybridLM
from hybridlab.search.objective import make_tasks
from hybridlab.search.seeds import middle
from hybridlab.search.space import Choice, SearchSpace
from hybridlab.store.calibration import Measured, store_run, stored_run
from hybridlab.train import OPERATIONAL_FIELDS, TrainConfig, train

# Each reference's mixers, cycled over the stack's mixer count.
REFERENCES: dict[str, str] = {"transformer": "*", "mamba1": "m", "mamba2": "M", "hybrid": "M*"}


def reference_arch(reference: str, space: SearchSpace, vocab_size: int) -> ArchConfig:
    """The panel member ``reference`` at the space's width, mixer count and layer sizes."""
    if reference not in REFERENCES:
        raise ConfigError("--references", f"unknown reference {reference!r}; expected one of "
                          f"{', '.join(REFERENCES)}")
    model = space.model
    depth = middle(model.depth)
    mode = model.rules.mlp_after_mixer
    # "search" counts MLPs among the layers: half of them are mixers.
    mixers = max(1, math.ceil(depth / 2)) if mode == "search" else depth
    cycle = REFERENCES[reference]
    mixers = max(mixers, len(cycle))  # a hybrid holds each of its mixers at least once
    pattern = "".join(cycle[i % len(cycle)] + ("" if mode == "never" else "-")
                      for i in range(mixers))
    layers = tuple(_sized(SYMBOLS[symbol].spec(), space) for symbol in pattern)
    arch = ArchConfig(d_model=middle(model.d_model), vocab_size=vocab_size, layers=layers,
                      tie_embeddings=model.tie_embeddings)
    return arch


def _sized(spec: LayerSpec, space: SearchSpace) -> LayerSpec:
    """The spec with the middle of each size the space searches; a choice that includes null
    (a sliding window or none) takes null, the layer's plain form."""
    given = space.model.layer_params.get(spec.type, {})
    return replace(spec, **{
        key: None if isinstance(param, Choice) and None in param.values else middle(param)
        for key, param in given.items()})


def target_metric(space: SearchSpace) -> str:
    """The space's first task objective (its first objective may be a cost), else accuracy."""
    for objective in space.objectives:
        if METRICS[objective.metric].kind == "task":
            return objective.metric
    return "accuracy"


def _settings_key(space: SearchSpace, metric: str, cfg: TrainConfig,
                  tasks: Sequence[TaskData]) -> str:
    """One calibration's settings, seeds and panel aside: the space, tasks, training, metric.
    Each run's key adds its own architecture, so panels split over several commands (or
    processes) add up to one calibration."""
    data = {"space": space.name, "metric": metric,
            "tasks": [task.fingerprint() for task in tasks],
            "train": {k: v for k, v in dataclasses.asdict(cfg).items()
                      if k not in OPERATIONAL_FIELDS | {"seed"}}}
    return _digest(data)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def check_scale(scale: float, flag: str) -> None:
    """A budget multiple must be a positive number (ConfigError naming ``flag``)."""
    if not scale > 0:
        raise ConfigError(flag, f"must be positive, got {scale}")


def check_panel(space: SearchSpace, references: Sequence[str]) -> list[TaskData]:
    """Refuse (ConfigError naming --references) an unknown, repeated or unbuildable reference
    before anything is written; the space's tasks at its seed."""
    if not references or len(set(references)) != len(references):
        raise ConfigError("--references", f"must name each reference once, got "
                          f"{','.join(references)!r}")
    tasks = make_tasks(space.task, seed=space.seed, options=dict(space.task_options))
    for reference in references:
        for task in tasks:
            reference_arch(reference, space, task.vocab_size)
    return tasks


def calibrate(
    space: SearchSpace,
    engine: Engine,
    *,
    seeds: int = 3,
    references: Sequence[str] = tuple(REFERENCES),
    budget_scale: float = 1.0,
    device: str = "cpu",
    echo: Callable[[str], Any] = print,
) -> list[Measured]:
    """Train (or read back) every (task, reference, seed) of the panel; see the module docstring.

    Each finished run is committed before the next starts, so an interrupted calibration
    resumes where it stopped. A run that diverges is reported and left out (not stored).
    """
    if seeds < 1:
        raise ConfigError("--seeds", f"must be at least 1, got {seeds}")
    check_scale(budget_scale, "--budget-scale")
    first = check_panel(space, references)
    metric = target_metric(space)
    steps = max(1, round(space.train.steps * budget_scale))
    cfg = replace(space.train, steps=steps, device=device)
    settings = _settings_key(space, metric, cfg, first)
    echo(f"calibrating {space.name!r}: {len(references)} references x {seeds} seeds x "
         f"{len(first)} task(s) at {steps} steps ({budget_scale:g}x the space's budget)")
    results = []
    for seed in range(seeds):
        tasks = make_tasks(space.task, seed=space.seed + seed, options=dict(space.task_options))
        for task in tasks:
            for reference in references:
                arch = reference_arch(reference, space, task.vocab_size)
                key = _digest({"settings": settings, "reference": reference,
                               "arch": arch.to_dict(), "task": task.fingerprint(),
                               "seed": seed})
                stored = stored_run(engine, key)
                if stored is None:
                    started = time.perf_counter()
                    model = HybridLM(arch, seed=space.seed + seed)
                    result = train(model, task, replace(cfg, seed=space.seed + seed))
                    if result.status == "diverged" or metric not in result.metrics:
                        echo(f"{task.name} {reference} seed {seed}: left out, {result.reason}")
                        continue
                    stored = Measured(task=task.name, reference=reference, pattern=arch.pattern,
                                      params=param_count(arch), seed=seed, metric=metric,
                                      value=float(result.metrics[metric]),
                                      seconds=time.perf_counter() - started,
                                      budget_scale=budget_scale, settings=settings)
                    store_run(engine, space.name, key, stored, steps)
                echo(f"{task.name} {reference} ({stored.pattern}) seed {seed}: {metric} "
                     f"{stored.value:.4g} in {stored.seconds:.1f} s")
                results.append(stored)
    return results
