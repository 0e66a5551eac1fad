"""Extrapolation: targets, the three strategies against brute-force references, refusals, CLI."""

import dataclasses
import math
import random
import re
from fractions import Fraction

import pytest
import torch

from hybridlab.cli import main
from hybridlab.config import (
    ArchConfig,
    AttentionSpec,
    ConfigError,
    Mamba1Spec,
    Mamba2Spec,
    MLPSpec,
)
from hybridlab.cost import flops_per_token, param_count
from hybridlab.layers import MoESpec, ParallelSpec
from hybridlab.model import HybridLM
from hybridlab.scale import (
    MAX_LAYERS,
    STRATEGIES,
    ScaleError,
    Target,
    parse_target,
    repeating_unit,
    scale,
)

# Built only below this size; larger results are checked through cost.param_count alone.
BUILD_LIMIT = 3_000_000


def sources() -> dict[str, ArchConfig]:
    """Hybrids covering every layer type, GQA and MHA, explicit and implied head_dim, Mamba-2
    groups, explicit and "auto" dt_rank, different d_state within one model, windows, untied."""
    return {
        "mamba2-gqa": ArchConfig.from_pattern(
            "M-M-*-", d_model=64, vocab_size=64,
            mamba2=Mamba2Spec(d_state=16, headdim=16, chunk_size=16),
            attention=AttentionSpec(n_heads=4, n_kv_heads=2), mlp=MLPSpec(multiplier=2.0)),
        "mamba1-mha-untied": ArchConfig.from_pattern(
            "m*-m*-", d_model=48, vocab_size=50, tie_embeddings=False,
            mamba1=Mamba1Spec(d_state=8, dt_rank=5), attention=AttentionSpec(n_heads=2)),
        "groups-window": ArchConfig.from_pattern(
            "MM*MM*", d_model=32, vocab_size=40,
            mamba2=Mamba2Spec(d_state=32, headdim=8, ngroups=2, chunk_size=8),
            attention=AttentionSpec(n_heads=8, n_kv_heads=2, head_dim=8, sliding_window=16)),
        "mixed-d_state": ArchConfig(d_model=32, vocab_size=30, layers=(
            Mamba2Spec(d_state=8, headdim=16), Mamba1Spec(d_state=4),
            AttentionSpec(n_heads=2, n_kv_heads=1), Mamba2Spec(d_state=64, headdim=8),
            MLPSpec(multiplier=3.0, multiple_of=8))),
        "parallel-moe": ArchConfig.from_pattern(
            "PE*-PE", d_model=64, vocab_size=64,
            parallel=ParallelSpec(n_heads=4, n_kv_heads=2, d_state=16, headdim=16, expand=1,
                                  chunk_size=16, combine="mean"),
            moe=MoESpec(n_experts=4, top_k=2, n_shared_experts=1),
            attention=AttentionSpec(n_heads=2)),
    }


SOURCES = sources()


def random_source(seed: int) -> ArchConfig:
    """A valid random hybrid from ``seed`` (its own RNG): 2-6 layers, one spec per layer type."""
    rng = random.Random(seed)
    d_model = rng.choice([32, 48, 64])
    n_heads = rng.choice([2, 4])
    specs = {
        "m": Mamba1Spec(d_state=rng.choice([4, 8, 16]), dt_rank=rng.choice(["auto", 3])),
        "M": Mamba2Spec(d_state=rng.choice([8, 16, 32]), headdim=rng.choice([8, 16]),
                        ngroups=rng.choice([1, 2]), chunk_size=16),
        "*": AttentionSpec(n_heads=n_heads, n_kv_heads=rng.choice([1, n_heads])),
        "-": MLPSpec(multiplier=rng.choice([2.0, 8 / 3])),
    }
    pattern = "".join(rng.choice("mM*-") for _ in range(rng.randint(2, 6)))
    return ArchConfig(d_model=d_model, vocab_size=rng.randint(20, 80),
                      layers=tuple(specs[s] for s in pattern))


