"""Extrapolate an architecture found at proxy scale to a target size: stack, stretch or both.

Composer (Acun et al., "Composer: A Search Framework for Hybrid Neural Architecture Design",
arXiv 2510.00379, FAIR at Meta) searches hybrids at small scale and extrapolates the top
candidates to 350M-3B parameters (8B in its v2) with two strategies, *stacking* and
*stretching*. hybridlab implements them as issue 11 defines them, with these rules:

- **The unit.** The shortest prefix of the layer list whose repetition is the whole list, layer
  settings compared exactly ("M-M-" has the unit "M-"; "M-M-*-" is its own unit). Depth only
  changes by whole units, so every result's pattern is the source's unit repeated.
- **stack**: repeat the unit, d_model and every layer setting unchanged. The attention fraction
  and the relative positions of the attention layers are exactly the source's.
- **stretch**: keep the layer list (depth unchanged) and grow d_model, every layer growing with
  it: attention heads at fixed head_dim, n_kv_heads in proportion so the GQA ratio
  n_heads / n_kv_heads is kept; Mamba-2 heads at fixed headdim with ngroups kept; Mamba-1
  d_inner = expand * d_model; the MLP multiplier kept; d_state kept (``scale_d_state`` grows it
  with d_model, rounded); dt_rank "auto" stays auto, an explicit dt_rank grows with d_model
  (rounded up, as "auto" is); d_conv, chunk_size, RoPE and sliding windows kept.
- **both** (the default): stretch and stack at once, depth following width as the GPT-3 model
  family does (Brown et al., arXiv 2005.14165, Table 2.1: from 125M, 12 layers x 768, to 175B,
  96 layers x 12288, width grows x16 and depth x8): depth ratio = width ratio ** 0.75. Of the
  (lattice width, whole unit count) pairs whose unit count is that rule rounded down or up at
  their width, it takes the one nearest the goal; where the lattice is too coarse for any of
  them to land within tolerance, the pair within tolerance whose depth is nearest the rule.
- **The width lattice.** d_model must keep every layer valid after the stretch: whole KV heads
  (d_model a multiple of d / gcd(d, n_kv_heads) for source width d) and whole Mamba-2 heads in
  whole groups (expand * d_model a multiple of headdim * ngroups). Those values are the
  multiples of one step (``width_step``); the search walks that lattice, never rounds off it.
- **The goal.** A parameter count (absolute, or a ratio of the source's) or forward FLOPs per
  token at ``context``; the search takes the lattice width and unit count nearest the goal and
  refuses, with the nearest values it could reach, when that is not within ``tolerance``. A
  target below the source, a depth over ``MAX_LAYERS`` or a width over ``MAX_D_MODEL`` is
  refused too. An explicit shape (d_model and/or depth) is taken as given when it fits the
  strategy, the unit and the lattice, and refused with the nearest valid values when not.

vocab_size, tie_embeddings and norm_eps are always kept.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, get_args

from hybridlab.config import (
    ArchConfig,
    ConfigError,
    LayerSpec,
)
from hybridlab.cost import ModelCost, cost_report, flops_per_token, param_count
from hybridlab.units import UnitRule, format_bytes, format_count, format_scaled

Strategy = Literal["stack", "stretch", "both"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
# GPT-3's family: depth x8 while width x16 (see the module docstring).
DEPTH_EXPONENT = 0.75
# No published dense LM is deeper than ~130 layers or wider than ~26k; these caps refuse
# extrapolations that only a goal far past the source can ask for.
MAX_LAYERS = 512
MAX_D_MODEL = 65536
# Parameter counts are written with B for billions, as model names are.
PARAMS = UnitRule(base=1000, units=("", "k", "M", "B", "T"), separator="")
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_NUMBER = re.compile(
    r"^\s*(?P<number>[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(?P<suffix>[kmbgtx]?)\s*$", re.IGNORECASE)
_KINDS = ("params", "ratio", "flops_per_token", "d_model", "depth")


class ScaleError(ConfigError):
    """An extrapolation cannot be done as asked; ``field`` names the flag or field at fault."""


@dataclass(frozen=True, kw_only=True)
class Target:
    """What to extrapolate to: exactly one of a parameter count, a ratio of the source's
    parameters, forward FLOPs per token, or an explicit shape (d_model and/or depth in layers)."""

    params: int | None = None
    ratio: float | None = None
    flops_per_token: float | None = None
    d_model: int | None = None
    depth: int | None = None

    def __post_init__(self) -> None:
        kinds = [name for name in ("params", "ratio", "flops_per_token")
                 if getattr(self, name) is not None]
        if self.is_shape:
            kinds.append("shape")
        if len(kinds) != 1:
            raise ScaleError("target", "give exactly one of params, ratio, flops_per_token or a "
                             f"shape (d_model and/or depth); got {kinds or 'none'}")
        for name in _KINDS:
            value = getattr(self, name)
            integer = name in ("params", "d_model", "depth")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
                kind = "an integer" if integer else "a number"
                raise ScaleError(f"target.{name}", f"must be {kind}, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ScaleError(f"target.{name}", f"must be a positive number, got {value!r}")

    @property
    def is_shape(self) -> bool:
        return self.d_model is not None or self.depth is not None

    def describe(self) -> str:
        """The target in words: 1.3B params, 4x params, 2.6G FLOPs/token, d_model 1024, depth 24."""
        if self.params is not None:
            return f"{format_scaled(self.params, PARAMS)} params"
        if self.ratio is not None:
            return f"{self.ratio:g}x params"
        if self.flops_per_token is not None:
            return f"{format_count(self.flops_per_token)} FLOPs/token"
        parts = [f"d_model {self.d_model}"] if self.d_model is not None else []
        parts += [f"depth {self.depth}"] if self.depth is not None else []
        return ", ".join(parts)


def _number(value: Any, field: str, *, ratio_ok: bool) -> tuple[float, bool]:
    """(value, is_ratio) from 1300000000, "1.3B", "350M", "125k", "2.6G" or (if ``ratio_ok``)
    "4x"; anything else is a ScaleError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ScaleError(field, f"expected a number such as 1.3B, 350M or 4x, got {value!r}")
    if isinstance(value, str):
        match = _NUMBER.match(value)
        if match is None:
            examples = "1.3B, 350M, 125k or 4x" if ratio_ok else "2.6G or 350M"
            raise ScaleError(field, f"cannot read {value!r}; write a number with an optional "
                             f"suffix k, M, B/G, T{', or x for a ratio' if ratio_ok else ''} "
                             f"(e.g. {examples})")
        suffix = match["suffix"].lower()
        if suffix == "x" and not ratio_ok:
            raise ScaleError(field, f"{value!r}: a ratio is not allowed here; give an absolute "
                             "value such as 2.6G")
        number = float(match["number"])
        value = number if suffix == "x" else number * _SUFFIXES[suffix]
        is_ratio = suffix == "x"
    else:
        is_ratio = False
    if not math.isfinite(value) or value <= 0:
        raise ScaleError(field, f"must be positive and finite, got {value!r}")
    return float(value), is_ratio


