"""Search spaces: a YAML file -> a validated ``SearchSpace`` -> Optuna suggestions -> ArchConfig.

This module only samples: it never trains. Every error names the file, the field and the YAML line,
and is raised before anything is created in a database. ``seed_architectures:`` lists designs
(shipped layouts, arch files, foreign configs) to enqueue as the first trials, at the proxy size
``hybridlab.search.seeds`` makes; ``seed_params:`` sets their parameter goal.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import optuna

from hybridlab.config import (
    ArchConfig,
    ConfigError,
    LayerSpec,
    line_for,
    load_yaml_with_lines,
    read_text_file,
)
from hybridlab.cost import param_count
from hybridlab.errors import HybridlabError
from hybridlab.layers import LAYER_TYPES, mixer_types
from hybridlab.metrics import DEFAULT_OBJECTIVE, METRICS, metric_names
from hybridlab.train import TrainConfig

if TYPE_CHECKING:
    from hybridlab.scale import Target

SAMPLERS = ("tpe", "nsga2", "random", "bruteforce")
PRUNERS = ("none", "hyperband", "successive_halving", "median")
# numpy's and Optuna's samplers take 32-bit seeds; a worker's seed is (seed + rank) mod 2**32.
MAX_SEED = 2**32 - 1
# A larger study is a typo, not a plan: at minutes per trial it would never finish.
MAX_TRIALS = 100_000


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]


Param = IntRange | FloatRange | Choice


@dataclass(frozen=True, kw_only=True)
class PatternRules:
    attention_count: tuple[int, int | None] = (0, None)
    attention_fraction: tuple[float, float] = (0.0, 1.0)
    first_layer: tuple[str, ...] | None = None
    last_layer: tuple[str, ...] | None = None
    # "always": an MLP after every mixer (Transformer-style blocks); "never": no MLP layers;
    # "search": MLP is one more layer type to choose.
    mlp_after_mixer: Literal["always", "never", "search"] = "search"
    # Periodic template: every k-th mixer is attention and the others are not ("1 in k").
    attention_every: int | None = None
    # With mlp_after_mixer: always, the per-token layer after every k-th mixer is a
    # mixture-of-experts MLP instead (Jamba: every other one, k = 2); k may be searched, and
    # k = 0 places none (so a search can compare stacks with and without MoE).
    moe_every: Param | None = None


@dataclass(frozen=True, kw_only=True)
class ModelSpace:
    d_model: Param
    depth: IntRange
    layer_types: tuple[str, ...]
    layer_params: Mapping[str, Mapping[str, Param]]
    rules: PatternRules = PatternRules()
    tie_embeddings: bool = True
    # One setting per layer type for the whole stack, instead of one per layer.
    share_layer_params: bool = False


@dataclass(frozen=True, kw_only=True)
class Budgets:
    max_params: int | None = None
    max_active_params: int | None = None
    max_state_bytes: int | None = None
    state_context: int = 4096
    max_flops_per_token: float | None = None


@dataclass(frozen=True)
class ObjectiveSpec:
    metric: str
    direction: Literal["maximize", "minimize"]


@dataclass(frozen=True, kw_only=True)
class Resources:
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    # > 1: each trial trains data-parallel on this many Ray Train workers, each taking
    # cpus_per_worker / gpus_per_worker, while the search worker that runs the trial holds none.
    workers_per_trial: int = 1


@dataclass(frozen=True, kw_only=True)
class LMEvalStage:
    """lm-eval tasks run on the ``top_k`` best trials once the search has finished."""

    tasks: tuple[str, ...]
    top_k: int = 1
    limit: float | None = None


PROMOTION_BASELINES = ("transformer", "ssm")


@dataclass(frozen=True, kw_only=True)
class Rung:
    """One promotion rung: extrapolate to ``target`` by ``strategy`` and train with ``train``."""

    target: Target
    target_text: str  # as the space wrote it, for tables and the database
    strategy: str
    train: TrainConfig
    workers_per_trial: int = 1


@dataclass(frozen=True, kw_only=True)
class PromotionStage:
    """The ``top_k`` proxy winners and the baselines, retrained at each rung after the search.

    A relative target ("4x") multiplies the largest parameter count among the ``top_k`` sources;
    every run of a rung (candidates and baselines) aims at that one count, so they are compared
    at equal parameters.
    """

    top_k: int
    metric: str
    baselines: tuple[str, ...]
    rungs: tuple[Rung, ...]


@dataclass(frozen=True, kw_only=True)
class SeedSpec:
    """One ``seed_architectures:`` entry: a design to enqueue, at its full size as imported
    (``hybridlab.search.seeds`` makes its proxy)."""

    name: str
    source: str
    arch: ArchConfig
    # The entry's parameter goal; None: the space's seed_params or its typical candidate size.
    params: int | None = None


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    name: str
    seed: int
    task: str
    task_options: Mapping[str, Any]
    train: TrainConfig
    model: ModelSpace
    budgets: Budgets
    objectives: tuple[ObjectiveSpec, ...]
    sampler: str = "tpe"
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    pruner: str = "hyperband"
    # First step at which the pruner may judge a trial; see ``default_min_step``.
    pruner_min_step: int = 1
    trials: int = 8
    workers: int = 1
    resources: Resources = Resources()
    lm_eval: LMEvalStage | None = None
    promotion: PromotionStage | None = None
    seeds: tuple[SeedSpec, ...] = ()
    seed_params: int | None = None
    source: str | None = None

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


class _Reader:
    """Reads typed fields out of the parsed YAML, raising ConfigError with file and line."""

    def __init__(self, source: str | None, lines: Mapping[str, int]) -> None:
        self.source = source
        self.lines = lines

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(path, message, source=self.source, line=line_for(path, self.lines))

    def mapping(self, value: Any, path: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(path, f"must be a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                raise self.error(where, f"unknown field; expected one of {sorted(allowed)}")
        return value

    def integer(self, value: Any, path: str, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(path, f"must be at most {maximum}, got {value}")
        return value

    def number(self, value: Any, path: str, *, minimum: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(path, f"must be a number, got {value!r}")
        # NaN passes every comparison below and inf switches budgets off: both are typos.
        if not math.isfinite(value):
            raise self.error(path, f"must be a finite number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(path, f"must be >= {minimum}, got {value}")
        return float(value)

    def one_of(self, value: Any, path: str, options: Sequence[str]) -> str:
        if value not in options:
            raise self.error(path, f"must be one of {list(options)}, got {value!r}")
        return value

    def type_list(self, value: Any, path: str, allowed: Sequence[str]) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise self.error(path, "must be a non-empty list of layer types")
        for i, item in enumerate(items):
            self.one_of(item, f"{path}[{i}]", allowed)
        return tuple(items)

    def param(self, value: Any, path: str, kind: type,
              words: tuple[str, ...] | None = None, *, zero: bool = False) -> Param:
        """A search parameter: a fixed value, a list of choices, or {low, high[, step, log]};
        ``words``: the values a word field takes (a list of them is its choices); ``zero``:
        0 is a meaningful value (no shared expert), else every number is positive."""
        if isinstance(value, list):
            if not value:
                raise self.error(path, "empty list of choices")
            for i, item in enumerate(value):
                self._scalar(item, f"{path}[{i}]", kind, words, zero=zero)
            return Choice(tuple(value))
        if isinstance(value, Mapping) and words is None:
            self.mapping(value, path, ("low", "high", "step", "log"))
            for key in ("low", "high"):
                if key not in value:
                    raise self.error(f"{path}.{key}", "missing (a range needs low and high)")
            log = value.get("log", False)
            if not isinstance(log, bool):
                raise self.error(f"{path}.log", f"must be true or false, got {log!r}")
            if kind is int:
                # Every integer setting (widths, heads, states, depth) is positive.
                low = self.integer(value["low"], f"{path}.low", minimum=0 if zero else 1)
                high = self.integer(value["high"], f"{path}.high")
                step = self.integer(value.get("step", 1), f"{path}.step", minimum=1)
                result: Param = IntRange(low, high, step, log)
            else:
                low = self.number(value["low"], f"{path}.low")
                high = self.number(value["high"], f"{path}.high")
                if "step" in value:
                    raise self.error(f"{path}.step", "only integer ranges take a step")
                if low < 0 or (low == 0 and not zero):
                    raise self.error(f"{path}.low",
                                     f"must be {'>= 0' if zero else 'positive'}, got {low}")
                result = FloatRange(low, high, log)
            if low > high:
                raise self.error(path, f"low ({low}) > high ({high})")
            if log and low <= 0:
                raise self.error(f"{path}.low", "a log range needs low > 0")
            if log and isinstance(result, IntRange) and result.step != 1:
                raise self.error(f"{path}.step", "a log range cannot also have a step")
            return result
        self._scalar(value, path, kind, words, zero=zero)
        return Choice((value,))

    def _scalar(self, value: Any, path: str, kind: type,
                words: tuple[str, ...] | None = None, *, zero: bool = False) -> None:
        if words is not None:
            if value not in words:
                raise self.error(path, f"must be one of {list(words)}, got {value!r}")
            return
        if value is None:
            return
        if kind is bool:
            if not isinstance(value, bool):
                raise self.error(path, f"must be true or false, got {value!r}")
        elif kind is int:
            self.integer(value, path, minimum=0 if zero else 1)
        elif kind is float:
            self.number(value, path)
            if value < 0 or (value == 0 and not zero):
                raise self.error(path, f"must be {'>= 0' if zero else 'positive'}, got {value}")
        elif kind is str and value != "auto":
            self.integer(value, path, minimum=1)


TOP_KEYS = ("name", "seed", "task", "train", "model", "budgets", "objectives", "sampler",
            "pruner", "trials", "workers", "resources", "lm_eval", "promotion",
            "seed_architectures", "seed_params")


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    path = Path(path)
    return parse_space(read_text_file(path), source=str(path), default_name=path.stem)


def parse_space(
    text: str, *, source: str | None = None, default_name: str = "search", check_task: bool = True
) -> SearchSpace:
    data, lines = load_yaml_with_lines(text, source=source)
    r = _Reader(source, lines)
    top = r.mapping(data, "", TOP_KEYS)
    name = top.get("name", default_name)
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise r.error("name", f"must be letters, digits, '-' or '_', got {name!r}")
    seed = r.integer(top.get("seed", 0), "seed", minimum=0, maximum=MAX_SEED)

    task_data = r.mapping(top.get("task"), "task", ("name", "options"))
    if "name" not in task_data:
        raise r.error("task.name",
                      "missing (mqar | mad:<task> | state:<task> | corpus | corpus:<path>)")
    task = task_data["name"]
    if not isinstance(task, str):
        raise r.error("task.name", f"must be a string, got {task!r}")
    task_options = r.mapping(task_data.get("options"), "task.options",
                             tuple(task_data.get("options") or ()))

    train_data = r.mapping(top.get("train"), "train",
                           [f.name for f in dataclasses.fields(TrainConfig)])
    try:
        train = TrainConfig(**{**train_data, "seed": seed})
    except ConfigError as err:
        raise r.error(f"train.{err.field}", err.message) from None

    model = _parse_model(r, top.get("model"))
    budgets = _parse_budgets(r, top.get("budgets"))
    objectives = _parse_objectives(r, top.get("objectives"))

    sampler_data = top.get("sampler", "tpe")
    if isinstance(sampler_data, str):
        sampler_data = {"name": sampler_data}
    sampler_map = r.mapping(sampler_data, "sampler", ("name", "options"))
    sampler = r.one_of(sampler_map.get("name", "tpe"), "sampler.name", SAMPLERS)
    sampler_options = r.mapping(sampler_map.get("options"), "sampler.options",
                                tuple(sampler_map.get("options") or ()))
    pruner, min_step = _parse_pruner(r, top.get("pruner", "hyperband"), train)
    if pruner != "none" and len(objectives) > 1:
        raise r.error("pruner", "Optuna cannot prune multi-objective studies; use 'none'")
    if sampler == "bruteforce":
        _check_enumerable(r, model)

    res = r.mapping(top.get("resources"), "resources",
                    ("cpus_per_worker", "gpus_per_worker", "threads_per_worker",
                     "workers_per_trial"))
    resources = Resources(
        cpus_per_worker=r.number(res.get("cpus_per_worker", 1.0), "resources.cpus_per_worker",
                                 minimum=0),
        gpus_per_worker=r.number(res.get("gpus_per_worker", 0.0), "resources.gpus_per_worker",
                                 minimum=0),
        threads_per_worker=r.integer(res.get("threads_per_worker", 1),
                                     "resources.threads_per_worker", minimum=1),
        workers_per_trial=r.integer(res.get("workers_per_trial", 1),
                                    "resources.workers_per_trial", minimum=1),
    )
    if train.batch_size % resources.workers_per_trial:
        raise r.error("resources.workers_per_trial", f"batch_size {train.batch_size} must split "
                      f"evenly over {resources.workers_per_trial} workers (it is the global "
                      "batch)")
    if resources.workers_per_trial > 1 and pruner != "none":
        raise r.error("resources.workers_per_trial", "a data-parallel trial reports no "
                      "intermediate values to the pruner; use pruner: none")
    space = SearchSpace(
        name=name, seed=seed, task=task, task_options=dict(task_options), train=train,
        model=model, budgets=budgets, objectives=objectives, sampler=sampler,
        sampler_options=dict(sampler_options), pruner=pruner, pruner_min_step=min_step,
        trials=r.integer(top.get("trials", 8), "trials", minimum=1, maximum=MAX_TRIALS),
        workers=r.integer(top.get("workers", 1), "workers", minimum=1),
        resources=resources, lm_eval=_parse_lm_eval(r, top.get("lm_eval")), source=source,
        seeds=_parse_seeds(r, top.get("seed_architectures")),
        seed_params=None if top.get("seed_params") is None
        else _params_goal(r, top["seed_params"], "seed_params"),
    )
    if len(space.seeds) > space.trials:
        raise r.error("seed_architectures", f"{len(space.seeds)} seeds but only {space.trials} "
                      "trials: seeds are trials of the study")
    _check_feasible(r, space)
    if "promotion" in top:
        space = dataclasses.replace(space, promotion=_parse_promotion(r, top["promotion"], space))
    try:
        make_sampler(space, 0)
    except (TypeError, ValueError) as err:
        raise r.error("sampler.options", f"{sampler}: {err}") from None
    if check_task:
        vocab_size = _check_task(r, task, dict(task_options), seed, objectives, train)
        _check_seeds(r, space, vocab_size)
    return space


def make_sampler(space: SearchSpace, rank: int) -> optuna.samplers.BaseSampler:
    """Seeded per worker (seed + rank), so one worker repeats a run exactly."""
    seed = (space.seed + rank) % (MAX_SEED + 1)
    options = dict(space.sampler_options)
    if space.sampler == "tpe":
        # The constant liar keeps parallel workers from proposing the same point.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **options)
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **options)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.BruteForceSampler(seed=seed, **options)


def default_min_step(train: TrainConfig) -> int:
    """``max(eval_every, steps // 4)``: no candidate is judged on its first quarter of training.

    Synthetic recall tasks learn in a phase transition (MQAR's recall appears between steps 150
    and 300 in the shipped spaces), so a space for them sets ``pruner: {min_step: ...}`` past it.
    """
    return max(train.eval_every, train.steps // 4)


def _parse_pruner(r: _Reader, data: Any, train: TrainConfig) -> tuple[str, int]:
    """``pruner: NAME`` or ``pruner: {name: NAME, min_step: STEP}`` -> (name, min_step)."""
    if isinstance(data, str):
        data = {"name": data}
    p = r.mapping(data, "pruner", ("name", "min_step"))
    name = r.one_of(p.get("name", "hyperband"), "pruner.name", PRUNERS)
    if "min_step" not in p:
        return name, default_min_step(train)
    if name == "none":
        raise r.error("pruner.min_step", "pruner 'none' never prunes; remove min_step")
    min_step = r.integer(p["min_step"], "pruner.min_step", minimum=1)
    if min_step > train.steps:
        raise r.error("pruner.min_step",
                      f"must be at most train.steps ({train.steps}), got {min_step}")
    return name, min_step


# Successive halving keeps the best 1/3 at each rung (Optuna's default, and Hyperband's paper).
PRUNER_REDUCTION = 3
# The median pruner compares against completed trials; it waits for this many.
MEDIAN_STARTUP_TRIALS = 2


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    """The space's pruner; none judges a trial before ``space.pruner_min_step``."""
    min_step = space.pruner_min_step
    if space.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_step,
                                              max_resource=space.train.steps,
                                              reduction_factor=PRUNER_REDUCTION)
    if space.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_step,
                                                      reduction_factor=PRUNER_REDUCTION)
    if space.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS,
                                           n_warmup_steps=min_step)
    return optuna.pruners.NopPruner()