def reference_stretch(source: ArchConfig, d: int) -> ArchConfig | None:
    """The stretch of ``source`` to width ``d`` written out from the rules, or None when some
    layer cannot keep whole heads (or the config does not validate)."""
    ratio = Fraction(d, source.d_model)
    layers = []
    for spec in source.layers:
        if isinstance(spec, ParallelSpec):  # its attention branch as attention, SSM as SSM
            attention = reference_stretch(
                dataclasses.replace(source, layers=(spec.attention_spec(),)), d)
            if attention is None:
                return None
            heads = attention.layers[0]
            layers.append(dataclasses.replace(spec, n_heads=heads.n_heads,
                                              n_kv_heads=heads.n_kv_heads))
            continue
        if isinstance(spec, AttentionSpec):
            heads, kv = spec.n_heads * ratio, spec.kv_heads() * ratio
            if heads.denominator != 1 or kv.denominator != 1:
                return None
            head_dim = spec.resolved_head_dim(source.d_model)
            if spec.head_dim is None and d != head_dim * heads:
                return None
            spec = dataclasses.replace(spec, n_heads=int(heads),
                                       n_kv_heads=None if spec.n_kv_heads is None else int(kv))
        elif isinstance(spec, Mamba1Spec) and spec.dt_rank != "auto":
            spec = dataclasses.replace(spec, dt_rank=math.ceil(spec.dt_rank * ratio))
        layers.append(spec)
    try:
        return dataclasses.replace(source, d_model=d, layers=tuple(layers))
    except ConfigError:
        return None


def model_params(config: ArchConfig) -> int:
    return sum(p.numel() for p in HybridLM(config).parameters())


def attention_positions(config: ArchConfig) -> list[float]:
    return [i / config.n_layers for i, s in enumerate(config.layers)
            if isinstance(s, AttentionSpec)]


