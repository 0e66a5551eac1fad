"""Does a space's proxy tell architectures apart? Train a fixed panel of reference architectures
at the space's width, depth and budget, over several seeds, on every task of the space, and check
the orderings the literature reports.

The panel (``REFERENCES``): a transformer, pure Mamba-1, pure Mamba-2, and a Mamba-2 / attention
hybrid, each a stack of the space's mixer count (the middle of its depth range; at least two for
the hybrid, so that it holds both mixers) with an MLP after every mixer unless the space has
none, its sizes the middle values the space gives for each layer type
(``hybridlab.search.seeds.middle``). Each (reference, task, seed) trains a fresh model
(model and data seeded by ``space.seed + seed``) with the space's train settings, its steps scaled
by ``budget_scale``, and is stored in ``hl_calibration``; a rerun skips what is stored.

Published orderings checked per task (``EXPECTATIONS``):

- **attention ahead** (MQAR, Zoology; MAD's in-context, fuzzy and noisy recall and selective
  copying): every attention-containing reference beats every pure SSM. The margin is the gap
  between the worse attention-containing mean and the better SSM mean, in units of the seed
  spread (the root-mean-square of those two references' standard deviations); the ordering holds
  when the margin is positive, and separates when it is at least ``SEPARATION`` spreads.
- **mixer-blind** (MAD memorization): which mixer is used should not matter; the margin is
  (largest minus smallest reference mean) over the spread, and the expectation holds when it is
  below ``SEPARATION``.

Other tasks report means and spreads without a verdict. ``rank_agreement`` compares two budgets:
Spearman's correlation between the panel's rankings on each task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from scipy.stats import spearmanr
from sqlalchemy.engine import Engine

from hybridlab.config import ArchConfig, ConfigError, LayerSpec
from hybridlab.cost import param_count
from hybridlab.layers import SYMBOLS
from hybridlab.metrics import METRICS
from hybridlab.model import HybridLM
from hybridlab.search.objective import make_tasks
from hybridlab.search.seeds import middle
from hybridlab.search.space import Choice, SearchSpace
from hybridlab.store import CalibrationRun, transaction
from hybridlab.train import OPERATIONAL_FIELDS, TrainConfig, train

# Each reference's mixers, cycled over the stack's mixer count.
REFERENCES: dict[str, str] = {"transformer": "*", "mamba1": "m", "mamba2": "M", "hybrid": "M*"}
SEPARATION = 2.0
ATTENTION_AHEAD = "attention ahead"
MIXER_BLIND = "mixer-blind"
RECALL_TASKS = ("mqar", "mad:in_context_recall", "mad:fuzzy_in_context_recall",
                "mad:noisy_in_context_recall", "mad:selective_copying")
EXPECTATIONS: dict[str, str] = {**dict.fromkeys(RECALL_TASKS, ATTENTION_AHEAD),
                                "mad:memorization": MIXER_BLIND}


def has_attention(reference: str) -> bool:
    return "*" in REFERENCES[reference]


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


@dataclass(frozen=True)
class Measured:
    """One stored calibration run."""

    task: str
    reference: str
    pattern: str
    params: int
    seed: int
    metric: str
    value: float
    seconds: float
    budget_scale: float


def target_metric(space: SearchSpace) -> str:
    """The space's first task objective (its first objective may be a cost), else accuracy."""
    for objective in space.objectives:
        if METRICS[objective.metric].kind == "task":
            return objective.metric
    return "accuracy"


def _fingerprint(space: SearchSpace, reference: str, arch: ArchConfig, task: str,
                 cfg: TrainConfig, seed: int) -> str:
    data = {"reference": reference, "arch": arch.to_dict(), "task": task,
            "options": dict(space.task_options),
            "train": {k: v for k, v in dataclasses.asdict(cfg).items()
                      if k not in OPERATIONAL_FIELDS},
            "seed": seed}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


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
    resumes where it stopped.
    """
    if seeds < 1:
        raise ConfigError("--seeds", f"must be at least 1, got {seeds}")
    if not budget_scale > 0:
        raise ConfigError("--budget-scale", f"must be positive, got {budget_scale}")
    metric = target_metric(space)
    steps = max(1, round(space.train.steps * budget_scale))
    # Check every reference builds before anything trains.
    vocab = make_tasks(space.task, seed=space.seed, options=dict(space.task_options))[0].vocab_size
    for reference in references:
        reference_arch(reference, space, vocab)
    results = []
    for seed in range(seeds):
        tasks = make_tasks(space.task, seed=space.seed + seed, options=dict(space.task_options))
        for task in tasks:
            for reference in references:
                arch = reference_arch(reference, space, task.vocab_size)
                cfg = replace(space.train, steps=steps, seed=space.seed + seed, device=device)
                key = _fingerprint(space, reference, arch, task.name, cfg, seed)
                stored = _stored(engine, key)
                if stored is None:
                    started = time.perf_counter()
                    model = HybridLM(arch, seed=space.seed + seed)
                    result = train(model, task, cfg)
                    stored = Measured(task=task.name, reference=reference, pattern=arch.pattern,
                                      params=param_count(arch), seed=seed, metric=metric,
                                      value=float(result.metrics[metric]),
                                      seconds=time.perf_counter() - started,
                                      budget_scale=budget_scale)
                    _store(engine, space.name, key, stored, steps)
                echo(f"{task.name} {reference} ({stored.pattern}) seed {seed}: {metric} "
                     f"{stored.value:.4g} in {stored.seconds:.1f} s")
                results.append(stored)
    return results


def _stored(engine: Engine, key: str) -> Measured | None:
    row = transaction(engine, lambda s: s.scalars(
        sa.select(CalibrationRun).where(CalibrationRun.fingerprint == key)).first())
    if row is None:
        return None
    return Measured(task=row.task, reference=row.reference, pattern=row.pattern,
                    params=row.params, seed=row.seed, metric=row.metric, value=row.value,
                    seconds=row.seconds, budget_scale=row.budget_scale)


def _store(engine: Engine, space: str, key: str, m: Measured, steps: int) -> None:
    def add(session) -> None:
        if session.scalars(sa.select(CalibrationRun.id)
                           .where(CalibrationRun.fingerprint == key)).first() is None:
            session.add(CalibrationRun(
                space=space, fingerprint=key, budget_scale=m.budget_scale, task=m.task,
                reference=m.reference, pattern=m.pattern, params=m.params, seed=m.seed,
                metric=m.metric, value=m.value, steps=steps, seconds=m.seconds))
    transaction(engine, add)


@dataclass(frozen=True)
class Summary:
    """A reference's values on one task across seeds."""

    mean: float
    spread: float  # sample standard deviation (0 for one seed)
    n: int
    seconds: float  # mean training time of one run