def describe_pruner(space: SearchSpace) -> str:
    """The pruner and its settings in one token, for prune notes: ``hyperband(min_step=300,
    reduction=3)``."""
    if space.pruner == "none":
        return "none"
    if space.pruner == "median":
        setting = f"startup_trials={MEDIAN_STARTUP_TRIALS}"
    else:
        setting = f"reduction={PRUNER_REDUCTION}"
    return f"{space.pruner}(min_step={space.pruner_min_step}, {setting})"


def _check_task(r: _Reader, task: str, options: dict[str, Any], seed: int,
                objectives: tuple[ObjectiveSpec, ...], train: TrainConfig) -> int:
    """Build the task once so a bad name or knob fails here, not inside every worker; returns
    the vocabulary the candidates get (the largest of a suite's tasks)."""
    from hybridlab.search.objective import make_tasks

    try:
        tasks = make_tasks(task, seed=seed, options=options)
    except (ValueError, TypeError) as err:
        try:
            make_tasks(task, seed=seed, options={})
        except (ValueError, TypeError):
            raise r.error("task.name", str(err)) from None
        raise r.error("task.options", str(err)) from None
    named = [(f"objectives[{i}].metric", o.metric) for i, o in enumerate(objectives)]
    if train.target is not None:
        named.append(("train.target_metric", train.target_metric))
    for field_path, name in named:
        metric = METRICS[name]
        if metric.only_from is not None and any(t.metric != metric.name for t in tasks):
            everywhere = [m.name for m in METRICS.values()
                          if m.kind == "task" and m.only_from is None]
            raise r.error(field_path, f"task {task!r} reports {' and '.join(everywhere)}, "
                          f"not {metric.name} (only {metric.only_from} do)")
    return max(t.vocab_size for t in tasks)


