"""Seed architectures: published (or any imported) designs at the search's proxy size.

A space's ``seed_architectures:`` puts designs such as Nemotron-H, Bamba or Jamba into the study
as its first trials, so it shows where they land beside what the search finds. A published
design is billions of parameters with full-size layers; its proxy keeps what makes it that
design and takes the rest from the space:

- **From the design:** the order of its layer kinds, grouped into blocks (a mixer and the MLPs
  that follow it), the Mamba type and ``expand``, the conv width, the attention GQA ratio
  (n_heads / n_kv_heads), positional encoding and window, the MLP width ratio, tied embeddings
  and the norm eps.
- **From the space:** the width (its ``model.d_model``, the middle value of a range) and every
  size setting the space gives for that layer type: attention ``n_heads``/``head_dim``, Mamba
  ``d_state``, ``headdim``, ``ngroups``, ``chunk_size``, ``dt_rank`` (the middle value of a
  searched one); sizes the space leaves unset take hybridlab's defaults. The vocabulary is the
  task's. So a seed competes with the candidates' own layer sizes and differs in its layout.
- **Depth:** the design's blocks are stacked or thinned to the parameter goal with
  ``hybridlab.scale``'s repeating unit: a periodic design (Jamba's 8-layer block, Samba's
  Mamba/attention pair) is repeated by whole units (``scale(..., strategy="stack")``); below one
  unit, and for designs with no period (Nemotron-H, Bamba), blocks are sampled evenly from the
  unit with every block kind kept at least once. The depth nearest the goal that passes the
  space's budgets is taken; a seed that no depth fits is refused when the space is loaded.
- **The goal** is the entry's ``params``, else the space's ``seed_params``, else the median
  parameter count of ``SIZE_SAMPLES`` candidates drawn at random from the space (those that pass
  its rules and budgets): a seed is sized like a typical candidate.

Seeds ignore the space's pattern rules (they are outside designs) but not its budgets.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna

from hybridlab.config import (
    ArchConfig,
    AttentionSpec,
    ConfigError,
    LayerSpec,
    Mamba1Spec,
    Mamba2Spec,
)
from hybridlab.cost import param_count
from hybridlab.layers import layer_type
from hybridlab.scale import MAX_LAYERS, PARAMS, Target, repeating_unit, scale
from hybridlab.search.objective import candidate_costs
from hybridlab.search.space import (
    Choice,
    FloatRange,
    IntRange,
    Param,
    Rejected,
    SearchSpace,
    SeedSpec,
    check_budgets,
    sample_architecture,
)
from hybridlab.units import format_scaled

SIZE_SAMPLES = 64
# The settings that size a layer, which a seed takes from the space; the rest are the design's.
SIZES: dict[str, tuple[str, ...]] = {
    "mamba1": ("d_state", "dt_rank"),
    "mamba2": ("d_state", "headdim", "ngroups", "chunk_size"),
    "attention": ("n_heads", "head_dim"),
    "mlp": (),
}
Block = tuple[LayerSpec, ...]


@dataclass(frozen=True, kw_only=True)
class ProxySeed:
    """A seed at the proxy size, ready to enqueue: its architecture and how it was made."""

    name: str
    source: str
    arch: ArchConfig
    params: int
    goal: int
    rule: str


def middle(param: Param) -> Any:
    """The middle value a parameter can take: the middle choice (of the numbers, sorted), the
    middle step of an integer range, the (geometric, for log) midpoint of a float range."""
    if isinstance(param, Choice):
        numbers = sorted(v for v in param.values
                         if isinstance(v, int | float) and not isinstance(v, bool))
        return numbers[len(numbers) // 2] if numbers else param.values[0]
    if isinstance(param, IntRange):
        steps = (param.high - param.low) // param.step
        return param.low + param.step * (steps // 2)
    assert isinstance(param, FloatRange)
    if param.log:
        return math.sqrt(param.low * param.high)
    return (param.low + param.high) / 2


def _kv_heads(heads: int, ratio: int) -> int:
    """The most KV heads dividing ``heads`` that keeps at least the design's GQA ratio."""
    most = max(1, heads // ratio)
    return max(k for k in range(1, most + 1) if heads % k == 0)


def sized(spec: LayerSpec, space: SearchSpace) -> LayerSpec:
    """``spec`` with the space's sizes for its type (the design's shape kept); see the module
    docstring for which settings are which."""
    given = space.model.layer_params.get(spec.type, {})
    # A type without sizing rules here (MoE, parallel blocks) keeps the design's settings.
    sizes = {key: middle(given[key]) for key in SIZES.get(spec.type, ()) if key in given}
    defaults = type(spec)()
    if isinstance(spec, Mamba1Spec | Mamba2Spec):
        return replace(spec, **{key: sizes.get(key, getattr(defaults, key))
                                for key in SIZES[spec.type]})
    if isinstance(spec, AttentionSpec):
        heads = sizes.get("n_heads", defaults.n_heads)
        kv = _kv_heads(heads, spec.n_heads // spec.kv_heads())
        return replace(spec, n_heads=heads, n_kv_heads=None if kv == heads else kv,
                       head_dim=sizes.get("head_dim"))
    return spec


def blocks(layers: Sequence[LayerSpec]) -> tuple[Block, ...]:
    """The layers grouped as mixer-led blocks: a mixer and the per-token layers (MLP, MoE) right
    after it (per-token layers that open the stack form a block of their own)."""
    grouped: list[list[LayerSpec]] = []
    for spec in layers:
        if not layer_type(spec).mixes_sequence and grouped:
            grouped[-1].append(spec)
        else:
            grouped.append([spec])
    return tuple(tuple(block) for block in grouped)


def sample_blocks(unit: Sequence[Block], count: int) -> list[Block]:
    """``count`` blocks of ``unit`` at evenly spaced positions, in order, every block kind of
    ``unit`` kept: a kind the spacing misses replaces the nearest pick of a kind picked twice,
    at the middle one of its own positions."""
    n = len(unit)
    picks = [int((j + 0.5) * n / count) for j in range(count)]
    for kind in dict.fromkeys(unit):
        if any(unit[p] == kind for p in picks):
            continue
        where = [i for i, block in enumerate(unit) if block == kind]
        target = where[len(where) // 2]
        counts = Counter(unit[p] for p in picks)
        j = min((j for j, p in enumerate(picks) if counts[unit[p]] > 1),
                key=lambda j: abs(picks[j] - target))
        picks[j] = target
        picks.sort()
    return [unit[p] for p in picks]


def typical_params(space: SearchSpace, vocab_size: int) -> int | None:
    """The median parameter count of ``SIZE_SAMPLES`` random candidates of the space that pass
    its rules and budgets (None when none does)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=space.seed),
                                    directions=space.directions)
        sizes = []
        for _ in range(SIZE_SAMPLES):
            try:
                arch = sample_architecture(study.ask(), space, vocab_size)
                costs = candidate_costs(arch, space)
                check_budgets(space.budgets, costs)
            except Rejected:
                continue
            sizes.append(int(costs["params"]))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return statistics.median_low(sizes) if sizes else None


def _params_text(n: float) -> str:
    return format_scaled(n, PARAMS)


def proxy_seed(seed: SeedSpec, space: SearchSpace, vocab_size: int, *, goal: int,
               goal_text: str, field: str) -> ProxySeed:
    """``seed`` at the space's width and layer sizes, at the depth nearest ``goal`` parameters
    within the space's budgets; a ConfigError naming ``field`` when no depth fits."""
    width = int(middle(space.model.d_model))
    design = blocks(seed.arch.layers)
    resized = tuple(tuple(sized(spec, space) for spec in block) for block in design)
    unit = repeating_unit(resized)  # type: ignore[arg-type]
    kinds = list(dict.fromkeys(unit))

    def build(chosen: Sequence[Block]) -> ArchConfig:
        return ArchConfig(d_model=width, vocab_size=vocab_size,
                          layers=tuple(spec for block in chosen for spec in block),
                          tie_embeddings=seed.arch.tie_embeddings, norm_eps=seed.arch.norm_eps)

    try:
        whole = build(unit)  # type: ignore[arg-type]
    except ConfigError as err:
        raise ConfigError(field, f"{seed.name} at d_model {width} with the space's layer sizes "
                          f"is not a valid architecture ({err}); set the sizes for that layer "
                          "type in the space's model section") from None
    options: list[tuple[ArchConfig, str]] = []
    unit_text = "".join(spec.symbol for block in unit for spec in block)
    for count in range(len(kinds), len(unit)):
        options.append((build(sample_blocks(unit, count)),  # type: ignore[arg-type]
                        f"{count} of the {len(unit)} blocks of its unit {unit_text} sampled "
                        "evenly, each block kind kept"))
    options.append((whole, f"its unit {unit_text} once" if len(unit) < len(design) else
                    f"all {len(unit)} blocks"))
    repeats = 2
    while param_count(options[-1][0]) < goal and repeats * whole.n_layers <= MAX_LAYERS:
        stacked = scale(whole, Target(depth=repeats * whole.n_layers), strategy="stack",
                        context=space.budgets.state_context)
        options.append((stacked.config, stacked.rule))
        repeats += 1
    fitting, refused = [], []
    for arch, how in options:
        try:
            check_budgets(space.budgets, candidate_costs(arch, space))
            fitting.append((arch, how))
        except Rejected as why:
            refused.append(str(why))
    if not fitting:
        raise ConfigError(field, f"{seed.name} fits none of the space's budgets at d_model "
                          f"{width}: its smallest proxy ({options[0][0].n_layers} layers) has "
                          f"{refused[0]}; raise the budget or seed another design")
    arch, how = min(fitting, key=lambda o: (abs(param_count(o[0]) - goal), param_count(o[0])))
    params = param_count(arch)
    rule = (f"{seed.name} at d_model {width} with the space's layer sizes: {how}; "
            f"{arch.n_layers} layers, {_params_text(params)} params for a goal of "
            f"{_params_text(goal)} ({goal_text})")
    return ProxySeed(name=seed.name, source=seed.source, arch=arch, params=params, goal=goal,
                     rule=rule)


def proxy_seeds(space: SearchSpace, vocab_size: int) -> list[ProxySeed]:
    """Every seed of the space at its proxy size (rules in the module docstring)."""
    if not space.seeds:
        return []
    typical: int | None = None
    if any(s.params is None for s in space.seeds) and space.seed_params is None:
        typical = typical_params(space, vocab_size)
        if typical is None:
            raise ConfigError("seed_params", f"no candidate among {SIZE_SAMPLES} drawn from the "
                              "space passes its rules and budgets, so there is no typical size "
                              "to give the seeds; set seed_params")
    found = []
    for i, seed in enumerate(space.seeds):
        if seed.params is not None:
            goal, text = seed.params, "the entry's params"
        elif space.seed_params is not None:
            goal, text = space.seed_params, "seed_params"
        else:
            assert typical is not None
            goal, text = typical, f"the median of {SIZE_SAMPLES} candidates sampled from the space"
        found.append(proxy_seed(seed, space, vocab_size, goal=goal, goal_text=text,
                                field=f"seed_architectures[{i}]"))
    return found