def check_counts(scaled) -> None:
    """The reported cost is cost.param_count's, and the built model's when small enough."""
    assert scaled.cost.params == param_count(scaled.config)
    if scaled.cost.params <= BUILD_LIMIT:
        assert model_params(scaled.config) == scaled.cost.params


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("ratio", [2, 4.5, 8])
def test_stack_repeats_the_unit_and_is_nearest_of_every_whole_depth(name, ratio):
    source = SOURCES[name]
    unit = repeating_unit(source.layers)
    goal = ratio * param_count(source)
    # Brute force over every whole number of units.
    reachable = {k: param_count(dataclasses.replace(source, layers=unit * k))
                 for k in range(1, MAX_LAYERS // len(unit) + 1)}
    best_k = min(reachable, key=lambda k: abs(reachable[k] / goal - 1))
    if abs(reachable[best_k] / goal - 1) > 0.05:
        with pytest.raises(ScaleError, match="nearest it reaches"):
            scale(source, Target(ratio=ratio), strategy="stack")
        return
    scaled = scale(source, Target(ratio=ratio), strategy="stack")
    config = scaled.config
    assert config.layers == unit * best_k
    assert config.d_model == source.d_model
    assert config.pattern == "".join(s.symbol for s in unit) * best_k
    assert attention_positions(config) == pytest.approx(
        [(j * len(unit) + i) / config.n_layers for j in range(best_k)
         for i, s in enumerate(unit) if isinstance(s, AttentionSpec)])
    fraction = config.pattern.count("*") / config.n_layers
    assert fraction == source.pattern.count("*") / source.n_layers
    assert abs(scaled.error) <= 0.05
    assert scaled.achieved == param_count(config) == reachable[best_k]
    check_counts(scaled)


def test_repeating_unit_is_the_shortest_exact_period():
    m, m16 = Mamba2Spec(), Mamba2Spec(d_state=16)
    attn, mlp = AttentionSpec(), MLPSpec()
    assert repeating_unit((m, mlp, m, mlp)) == (m, mlp)
    assert repeating_unit((m, mlp, m16, mlp)) == (m, mlp, m16, mlp)
    assert repeating_unit((attn,) * 5) == (attn,)
    assert repeating_unit((m, attn, m)) == (m, attn, m)


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("goal", [3.0, 10.0, "1.3B"])
def test_stretch_is_the_nearest_valid_width_and_keeps_every_layer_rule(name, goal):
    source = SOURCES[name]
    target = parse_target(f"{goal}x" if isinstance(goal, float) else goal)
    wanted = target.ratio * param_count(source) if target.ratio else target.params
    # Brute force over every width up to twice the one needed (params grow with d^2).
    limit = int(source.d_model * 2 * math.sqrt(wanted / param_count(source))) + 2
    candidates = {}
    for d in range(source.d_model, limit):
        config = reference_stretch(source, d)
        if config is not None:
            candidates[d] = config
    best_d = min(candidates, key=lambda d: abs(param_count(candidates[d]) / wanted - 1))
    if abs(param_count(candidates[best_d]) / wanted - 1) > 0.05:
        with pytest.raises(ScaleError, match="nearest it reaches"):
            scale(source, target, strategy="stretch")
        return
    scaled = scale(source, target, strategy="stretch")
    config = scaled.config
    assert config == candidates[best_d]
    assert config.n_layers == source.n_layers and config.pattern == source.pattern
    ratio = config.d_model / source.d_model
    for before, after in zip(source.layers, config.layers, strict=True):
        if isinstance(before, AttentionSpec):
            assert after.resolved_head_dim(config.d_model) == before.resolved_head_dim(
                source.d_model)
            assert after.n_heads / after.kv_heads() == before.n_heads / before.kv_heads()
            assert after.n_heads == before.n_heads * ratio
            assert after.sliding_window == before.sliding_window
            assert (after.rope, after.rope_theta) == (before.rope, before.rope_theta)
        elif isinstance(before, Mamba2Spec):
            assert (after.headdim, after.ngroups, after.d_state, after.expand) == (
                before.headdim, before.ngroups, before.d_state, before.expand)
            assert after.nheads(config.d_model) == before.nheads(source.d_model) * ratio
        elif isinstance(before, Mamba1Spec):
            assert after.d_state == before.d_state
            assert after.d_inner(config.d_model) == before.expand * config.d_model
        elif isinstance(before, ParallelSpec):
            a, b = after.attention_spec(), before.attention_spec()
            assert a.resolved_head_dim(config.d_model) == b.resolved_head_dim(source.d_model)
            assert a.n_heads == b.n_heads * ratio and a.kv_heads() == b.kv_heads() * ratio
            assert after.ssm_spec().nheads(config.d_model) == before.ssm_spec().nheads(
                source.d_model) * ratio
            assert dataclasses.replace(after, n_heads=b.n_heads, n_kv_heads=b.n_kv_heads) == (
                before)
        else:
            assert after == before  # the multiplier applies to the new d_model
    for kept in ("vocab_size", "tie_embeddings", "norm_eps"):
        assert getattr(config, kept) == getattr(source, kept)
    check_counts(scaled)


def test_stretch_scales_an_explicit_dt_rank_and_keeps_auto():
    source = ArchConfig.from_pattern("mm", d_model=32, vocab_size=20,
                                     mamba1=Mamba1Spec(dt_rank=3))
    scaled = scale(source, Target(d_model=96), strategy="stretch").config
    assert scaled.layers[0].dt_rank == 9
    auto = dataclasses.replace(source, layers=(Mamba1Spec(), Mamba1Spec()))
    assert scale(auto, Target(d_model=96), strategy="stretch").config.layers[0].dt_rank == "auto"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_scale_d_state_grows_the_state_with_width(name):
    source = SOURCES[name]
    scaled = scale(source, Target(d_model=source.d_model * 4), strategy="stretch",
                   scale_d_state=True).config
    for before, after in zip(source.layers, scaled.layers, strict=True):
        if isinstance(before, Mamba1Spec | Mamba2Spec | ParallelSpec):
            assert after.d_state == 4 * before.d_state


def ruled_units(source: ArchConfig, d_model: int) -> float:
    """The depth rule of "both", in units: source units x (width ratio) ** 0.75."""
    units = source.n_layers // len(repeating_unit(source.layers))
    return units * (d_model / source.d_model) ** 0.75


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("ratio", [4, 12])
def test_both_follows_its_depth_rule_nearest_the_goal_by_brute_force(name, ratio):
    source = SOURCES[name]
    unit = repeating_unit(source.layers)
    goal = ratio * param_count(source)
    # Brute force: every valid width and whole unit count that lands within 5%.
    within = []
    for d in range(source.d_model, 4 * source.d_model + 1):
        stretched = reference_stretch(source, d)
        if stretched is None:
            continue
        for units in range(len(source.layers) // len(unit), 8 * ratio):
            config = dataclasses.replace(stretched, layers=stretched.layers[:len(unit)] * units)
            miss = abs(param_count(config) / goal - 1)
            if miss <= 0.05:
                ruled = ruled_units(source, d)
                within.append((math.floor(ruled) <= units <= math.ceil(ruled),
                               abs(math.log(units / ruled)), miss, config))
    assert within, "the brute force found nothing; widen its ranges"
    rounded = [w for w in within if w[0]]
    # The rule rounded, nearest the goal; else the depth nearest the rule.
    expected = (min(rounded, key=lambda w: w[2]) if rounded
                else min(within, key=lambda w: (w[1], w[2])))[3]
    scaled = scale(source, Target(params=goal))
    assert scaled.config == expected
    assert ("is rounded" in scaled.rule) == bool(rounded)
    check_counts(scaled)


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("goal", ["350M", "1.3B"])
def test_both_grows_width_and_depth_together_at_large_targets(name, goal):
    source = SOURCES[name]
    scaled = scale(source, parse_target(goal))
    config = scaled.config
    expected = parse_target(goal).params
    assert scaled.goal == expected and abs(param_count(config) / expected - 1) <= 0.05
    unit = repeating_unit(source.layers)
    assert config.n_layers % len(unit) == 0
    stretched = reference_stretch(source, config.d_model)
    assert config.layers == stretched.layers[:len(unit)] * (config.n_layers // len(unit))
    # The lattice is fine at this size: depth is the rule rounded down or up.
    ruled = ruled_units(source, config.d_model)
    assert math.floor(ruled) <= config.n_layers // len(unit) <= math.ceil(ruled)
    assert config.d_model > 8 * source.d_model and config.n_layers > source.n_layers
    check_counts(scaled)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_random_sources_reach_the_goal_or_say_what_they_can_reach(seed, strategy):
    source = random_source(seed)
    goal = 6 * param_count(source)
    try:
        scaled = scale(source, Target(params=goal), strategy=strategy)
    except ScaleError as err:
        # A refusal is right only when every value it could reach misses by more than 5%.
        misses = [float(m) for m in re.findall(r"\(([+-][0-9.]+)%\)", str(err))]
        assert err.field == "target" and misses and min(map(abs, misses)) > 5
        return
    assert abs(param_count(scaled.config) / goal - 1) <= 0.05
    assert scaled.error == pytest.approx(param_count(scaled.config) / goal - 1)
    check_counts(scaled)


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_flops_targets_are_met_at_the_given_context(name, strategy):
    source = SOURCES[name]
    context = 512
    goal = 5 * flops_per_token(source, context)
    try:
        scaled = scale(source, Target(flops_per_token=goal), strategy=strategy, context=context)
    except ScaleError as err:
        assert strategy != "both" and "FLOPs/token" in str(err)
        return
    assert abs(flops_per_token(scaled.config, context) / goal - 1) <= 0.05
    assert scaled.achieved == flops_per_token(scaled.config, context)
    assert scaled.cost.context == context


def test_explicit_shapes_follow_each_strategy():
    source = SOURCES["mamba2-gqa"]  # lattice step 32, unit of 6 layers
    both = scale(source, Target(d_model=256, depth=24)).config
    assert (both.d_model, both.n_layers) == (256, 24)
    stack = scale(source, Target(depth=18), strategy="stack").config
    assert (stack.d_model, stack.n_layers) == (64, 18)
    stretch = scale(source, Target(d_model=128), strategy="stretch")
    assert (stretch.config.d_model, stretch.config.n_layers) == (128, 6)
    assert stretch.error == 0 and stretch.goal == stretch.achieved == param_count(stretch.config)
    # Width alone under "both": depth by the rule, 1 unit x 4 ** 0.75 = 2.83 -> 3 units.
    assert scale(source, Target(d_model=256)).config.n_layers == 18
    # Depth alone: width by the inverse rule, 64 * 3 ** (4/3) = 277 -> 288 on the lattice.
    assert scale(source, Target(depth=18)).config.d_model == 288


@pytest.mark.parametrize(("target", "strategy", "field", "message"), [
    (Target(d_model=100), "both", "target.d_model", r"multiple of 32 \(nearest: 96 or 128\)"),
    (Target(depth=20), "both", "target.depth", r"units \(M-M-\*-\): it must be a multiple of 6 "
                                               r"\(nearest: 18 or 24\)"),
    (Target(d_model=32), "both", "target.d_model", "below the source's 64"),
    (Target(depth=3), "stack", "target.depth", "depth 3 is below the source's 6"),
    (Target(d_model=128), "stack", "target.d_model", "stack keeps d_model 64"),
    (Target(depth=12), "stretch", "target.depth", "stretch keeps the depth of 6"),
    (Target(depth=MAX_LAYERS + 6), "stack", "target.depth", "over the cap"),
    (Target(ratio=0.5), "both", "target", "below the source's"),
    (Target(params=1000), "stretch", "target", "below the source's"),
    (Target(params=10**12), "stack", "target", f"more than {MAX_LAYERS} layers"),
    (Target(ratio=1.6), "stack", "target", r"nearest it reaches: d_model 64 x 6 layers = .*"
                                           r"and d_model 64 x 12 layers"),
])
def test_refusals_say_why_and_name_the_field(target, strategy, field, message):
    with pytest.raises(ScaleError, match=message) as raised:
        scale(SOURCES["mamba2-gqa"], target, strategy=strategy)
    assert raised.value.field == field


@pytest.mark.parametrize(("options", "field"), [
    ({"strategy": "grow"}, "strategy"), ({"context": 0}, "context"),
    ({"tolerance": 0}, "tolerance"), ({"tolerance": 1.5}, "tolerance"),
])
def test_bad_options_are_refused(options, field):
    with pytest.raises(ScaleError) as raised:
        scale(SOURCES["mamba2-gqa"], Target(ratio=4), **options)
    assert raised.value.field == field


@pytest.mark.parametrize(("value", "expected"), [
    ("1.3B", Target(params=1_300_000_000)),
    ("350M", Target(params=350_000_000)),
    ("125k", Target(params=125_000)),
    ("2.5G", Target(params=2_500_000_000)),
    ("7e6", Target(params=7_000_000)),
    (" 4x ", Target(ratio=4.0)),
    ("2.5X", Target(ratio=2.5)),
    (1_300_000_000, Target(params=1_300_000_000)),
    (2.5e8, Target(params=250_000_000)),
    ({"params": "1.3B"}, Target(params=1_300_000_000)),
    ({"params": "4x"}, Target(ratio=4.0)),
    ({"ratio": 3}, Target(ratio=3.0)),
    ({"flops_per_token": "2.6G"}, Target(flops_per_token=2.6e9)),
    ({"d_model": 1024, "depth": 24}, Target(d_model=1024, depth=24)),
    ({"depth": 24}, Target(depth=24)),
])
def test_parse_target_reads_every_documented_form(value, expected):
    parsed = parse_target(value)
    assert parsed.params == expected.params and parsed.depth == expected.depth
    assert parsed.d_model == expected.d_model
    assert parsed.ratio == pytest.approx(expected.ratio) if expected.ratio else not parsed.ratio
    if expected.flops_per_token:
        assert parsed.flops_per_token == pytest.approx(expected.flops_per_token)


@pytest.mark.parametrize(("value", "field", "message"), [
    ("1.3Q", "rungs[0].scale", "cannot read '1.3Q'"),
    ("", "rungs[0].scale", "cannot read"),
    ("-4x", "rungs[0].scale", "cannot read"),
    ("0x", "rungs[0].scale", "positive"),
    ("1e400", "rungs[0].scale", "finite"),
    (0, "rungs[0].scale", "positive"),
    (True, "rungs[0].scale", "expected a number"),
    ([4], "rungs[0].scale", "expected a number"),
    ({"params": "1B", "depth": 3}, "rungs[0].scale", "exactly one"),
    ({}, "rungs[0].scale", "exactly one"),
    ({"size": 3}, "rungs[0].scale.size", "unknown key"),
    ({"flops_per_token": "2x"}, "rungs[0].scale.flops_per_token", "ratio is not allowed"),
    ({"d_model": 0}, "rungs[0].scale.d_model", "positive integer"),
    ({"depth": 2.5}, "rungs[0].scale.depth", "positive integer"),
])
def test_parse_target_refuses_bad_values_naming_the_field(value, field, message):
    with pytest.raises(ScaleError, match=message) as raised:
        parse_target(value, field="rungs[0].scale")
    assert raised.value.field == field
    assert isinstance(raised.value, ConfigError)


def test_target_needs_exactly_one_kind_and_describes_itself():
    with pytest.raises(ScaleError, match="exactly one"):
        Target(params=10, ratio=2.0)
    with pytest.raises(ScaleError, match="exactly one"):
        Target()
    with pytest.raises(ScaleError, match="must be an integer"):
        Target(params=1.5)  # type: ignore[arg-type]
    assert Target(params=1_300_000_000).describe() == "1.3B params"
    assert Target(ratio=4.0).describe() == "4x params"
    assert Target(flops_per_token=2.6e9).describe() == "2.6G FLOPs/token"
    assert Target(d_model=1024, depth=24).describe() == "d_model 1024, depth 24"


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scaled_configs_build_run_and_round_trip_yaml(name, strategy):
    source = SOURCES[name]
    unit = len(repeating_unit(source.layers))
    target = {"stack": Target(depth=source.n_layers + unit),
              "stretch": Target(d_model=2 * source.d_model),
              "both": Target(d_model=2 * source.d_model, depth=source.n_layers + unit)}[strategy]
    config = scale(source, target, strategy=strategy).config
    reread = ArchConfig.from_yaml(config.to_yaml())
    assert reread == config
    tokens = torch.randint(config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = HybridLM(config, seed=5)(tokens)
        again = HybridLM(reread, seed=5)(tokens)
    assert logits.shape == (2, 19, config.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, again)


def test_report_shows_source_beside_scaled():
    scaled = scale(SOURCES["mamba2-gqa"], parse_target("1.3B"))
    text = scaled.report()
    for needle in ("pattern", "M-M-*-", f"{scaled.config.n_layers}", f"{scaled.config.d_model}",
                   f"{param_count(scaled.config):,}", "FLOPs/token @4096", "state @4096",
                   "target: 1.3B params; achieved", f"{scaled.error:+.2%}", "rule: both:"):
        assert needle in text, needle
    assert scaled.source_cost.params == param_count(SOURCES["mamba2-gqa"])


def test_cli_writes_the_scaled_arch(tmp_path, capsys):
    source = tmp_path / "arch.yaml"
    SOURCES["groups-window"].save(source)
    out = tmp_path / "out" / "scaled.yaml"
    out.parent.mkdir()
    code = main(["scale", str(source), "--to", "8x", "--strategy", "both",
                 "--context", "1024", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    written = ArchConfig.load(out)
    expected = scale(SOURCES["groups-window"], Target(ratio=8.0), context=1024)
    assert written == expected.config
    assert expected.report() in printed and str(out) in printed
    assert main(["scale", "tiny-hybrid", "--to", "4x", "--out", str(tmp_path / "p.yaml")]) == 0


@pytest.mark.parametrize(("argv", "flag"), [
    (["tiny-hybrid", "--to", "lots"], "--to"),
    (["tiny-hybrid", "--to", "0.5x"], "--to"),
    (["tiny-hybrid", "--to", "1.3B", "--strategy", "stack"], "--to"),
    (["tiny-hybrid", "--to", "4x", "--context", "0"], "--context"),
    (["no-such-arch", "--to", "4x"], "no-such-arch"),
    (["--to", "4x"], "ARCH"),
    (["tiny-hybrid", "--best", "--to", "4x"], "--best"),
])
def test_cli_refuses_bad_flags_without_writing(tmp_path, capsys, argv, flag):
    out = tmp_path / "arch.yaml"
    assert main(["scale", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridlab scale: error: ") and flag in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