def _parse_model(r: _Reader, data: Any) -> ModelSpace:
    if data is None:
        raise r.error("model", "missing: the space needs a model section")
    keys = ("d_model", "depth", "layer_types", "rules", "tie_embeddings", "share_layer_params",
            *LAYER_TYPES)
    m = r.mapping(data, "model", keys)
    for required in ("d_model", "depth", "layer_types"):
        if required not in m:
            raise r.error(f"model.{required}", "missing")
    d_model = r.param(m["d_model"], "model.d_model", int)
    depth_value = m["depth"]
    if isinstance(depth_value, int) and not isinstance(depth_value, bool):
        depth_value = {"low": depth_value, "high": depth_value}
    depth = r.param(depth_value, "model.depth", int)
    if not isinstance(depth, IntRange):
        raise r.error("model.depth", "must be an integer or {low, high}")
    layer_types = r.type_list(m["layer_types"], "model.layer_types", tuple(LAYER_TYPES))
    if not set(layer_types) & set(mixer_types()):
        raise r.error("model.layer_types", "needs at least one mixer type besides mlp")
    rules = _parse_rules(r, m.get("rules"), layer_types)
    placed = (set(layer_types) | ({"mlp"} if rules.mlp_after_mixer == "always" else set())
              | ({"moe"} if rules.moe_every is not None else set()))
    layer_params: dict[str, dict[str, Param]] = {}
    for kind in LAYER_TYPES:
        kinds = LAYER_TYPES[kind].spec.field_kinds()
        block = r.mapping(m.get(kind), f"model.{kind}", tuple(kinds))
        if block and kind not in placed:
            raise r.error(f"model.{kind}", f"settings for {kind!r}, which is not in layer_types")
        spec = LAYER_TYPES[kind].spec
        layer_params[kind] = {
            key: r.param(value, f"model.{kind}.{key}", kinds[key], spec.words.get(key),
                         zero=key in spec.may_be_zero)
            for key, value in block.items()
        }
    tie = m.get("tie_embeddings", True)
    share = m.get("share_layer_params", False)
    for key, value in (("tie_embeddings", tie), ("share_layer_params", share)):
        if not isinstance(value, bool):
            raise r.error(f"model.{key}", f"must be true or false, got {value!r}")
    model = ModelSpace(d_model=d_model, depth=depth, layer_types=layer_types,
                       layer_params=layer_params, rules=rules, tie_embeddings=tie,
                       share_layer_params=share)
    _check_choices(r, model)
    return model