def _params_target(value: Any, field: str) -> Target:
    number, is_ratio = _number(value, field, ratio_ok=True)
    if is_ratio:
        return Target(ratio=number)
    if number < 1:
        raise ScaleError(field, f"a parameter count must be at least 1, got {value!r}")
    return Target(params=round(number))


def _shape_value(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScaleError(field, f"must be a positive integer, got {value!r}")
    return value


def parse_target(value: str | int | float | Mapping[str, Any], *, field: str = "--to") -> Target:
    """A target from the command line or a config file.

    "1.3B", "350M", "125k", 1300000000: parameters; "4x", "2.5x": a ratio of the source's
    parameters; {"params": ...} the same; {"ratio": 4}; {"flops_per_token": "2.6G"};
    {"d_model": 1024, "depth": 24} (either or both). Errors name ``field``.
    """
    if not isinstance(value, Mapping):
        return _params_target(value, field)
    unknown = [key for key in value if key not in _KINDS]
    if unknown:
        raise ScaleError(f"{field}.{unknown[0]}", f"unknown key; expected one of {list(_KINDS)}")
    given = [key for key in _KINDS if key in value]
    kinds = {"d_model": "shape", "depth": "shape"}
    if len({kinds.get(key, key) for key in given}) != 1:
        raise ScaleError(field, "give exactly one of params, ratio, flops_per_token or a shape "
                         f"(d_model and/or depth); got {given or 'none'}")
    if "params" in value:
        return _params_target(value["params"], f"{field}.params")
    if "ratio" in value:
        number, _ = _number(value["ratio"], f"{field}.ratio", ratio_ok=True)
        return Target(ratio=number)
    if "flops_per_token" in value:
        number, _ = _number(value["flops_per_token"], f"{field}.flops_per_token",
                            ratio_ok=False)
        return Target(flops_per_token=number)
    return Target(**{key: _shape_value(value[key], f"{field}.{key}") for key in given})


@dataclass(frozen=True)
class Scaled:
    """An extrapolated architecture, its cost beside the source's, and how it was chosen."""

    source: ArchConfig
    config: ArchConfig
    strategy: str
    target: Target
    goal: float
    achieved: float
    error: float
    source_cost: ModelCost
    cost: ModelCost
    rule: str

    def report(self) -> str:
        """A text table: source vs scaled shape and cost, the error against the goal, the rule."""
        context = self.cost.context
        rows = [
            ("pattern", _pattern_text(self.source), _pattern_text(self.config)),
            ("layers", str(self.source.n_layers), str(self.config.n_layers)),
            ("d_model", str(self.source.d_model), str(self.config.d_model)),
            ("params", _params_text(self.source_cost.params), _params_text(self.cost.params)),
            (f"FLOPs/token @{context}", format_count(self.source_cost.flops_per_token),
             format_count(self.cost.flops_per_token)),
            (f"state @{context}", format_bytes(self.source_cost.state_bytes),
             format_bytes(self.cost.state_bytes)),
        ]
        width = max(len(row[0]) for row in rows)
        column = max(len(row[1]) for row in rows)
        lines = [f"{'':<{width}}  {'source':<{column}}  scaled ({self.strategy})"]
        lines += [f"{name:<{width}}  {before:<{column}}  {after}" for name, before, after in rows]
        if self.target.is_shape:
            lines.append(f"target: {self.target.describe()} (explicit shape)")
        else:
            kind = "flops" if self.target.flops_per_token is not None else "params"
            goal = ("" if self.target.params is not None
                    else f" = {_value_text(self.goal, kind)}")
            lines.append(f"target: {self.target.describe()}{goal}; achieved "
                         f"{_value_text(self.achieved, kind)} ({self.error:+.2%})")
        lines.append(f"rule: {self.rule}")
        lines.append("(state: bf16 cache, fp32 SSM state, one sequence; FLOPs: forward)")
        return "\n".join(lines)


def _params_text(n: int) -> str:
    return f"{n:,} ({format_scaled(n, PARAMS)})"


def _pattern_text(config: ArchConfig, *, limit: int = 40) -> str:
    """The pattern, or "(unit) x repeats" when it is long."""
    if len(config.pattern) <= limit:
        return config.pattern
    unit = repeating_unit(config.layers)
    text = "".join(spec.symbol for spec in unit)
    repeats = config.n_layers // len(unit)
    if repeats > 1 and len(text) <= limit:
        return f"({text}) x {repeats}"
    return f"{config.pattern[:limit - 3]}..."


def repeating_unit(layers: tuple[LayerSpec, ...]) -> tuple[LayerSpec, ...]:
    """The shortest prefix whose repetition is ``layers`` (settings compared exactly)."""
    n = len(layers)
    for size in range(1, n + 1):
        if n % size == 0 and layers == layers[:size] * (n // size):
            return layers[:size]
    return layers


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def width_step(config: ArchConfig) -> int:
    """Every multiple of this (at or above ``config.d_model``) is a d_model that a stretch keeps
    valid: the least common multiple of the layers' own steps (``LayerSpec.width_step``)."""
    return math.lcm(1, *(spec.width_step(config.d_model) for spec in config.layers))


@dataclass(frozen=True)
class _Shape:
    """A candidate: d_model and the number of units."""

    d_model: int
    repeats: int


class _Grower:
    """Builds and prices the candidates of one source architecture."""

    def __init__(self, source: ArchConfig, *, scale_d_state: bool, context: int) -> None:
        self.source = source
        self.unit = repeating_unit(source.layers)
        self.unit_layers = len(self.unit)
        self.repeats = source.n_layers // self.unit_layers
        self.d_model = source.d_model
        self.step = width_step(source)
        self.scale_d_state = scale_d_state
        self.context = context
        self.max_repeats = max(self.repeats, MAX_LAYERS // self.unit_layers)
        self.max_width_index = (MAX_D_MODEL - self.d_model) // self.step
        self._per_width = cache(self._price_width)

    def width(self, index: int) -> int:
        return self.d_model + index * self.step

    def build(self, shape: _Shape) -> ArchConfig:
        unit = tuple(spec.stretched(d_from=self.d_model, d_to=shape.d_model,
                                   scale_d_state=self.scale_d_state) for spec in self.unit)
        return dataclasses.replace(self.source, d_model=shape.d_model,
                                   layers=unit * shape.repeats)

    def _price(self, config: ArchConfig, kind: str) -> float:
        if kind == "params":
            return param_count(config)
        return flops_per_token(config, self.context)

    def _price_width(self, d_model: int, kind: str) -> tuple[float, float]:
        """(cost outside the layers, cost of one unit) at ``d_model``: every cost is their sum
        over units, so two small builds price every depth."""
        one = self._price(self.build(_Shape(d_model, 1)), kind)
        two = self._price(self.build(_Shape(d_model, 2)), kind)
        return one - (two - one), two - one

    def measure(self, shape: _Shape, kind: str) -> float:
        fixed, per_unit = self._per_width(shape.d_model, kind)
        return fixed + shape.repeats * per_unit

    def ruled_repeats(self, d_model: int) -> float:
        """Units that ``both``'s rule gives at ``d_model``: depth ratio = width ratio ** 0.75."""
        return self.repeats * (d_model / self.d_model) ** DEPTH_EXPONENT

    def follows_rule(self, shape: _Shape) -> bool:
        """Whether ``shape``'s unit count is ``both``'s rule rounded down or up at its width."""
        ruled = self.ruled_repeats(shape.d_model)
        return math.floor(ruled) <= shape.repeats <= math.ceil(ruled)

    def off_rule(self, shape: _Shape) -> float:
        """How far ``shape``'s depth is from ``both``'s rule at its width, as a log ratio."""
        return abs(math.log(shape.repeats / self.ruled_repeats(shape.d_model)))

    def unit_text(self) -> str:
        return "".join(spec.symbol for spec in self.unit)

    def describe(self, shape: _Shape, strategy: str) -> str:
        layers = shape.repeats * self.unit_layers
        width = shape.d_model / self.d_model
        depth = shape.repeats / self.repeats
        unit = f"unit {self.unit_text()} ({self.unit_layers} layers)"
        if strategy == "stack":
            return (f"stack: {unit} x {shape.repeats} = {layers} layers; d_model "
                    f"{self.d_model} and every layer's settings kept")
        lattice = f"the d_model lattice is the multiples of {self.step}"
        if strategy == "stretch":
            return (f"stretch: d_model {self.d_model} -> {shape.d_model} (x{width:.3g}; "
                    f"{lattice}), {layers} layers kept; heads at fixed head_dim/headdim, GQA "
                    "ratio, ngroups and MLP multiplier kept, d_state "
                    + ("scaled" if self.scale_d_state else "kept"))
        ruled = self.ruled_repeats(shape.d_model)
        taken = ("rounded" if self.follows_rule(shape) else
                 "the nearest whole count that lands within tolerance")
        return (f"both: d_model {self.d_model} -> {shape.d_model} (x{width:.3g}; {lattice}), "
                f"depth {self.source.n_layers} -> {layers} layers (x{depth:.3g}, {unit} x "
                f"{shape.repeats}); the GPT-3 family's depth ratio = width "
                f"ratio^{DEPTH_EXPONENT:g} gives {ruled:.3g} units at this width, "
                f"{shape.repeats} is {taken}")


def _last_index(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The largest index in [lo, hi] with ``fits`` (true at ``lo``, monotone), by bisection."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _widths_around(grower: _Grower, repeats: int, goal: float, kind: str) -> list[_Shape]:
    """At ``repeats`` units, the lattice widths just below and just above ``goal``."""
    def shape(i: int) -> _Shape:
        return _Shape(grower.width(i), repeats)

    def below(i: int) -> bool:
        return grower.measure(shape(i), kind) < goal

    if not below(0):
        return [shape(0)]
    last = _last_index(0, grower.max_width_index, below)
    return [shape(i) for i in (last, last + 1) if i <= grower.max_width_index]


def _candidates(grower: _Grower, strategy: str, goal: float, kind: str,
                tolerance: float) -> list[_Shape]:
    """Every shape worth comparing: for each depth the strategy allows, the widths it allows
    nearest the goal; depths stop once the narrowest width overshoots the goal."""
    if strategy == "stretch":
        return _widths_around(grower, grower.repeats, goal, kind)
    found: list[_Shape] = []
    for repeats in range(grower.repeats, grower.max_repeats + 1):
        narrow = _Shape(grower.d_model, repeats)
        found += [narrow] if strategy == "stack" else _widths_around(grower, repeats, goal, kind)
        if grower.measure(narrow, kind) > goal * (1 + tolerance):
            break
    return found


def _relative(value: float, goal: float) -> float:
    return value / goal - 1


def _value_text(value: float, kind: str) -> str:
    if kind == "params":
        return f"{format_scaled(value, PARAMS)} params"
    return f"{format_count(value)} FLOPs/token"


def _search(grower: _Grower, strategy: str, goal: float, kind: str,
            tolerance: float) -> _Shape:
    """The candidate nearest ``goal`` (for ``both``: of those within ``tolerance``, the one
    nearest its depth rule), or a ScaleError with the nearest values reachable."""
    candidates = _candidates(grower, strategy, goal, kind, tolerance)

    def miss(s: _Shape) -> float:
        return abs(_relative(grower.measure(s, kind), goal))

    within = [s for s in candidates if miss(s) <= tolerance]
    ruled = [s for s in within if grower.follows_rule(s)]
    if strategy == "both" and within and not ruled:
        return min(within, key=lambda s: (grower.off_rule(s), miss(s)))
    if within:
        return min(ruled if strategy == "both" else within,
                   key=lambda s: (miss(s), grower.measure(s, kind)))

    def show(s: _Shape) -> str:
        value = grower.measure(s, kind)
        return (f"d_model {s.d_model} x {s.repeats * grower.unit_layers} layers = "
                f"{_value_text(value, kind)} ({_relative(value, goal):+.1%})")

    below = [s for s in candidates if grower.measure(s, kind) < goal]
    above = [s for s in candidates if grower.measure(s, kind) >= goal]
    nearest = [show(min(group, key=miss)) for group in (below, above) if group]
    wanted = _value_text(goal, kind)
    if not above:
        capped = (f"more than {MAX_LAYERS} layers (MAX_LAYERS)" if strategy == "stack" else
                  f"d_model over {MAX_D_MODEL} (MAX_D_MODEL)" if strategy == "stretch" else
                  f"more than {MAX_LAYERS} layers or d_model over {MAX_D_MODEL}")
        raise ScaleError("target", f"{strategy} cannot reach {wanted}: that needs {capped}; "
                         f"the largest it reaches is {nearest[0]}")
    hint = {"stack": "stack changes depth by whole units of "
                     f"{grower.unit_layers} layers ({grower.unit_text()})",
            "stretch": f"stretch changes d_model in steps of {grower.step}",
            "both": f"both changes d_model in steps of {grower.step} and depth in units of "
                    f"{grower.unit_layers} layers"}
    raise ScaleError("target", f"{strategy} cannot land within {tolerance:.0%} of {wanted} "
                     f"({hint[strategy]}); the nearest it reaches: " + " and ".join(nearest))


def _check_dimension(name: str, value: int, *, source: int, cap: int, step: int,
                     why: str) -> None:
    """Refuse an explicit d_model or depth below the source, over its cap or off its step."""
    field = f"target.{name}"
    if value < source:
        raise ScaleError(field, f"{name} {value} is below the source's {source}; extrapolation "
                         "only grows")
    if value > cap:
        raise ScaleError(field, f"{name} {value} is over the cap of {cap}")
    if value % step:
        low = value - value % step
        raise ScaleError(field, f"{name} {value} {why}: it must be a multiple of {step} "
                         f"(nearest: {low} or {low + step})")


def _explicit(grower: _Grower, target: Target, strategy: str) -> _Shape:
    """The shape a target of d_model and/or depth asks for, checked against the strategy."""
    d0, layers0, size = grower.d_model, grower.source.n_layers, grower.unit_layers
    d, depth = target.d_model, target.depth
    if d is not None:
        _check_dimension("d_model", d, source=d0, cap=MAX_D_MODEL, step=grower.step,
                         why="does not keep every layer's heads whole")
        if strategy == "stack" and d != d0:
            raise ScaleError("target.d_model", f"stack keeps d_model {d0}; d_model {d} "
                             "conflicts with it (use --strategy stretch or both)")
    if depth is not None:
        _check_dimension("depth", depth, source=layers0, cap=MAX_LAYERS, step=size,
                         why=f"is not a whole number of units ({grower.unit_text()})")
        if strategy == "stretch" and depth != layers0:
            raise ScaleError("target.depth", f"stretch keeps the depth of {layers0} layers; "
                             f"depth {depth} conflicts with it (use --strategy stack or both)")
    if d is None:
        if depth is None:
            raise ScaleError("target", "an explicit shape needs d_model or depth")
        d = d0
        if strategy == "both":
            # The inverse of the depth rule, to the nearest lattice width.
            wanted = d0 * (depth / layers0) ** (1 / DEPTH_EXPONENT)
            d = d0 + grower.step * _round_half_up((wanted - d0) / grower.step)
            d = min(d, d0 + grower.step * grower.max_width_index)
    if depth is None:
        repeats = grower.repeats
        if strategy == "both":
            repeats = min(max(grower.repeats, _round_half_up(grower.ruled_repeats(d))),
                          grower.max_repeats)
        return _Shape(d, repeats)
    return _Shape(d, depth // size)


def _check_options(strategy: str, context: int, tolerance: float) -> None:
    if strategy not in STRATEGIES:
        raise ScaleError("strategy", f"unknown strategy {strategy!r}; choose one of "
                         f"{', '.join(STRATEGIES)}")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ScaleError("context", f"must be a positive integer, got {context!r}")
    if (isinstance(tolerance, bool) or not isinstance(tolerance, int | float)
            or not 0 < tolerance < 1):
        raise ScaleError("tolerance", f"must be a fraction between 0 and 1, got {tolerance!r}")


def scale(
    config: ArchConfig,
    target: Target,
    *,
    strategy: Strategy = "both",
    context: int = 4096,
    tolerance: float = 0.05,
    scale_d_state: bool = False,
) -> Scaled:
    """Extrapolate ``config`` to ``target`` by ``strategy`` (rules in the module docstring).

    Parameter and FLOPs goals are met within ``tolerance`` (a fraction) or refused with the
    nearest values reachable; FLOPs are forward FLOPs per token at ``context``, which also sets
    the context of the reported inference state.
    """
    _check_options(strategy, context, tolerance)
    grower = _Grower(config, scale_d_state=scale_d_state, context=context)
    source_cost = cost_report(config, context)
    if target.is_shape:
        shape = _explicit(grower, target, strategy)
        scaled = grower.build(shape)
        goal = achieved = float(param_count(scaled))
    else:
        kind = "flops" if target.flops_per_token is not None else "params"
        source_value = (source_cost.flops_per_token if kind == "flops"
                        else float(source_cost.params))
        if target.ratio is not None:
            goal = target.ratio * source_cost.params
        else:
            goal = float(target.params if kind == "params" else target.flops_per_token)
        if goal < source_value:
            raise ScaleError("target", f"{target.describe()} ({_value_text(goal, kind)}) is "
                             f"below the source's {_value_text(source_value, kind)}; "
                             "extrapolation only grows")
        shape = _search(grower, strategy, goal, kind, tolerance)
        scaled = grower.build(shape)
        achieved = (float(param_count(scaled)) if kind == "params"
                    else flops_per_token(scaled, context))
    return Scaled(
        source=config, config=scaled, strategy=strategy, target=target, goal=goal,
        achieved=achieved, error=_relative(achieved, goal), source_cost=source_cost,
        cost=cost_report(scaled, context), rule=grower.describe(shape, strategy),
    )