@dataclass(frozen=True)
class Verdict:
    task: str
    metric: str
    summaries: dict[str, Summary]
    expectation: str | None
    margin: float | None  # in seed spreads; inf when the spread is 0 and the gap is not
    held: bool | None
    separated: bool | None


def _summaries(runs: Iterable[Measured]) -> dict[str, dict[str, Summary]]:
    grouped: dict[str, dict[str, list[Measured]]] = {}
    for m in runs:
        grouped.setdefault(m.task, {}).setdefault(m.reference, []).append(m)
    return {task: {ref: Summary(
        mean=statistics.fmean(m.value for m in ms),
        spread=statistics.stdev([m.value for m in ms]) if len(ms) > 1 else 0.0,
        n=len(ms), seconds=statistics.fmean(m.seconds for m in ms)) for ref, ms in refs.items()}
        for task, refs in grouped.items()}


def _in_spreads(gap: float, spreads: Sequence[float]) -> float:
    spread = math.sqrt(statistics.fmean(s * s for s in spreads))
    if spread == 0:
        return math.copysign(math.inf, gap) if gap else 0.0
    return gap / spread


def verdicts(runs: Iterable[Measured]) -> list[Verdict]:
    """Each task's summaries and, where the literature gives one, its ordering verdict."""
    runs = list(runs)
    metric_of = {m.task: m.metric for m in runs}
    out = []
    for task, summaries in _summaries(runs).items():
        metric = metric_of[task]
        sign = 1.0 if METRICS[metric].direction == "maximize" else -1.0
        expectation = EXPECTATIONS.get(task)
        margin = held = separated = None
        if expectation == ATTENTION_AHEAD:
            attn = [r for r in summaries if has_attention(r)]
            ssm = [r for r in summaries if not has_attention(r)]
            if attn and ssm:
                worst = min(attn, key=lambda r: sign * summaries[r].mean)
                best = max(ssm, key=lambda r: sign * summaries[r].mean)
                gap = sign * (summaries[worst].mean - summaries[best].mean)
                margin = _in_spreads(gap, [summaries[worst].spread, summaries[best].spread])
                held, separated = margin > 0, margin >= SEPARATION
        elif expectation == MIXER_BLIND and len(summaries) > 1:
            means = [s.mean for s in summaries.values()]
            margin = _in_spreads(max(means) - min(means), [s.spread for s in summaries.values()])
            held, separated = margin < SEPARATION, None
        out.append(Verdict(task=task, metric=metric, summaries=summaries,
                           expectation=expectation, margin=margin, held=held,
                           separated=separated))
    return out


def rank_agreement(cheap: Iterable[Measured], dear: Iterable[Measured]) -> dict[str, float]:
    """Per task, Spearman's correlation between the panel's mean values at two budgets (NaN
    when either ranking is constant)."""
    a, b = _summaries(cheap), _summaries(dear)
    out = {}
    for task in a.keys() & b.keys():
        refs = sorted(a[task].keys() & b[task].keys())
        if len(refs) < 2:
            continue
        with warnings.catch_warnings():  # a constant ranking: NaN, said in the docstring
            warnings.simplefilter("ignore")
            rho = spearmanr([a[task][r].mean for r in refs], [b[task][r].mean for r in refs])[0]
        out[task] = float(rho)
    return out


def format_report(found: Sequence[Verdict]) -> str:
    """A table: per task, each reference's mean +- spread (n), then the verdict and margin."""
    refs = list(dict.fromkeys(r for v in found for r in v.summaries))
    header = ["task", "metric", *refs, "expectation", "margin", "held", "min/candidate"]
    rows = []
    for v in found:
        cells = [v.task, v.metric]
        for r in refs:
            s = v.summaries.get(r)
            cells.append("-" if s is None else f"{s.mean:.3f}+-{s.spread:.3f} ({s.n})")
        cells.append(v.expectation or "-")
        cells.append("-" if v.margin is None else f"{v.margin:.2f}")
        verdict = "-" if v.held is None else ("yes" if v.held else "NO")
        if v.separated is not None:
            verdict += ", separated" if v.separated else ", not separated"
        cells.append(verdict)
        cells.append(f"{statistics.fmean(s.seconds for s in v.summaries.values()) / 60:.2f}")
        rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
             for row in (header, *rows)]
    per_candidate = sum(statistics.fmean(s.seconds for s in v.summaries.values()) for v in found)
    lines.append(f"minutes per candidate (every task, mean over the panel): "
                 f"{per_candidate / 60:.2f}")
    return "\n".join(lines)