# Ranges longer than this are not enumerated for the load-time choice check; the sampler still
# rejects their invalid draws.
_MAX_ENUMERATED = 10_000


def _values(p: Param) -> list[Any] | None:
    """Every value a parameter can take, or None for a float or very long range."""
    if isinstance(p, Choice):
        return list(p.values)
    if isinstance(p, IntRange) and (p.high - p.low) // p.step < _MAX_ENUMERATED:
        return list(range(p.low, p.high + 1, p.step))
    return None


def _check_choices(r: _Reader, m: ModelSpace) -> None:
    """Refuse choice values that no draw of the fields they depend on makes valid.

    Such a value could only ever be rejected; combinations valid for some draws only are left to
    the sampler, which rejects the bad ones (it never changes a drawn value). Every combination
    of a type's settings and d_model is tried against the spec's own check, while there are at
    most ``_MAX_ENUMERATED`` of them.
    """
    widths = _values(m.d_model)
    for kind, params in m.layer_params.items():
        options = {key: _values(p) for key, p in params.items()}
        if widths is None or not options or any(v is None for v in options.values()):
            continue
        keys = list(options)
        combos = itertools.product(widths, *(options[k] for k in keys))
        if len(widths) * math.prod(len(options[k]) for k in keys) > _MAX_ENUMERATED:
            continue
        spec_cls = LAYER_TYPES[kind].spec
        valid: dict[str, set[Any]] = {key: set() for key in keys}
        why: dict[tuple[str, Any], str] = {}
        for d_model, *values in combos:
            try:
                spec_cls(**dict(zip(keys, values, strict=True))).check(d_model, kind)
            except ConfigError as err:
                for key, value in zip(keys, values, strict=True):
                    why.setdefault((key, value), err.message)
                continue
            for key, value in zip(keys, values, strict=True):
                valid[key].add(value)
        for key in keys:
            for value in options[key]:
                if value not in valid[key]:
                    others = [k for k in keys if k != key] + ["d_model"]
                    raise r.error(f"model.{kind}.{key}",
                                  f"{value!r} makes no valid {kind} layer for any choice of "
                                  f"{', '.join(others)} ({why[key, value]})")


def _range_pair(r: _Reader, value: Any, path: str, number: bool) -> tuple[Any, Any]:
    read = r.number if number else r.integer
    if isinstance(value, Mapping):
        r.mapping(value, path, ("min", "max"))
        low = read(value["min"], f"{path}.min", minimum=0) if "min" in value else 0
        high = read(value["max"], f"{path}.max", minimum=0) if "max" in value else None
    else:
        low = high = read(value, path, minimum=0)
    if high is not None and low > high:
        raise r.error(path, f"min ({low}) > max ({high})")
    return low, high


def _parse_rules(r: _Reader, data: Any, layer_types: tuple[str, ...]) -> PatternRules:
    keys = ("attention_count", "attention_fraction", "first_layer", "last_layer",
            "mlp_after_mixer", "attention_every", "moe_every")
    d = r.mapping(data, "model.rules", keys)
    count = _range_pair(r, d.get("attention_count", {}), "model.rules.attention_count", False)
    low_frac, high_frac = _range_pair(r, d.get("attention_fraction", {}),
                                      "model.rules.attention_fraction", True)
    high_frac = 1.0 if high_frac is None else high_frac
    if high_frac > 1:
        raise r.error("model.rules.attention_fraction.max", f"must be <= 1, got {high_frac}")
    mixers = tuple(t for t in layer_types if t in mixer_types()) or layer_types
    first = (r.type_list(d["first_layer"], "model.rules.first_layer", layer_types)
             if "first_layer" in d else None)
    last = (r.type_list(d["last_layer"], "model.rules.last_layer", layer_types)
            if "last_layer" in d else None)
    mlp_mode = d.get("mlp_after_mixer", "search")
    if isinstance(mlp_mode, bool):
        mlp_mode = "always" if mlp_mode else "never"
    mlp_mode = r.one_of(mlp_mode, "model.rules.mlp_after_mixer", ("always", "never", "search"))
    per_token = [t for t in layer_types if t not in mixer_types()]
    if mlp_mode != "search" and per_token:
        raise r.error("model.rules.mlp_after_mixer",
                      f"{mlp_mode!r} places the per-token layers itself; remove "
                      f"{', '.join(map(repr, per_token))} from layer_types (rules.moe_every "
                      "puts MoE in place of some MLPs)")
    moe_every = None
    if "moe_every" in d:
        moe_every = _moe_every(r, d["moe_every"])
        if mlp_mode != "always":
            raise r.error("model.rules.moe_every", "replaces some of the MLPs that "
                          "mlp_after_mixer: always places; with 'search', list 'moe' in "
                          "layer_types instead")
    for key, chosen in (("first_layer", first), ("last_layer", last)):
        if chosen and mlp_mode == "always" and "mlp" in chosen and key == "first_layer":
            raise r.error(f"model.rules.{key}", "with mlp_after_mixer: always the first layer "
                          "is a mixer")
        if chosen and set(chosen) - set(layer_types) - ({"mlp"} if mlp_mode == "always" else set()):
            raise r.error(f"model.rules.{key}", "lists a type that is not in layer_types")
    every = d.get("attention_every")
    if every is not None:
        every = r.integer(every, "model.rules.attention_every", minimum=1)
        for key in ("first_layer", "last_layer"):
            if key in d:
                raise r.error(f"model.rules.{key}", "cannot be combined with attention_every, "
                              "which fixes where attention goes")
        if "attention" not in layer_types:
            raise r.error("model.rules.attention_every", "needs 'attention' in layer_types")
        if every > 1 and not set(mixers) - {"attention"}:
            raise r.error("model.rules.attention_every",
                          "the non-attention layers need another mixer type in layer_types")
    if count[0] > 0 and "attention" not in layer_types:
        raise r.error("model.rules.attention_count", "asks for attention layers, but "
                      "'attention' is not in layer_types")
    return PatternRules(attention_count=count, attention_fraction=(low_frac, high_frac),
                        first_layer=first, last_layer=last, mlp_after_mixer=mlp_mode,
                        attention_every=every, moe_every=moe_every)


def _moe_every(r: _Reader, value: Any) -> Param:
    """An integer >= 0 (0: no MoE), a list of them, or {low, high}."""
    path = "model.rules.moe_every"
    if isinstance(value, Mapping):
        return r.param(value, path, int)
    values = value if isinstance(value, list) else [value]
    if not values:
        raise r.error(path, "empty list of choices")
    return Choice(tuple(r.integer(v, f"{path}[{i}]" if isinstance(value, list) else path,
                                  minimum=0) for i, v in enumerate(values)))


def _params_goal(r: _Reader, value: Any, path: str) -> int:
    """A parameter count (1M, 350k, 200000) for a seed's size."""
    from hybridlab.scale import parse_target

    try:
        target = parse_target(value, field=path)
    except ConfigError as err:
        raise r.error(err.field, err.message) from None
    if target.params is None:
        raise r.error(path, f"must be a parameter count such as 300k, got {value!r}")
    return target.params


def _parse_seeds(r: _Reader, data: Any) -> tuple[SeedSpec, ...]:
    """``seed_architectures:``: each entry a shipped layout's name or a path relative to the
    space file (an arch file, config.json, Megatron arguments or export folder), or a mapping
    {arch, name, params, lossy}."""
    from hybridlab import published
    from hybridlab.export.importing import import_config

    if data is None:
        return ()
    if not isinstance(data, list):
        raise r.error("seed_architectures", "must be a list of layout names, paths or "
                      "{arch, name, params, lossy}")
    here = Path(r.source).parent if r.source else Path()
    seeds: list[SeedSpec] = []
    for i, item in enumerate(data):
        path = f"seed_architectures[{i}]"
        entry = r.mapping({"arch": item} if isinstance(item, str) else item, path,
                          ("arch", "name", "params", "lossy"))
        source = entry.get("arch")
        if not isinstance(source, str) or not source:
            raise r.error(f"{path}.arch" if isinstance(item, Mapping) else path,
                          "must be a shipped layout "
                          f"({', '.join(published.names())}) or a path")
        lossy = entry.get("lossy", False)
        if not isinstance(lossy, bool):
            raise r.error(f"{path}.lossy", f"must be true or false, got {lossy!r}")
        located = (here / source).expanduser()
        if not located.exists() and source not in published.names():
            raise r.error(path, f"{source!r} is neither a shipped layout "
                          f"({', '.join(published.names())}) nor a file ({located})")
        try:
            imported = import_config(located if located.exists() else source, lossy=lossy)
        except HybridlabError as err:
            raise r.error(path, str(err)) from None
        name = entry.get("name", Path(source).stem if located.exists() else source)
        if not isinstance(name, str) or not name:
            raise r.error(f"{path}.name", f"must be a non-empty string, got {name!r}")
        if any(s.name == name for s in seeds):
            raise r.error(f"{path}.name", f"{name!r} names an earlier seed too; give each a "
                          "name")
        params = (None if entry.get("params") is None
                  else _params_goal(r, entry["params"], f"{path}.params"))
        seeds.append(SeedSpec(name=name, source=imported.source, arch=imported.arch,
                              params=params))
    return tuple(seeds)


def _check_seeds(r: _Reader, space: SearchSpace, vocab_size: int) -> None:
    """Make every seed's proxy once, so a seed no depth fits fails here, with its line."""
    from hybridlab.search.seeds import proxy_seeds

    try:
        proxy_seeds(space, vocab_size)
    except ConfigError as err:
        raise r.error(err.field, err.message) from None


def _parse_lm_eval(r: _Reader, data: Any) -> LMEvalStage | None:
    if data is None:
        return None
    d = r.mapping(data, "lm_eval", ("tasks", "top_k", "limit"))
    tasks = d.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(
            isinstance(t, str) and t for t in tasks):
        raise r.error("lm_eval.tasks", "must be a non-empty list of lm-eval task names")
    # A task given as a YAML file is read relative to the space file, wherever the search runs.
    here = Path(r.source).parent if r.source else Path()
    resolved = []
    for i, task in enumerate(tasks):
        if task.endswith((".yaml", ".yml")):
            path = (here / task).expanduser().resolve()
            if not path.is_file():
                raise r.error(f"lm_eval.tasks[{i}]", f"no task file {path}")
            task = str(path)
        resolved.append(task)
    limit = d.get("limit")
    return LMEvalStage(
        tasks=tuple(resolved),
        top_k=r.integer(d.get("top_k", 1), "lm_eval.top_k", minimum=1),
        limit=None if limit is None else r.number(limit, "lm_eval.limit", minimum=0),
    )


def _parse_promotion(r: _Reader, data: Any, space: SearchSpace) -> PromotionStage:
    from hybridlab.scale import STRATEGIES, parse_target
    from hybridlab.search.objective import SUITES

    d = r.mapping(data, "promotion", ("top_k", "baselines", "rungs"))
    if space.task in SUITES:
        raise r.error("promotion", f"promotes on one task; {space.task!r} is a suite")
    metric = next((o.metric for o in space.objectives if METRICS[o.metric].kind == "task"), None)
    if metric is None:
        raise r.error("promotion", "needs a task metric among the objectives (e.g. "
                      "bits_per_byte) to compare proxy and promoted runs")
    baselines = d.get("baselines", list(PROMOTION_BASELINES))
    if not isinstance(baselines, list):
        raise r.error("promotion.baselines", f"must be a list drawn from "
                      f"{list(PROMOTION_BASELINES)}, got {baselines!r}")
    for i, name in enumerate(baselines):
        r.one_of(name, f"promotion.baselines[{i}]", PROMOTION_BASELINES)
    rungs_data = d.get("rungs")
    if not isinstance(rungs_data, list) or not rungs_data:
        raise r.error("promotion.rungs", "must be a non-empty list of "
                      "{scale, strategy, train, workers_per_trial}")
    rungs = []
    for i, item in enumerate(rungs_data):
        path = f"promotion.rungs[{i}]"
        rd = r.mapping(item, path, ("scale", "strategy", "train", "workers_per_trial"))
        if "scale" not in rd:
            raise r.error(f"{path}.scale", "missing (e.g. {params: 4x} or {params: 1M})")
        try:
            target = parse_target(rd["scale"], field=f"{path}.scale")
        except ConfigError as err:
            raise r.error(err.field, err.message) from None
        strategy = r.one_of(rd.get("strategy", "both"), f"{path}.strategy", STRATEGIES)
        overrides = r.mapping(rd.get("train"), f"{path}.train",
                              [f.name for f in dataclasses.fields(TrainConfig)])
        if "seed" in overrides:
            raise r.error(f"{path}.train.seed", "is the space's seed; set it at the top level")
        try:
            train = dataclasses.replace(space.train, **overrides)
        except ConfigError as err:
            raise r.error(f"{path}.train.{err.field}", err.message) from None
        workers = r.integer(rd.get("workers_per_trial", 1), f"{path}.workers_per_trial",
                            minimum=1)
        if train.batch_size % workers:
            raise r.error(f"{path}.workers_per_trial", f"batch_size {train.batch_size} must "
                          f"split evenly over {workers} workers (it is the global batch)")
        rungs.append(Rung(target=target, target_text=target.describe(), strategy=strategy,
                          train=train, workers_per_trial=workers))
    return PromotionStage(
        top_k=r.integer(d.get("top_k", 3), "promotion.top_k", minimum=1),
        metric=metric, baselines=tuple(baselines), rungs=tuple(rungs))


def _parse_budgets(r: _Reader, data: Any) -> Budgets:
    b = r.mapping(data, "budgets",
                  ("max_params", "max_active_params", "max_state_bytes", "state_context",
                   "max_flops_per_token"))
    return Budgets(
        max_params=r.integer(b["max_params"], "budgets.max_params", minimum=1)
        if "max_params" in b else None,
        max_active_params=r.integer(b["max_active_params"], "budgets.max_active_params",
                                    minimum=1) if "max_active_params" in b else None,
        max_state_bytes=r.integer(b["max_state_bytes"], "budgets.max_state_bytes", minimum=1)
        if "max_state_bytes" in b else None,
        state_context=r.integer(b.get("state_context", 4096), "budgets.state_context", minimum=1),
        max_flops_per_token=r.number(b["max_flops_per_token"], "budgets.max_flops_per_token",
                                     minimum=1) if "max_flops_per_token" in b else None,
    )


def _parse_objectives(r: _Reader, data: Any) -> tuple[ObjectiveSpec, ...]:
    if data is None:
        return (ObjectiveSpec(DEFAULT_OBJECTIVE, METRICS[DEFAULT_OBJECTIVE].direction),)
    if not isinstance(data, list) or not data:
        raise r.error("objectives", "must be a non-empty list of {metric, direction}")
    result = []
    for i, item in enumerate(data):
        path = f"objectives[{i}]"
        o = r.mapping(item, path, ("metric", "direction"))
        if "metric" not in o:
            raise r.error(f"{path}.metric", "missing")
        metric = r.one_of(o["metric"], f"{path}.metric", metric_names())
        direction = r.one_of(o.get("direction", METRICS[metric].direction), f"{path}.direction",
                             ("maximize", "minimize"))
        result.append(ObjectiveSpec(metric, direction))
    if len({o.metric for o in result}) != len(result):
        raise r.error("objectives", "lists a metric twice")
    return tuple(result)


def _check_enumerable(r: _Reader, model: ModelSpace) -> None:
    params = [("model.d_model", model.d_model)] + [
        (f"model.{kind}.{key}", p) for kind, ps in model.layer_params.items()
        for key, p in ps.items()
    ]
    for path, p in params:
        if isinstance(p, FloatRange):
            raise r.error(path, "bruteforce needs lists or integer ranges, not a float range")


def _check_feasible(r: _Reader, space: SearchSpace) -> None:
    """Refuse rules and budgets that no architecture in the space can satisfy."""
    m, rules = space.model, space.model.rules
    count_low = rules.attention_count[0]
    if count_low > m.depth.high:
        raise r.error("model.rules.attention_count.min", f"asks for {count_low} attention layers "
                      f"but depth is at most {m.depth.high}")
    if not any(attention_rule_violation(rules, depth=depth, n_attention=n_attention,
                                        n_mixers=n_mixers) is None
               for depth, n_attention, n_mixers in _attention_counts(m)):
        raise r.error("model.rules", "no depth in the range has an attention count that meets "
                      "attention_count, attention_fraction (attention layers / mixer layers) "
                      "and attention_every together")
    if space.budgets.max_params is not None:
        smallest = _smallest_params(m, space)
        if smallest > space.budgets.max_params:
            raise r.error("budgets.max_params", f"{space.budgets.max_params} is below the "
                          f"smallest architecture in the space ({smallest} parameters)")


def _attention_counts(m: ModelSpace) -> Iterator[tuple[int, int, int]]:
    """Every (depth, attention layers, mixer layers) the layer types can produce."""
    has_attention = "attention" in m.layer_types
    other_mixer = any(t != "attention" for t in m.layer_types if t in mixer_types())
    # Only mlp_after_mixer: search puts MLPs (per-token layers) among the drawn layers.
    searched_mlp = any(t not in mixer_types() for t in m.layer_types)
    for depth in range(m.depth.low, m.depth.high + 1, m.depth.step):
        for n_mixers in range(1, depth + 1) if searched_mlp else (depth,):
            for n_attention in range(n_mixers + 1) if has_attention else (0,):
                if other_mixer or n_attention == n_mixers:
                    yield depth, n_attention, n_mixers


def attention_rule_violation(rules: PatternRules, *, depth: int, n_attention: int,
                             n_mixers: int) -> str | None:
    """Why a stack breaks the attention rules, or None: the one definition of those rules.

    ``depth`` counts the drawn layers (the mixers, plus MLPs when ``mlp_after_mixer: search``;
    never the MLPs that ``always`` adds after each mixer). The attention fraction is attention
    layers over mixer layers, so MLPs never dilute it.
    """
    if n_mixers == 0:
        return "no mixer layer (MLPs only)"
    low, high = rules.attention_count
    if n_attention < low or (high is not None and n_attention > high):
        return f"{n_attention} attention layers, the rules allow {low}..{high}"
    fraction = n_attention / n_mixers
    if not rules.attention_fraction[0] - 1e-9 <= fraction <= rules.attention_fraction[1] + 1e-9:
        return (f"attention fraction {fraction:.2f} ({n_attention} of {n_mixers} mixers) outside "
                f"{rules.attention_fraction}")
    if rules.attention_every is not None and n_attention != depth // rules.attention_every:
        return (f"{n_attention} attention layers in {depth}, attention_every "
                f"{rules.attention_every} places {depth // rules.attention_every}")
    return None


def _low(p: Param) -> Any:
    if isinstance(p, Choice):
        numeric = [v for v in p.values if isinstance(v, int | float) and not isinstance(v, bool)]
        return min(numeric) if numeric else p.values[0]
    return p.low


def _smallest_params(m: ModelSpace, space: SearchSpace) -> int:
    """A lower bound on parameters: the smallest d_model and depth, the cheapest layer type."""
    d_model = int(_low(m.d_model))
    vocab = int(space.task_options.get("vocab_size", 256))
    cheapest = None
    for kind in m.layer_types:
        settings = {k: _low(p) for k, p in m.layer_params.get(kind, {}).items()}
        try:
            spec = LAYER_TYPES[kind].spec(**{k: v for k, v in settings.items() if v is not None})
            params = param_count(ArchConfig(d_model=d_model, vocab_size=vocab, layers=(spec,)))
        except (ConfigError, TypeError):
            continue
        cheapest = params if cheapest is None else min(cheapest, params)
    if cheapest is None:
        return 0
    embed = vocab * d_model + d_model
    return embed + m.depth.low * (cheapest - embed)


def suggest(trial: optuna.Trial, name: str, param: Param) -> Any:
    if isinstance(param, Choice):
        if len(param.values) == 1:
            return param.values[0]
        return trial.suggest_categorical(name, list(param.values))
    if isinstance(param, IntRange):
        return trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
    return trial.suggest_float(name, param.low, param.high, log=param.log)


class Rejected(Exception):
    """A sampled architecture breaks a rule or a budget; it is recorded, never trained."""


def _layer_types(trial: optuna.Trial, m: ModelSpace, depth: int) -> list[str]:
    rules = m.rules
    mixers = [t for t in m.layer_types if t in mixer_types()]
    types = []
    for i in range(depth):
        if rules.attention_every is not None:
            if (i + 1) % rules.attention_every == 0:
                types.append("attention")
                continue
            choices = [t for t in (mixers if rules.mlp_after_mixer != "search" else m.layer_types)
                       if t != "attention"]
            name = f"layer{i}.type_non_attention"
        else:
            choices = list(m.layer_types)
            name = f"layer{i}.type"
            if i == 0 and rules.first_layer:
                choices, name = list(rules.first_layer), "first.type"
            elif i == depth - 1 and depth > 1 and rules.last_layer:
                choices, name = list(rules.last_layer), "last.type"
        types.append(choices[0] if len(choices) == 1 else trial.suggest_categorical(name, choices))
    return types


def _spec(trial: optuna.Trial, m: ModelSpace, kind: str, index: int, d_model: int) -> LayerSpec:
    prefix = kind if m.share_layer_params else f"layer{index}.{kind}"
    values = {key: suggest(trial, f"{prefix}.{key}", p)
              for key, p in m.layer_params.get(kind, {}).items()}
    spec = LAYER_TYPES[kind].spec(**values)
    try:
        # Rejected, never repaired: Optuna must record the values the model trains with.
        spec.check(d_model, f"layer {index}: {kind}")
    except ConfigError as err:
        raise Rejected(str(err)) from None
    return spec


def sample_architecture(trial: optuna.Trial, space: SearchSpace, vocab_size: int) -> ArchConfig:
    """Turn Optuna suggestions into an ArchConfig, or raise Rejected with the reason."""
    m = space.model
    d_model = suggest(trial, "d_model", m.d_model)
    depth = suggest(trial, "depth", m.depth)
    types = _layer_types(trial, m, depth)
    rules = m.rules
    reason = attention_rule_violation(rules, depth=depth, n_attention=types.count("attention"),
                                      n_mixers=sum(t in mixer_types() for t in types))
    if reason is not None:
        raise Rejected(reason)
    moe_every = (None if rules.moe_every is None
                 else suggest(trial, "moe_every", rules.moe_every))
    layers: list[LayerSpec] = []
    for i, kind in enumerate(types):
        layers.append(_spec(trial, m, kind, i, d_model))
        if rules.mlp_after_mixer == "always":
            after = "moe" if moe_every and (i + 1) % moe_every == 0 else "mlp"
            layers.append(_spec(trial, m, after, i, d_model))
    try:
        return ArchConfig(d_model=d_model, vocab_size=vocab_size, layers=tuple(layers),
                          tie_embeddings=m.tie_embeddings)
    except ConfigError as err:
        raise Rejected(f"invalid architecture: {err}") from None


def check_budgets(budgets: Budgets, costs: Mapping[str, float]) -> None:
    """Raise Rejected when a candidate's costs break a budget."""
    if budgets.max_params is not None and costs["params"] > budgets.max_params:
        raise Rejected(f"{int(costs['params'])} parameters > budget {budgets.max_params}")
    if (budgets.max_active_params is not None
            and costs["active_params"] > budgets.max_active_params):
        raise Rejected(f"{int(costs['active_params'])} active parameters > budget "
                       f"{budgets.max_active_params}")
    if budgets.max_state_bytes is not None and costs["state_bytes"] > budgets.max_state_bytes:
        raise Rejected(f"{int(costs['state_bytes'])} inference-state bytes at context "
                       f"{budgets.state_context} > budget {budgets.max_state_bytes}")
    if (budgets.max_flops_per_token is not None
            and costs["flops_per_token"] > budgets.max_flops_per_token):
        raise Rejected(f"{costs['flops_per_token']:.3g} FLOPs/token > budget "
                       f"{budgets.max_flops_per_token:.3g}")
