import dataclasses
from pathlib import Path

import optuna
import pytest

from hybridlab.config import ArchConfig, ConfigError
from hybridlab.search.runner import run_search
from hybridlab.search.space import (
    Rejected,
    load_space,
    parse_space,
    sample_architecture,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_SPACE = (Path(__file__).parent / "tiny_space.yaml").read_text()


def write_space(folder: Path, text: str = TINY_SPACE) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path




def mutate(old: str, new: str) -> str:
    assert old in TINY_SPACE, old
    return TINY_SPACE.replace(old, new)


BAD_SPACES = [
    # (mutated text, field named in the error, words in the message)
    (mutate("trials: 4", "trails: 4"), "trails", "unknown field"),
    (mutate("trials: 4", "trials: many"), "trials", "integer"),
    (mutate("d_state: [4, 8]", "d_state: []"), "model.mamba1.d_state", "empty list"),
    (mutate("depth: {low: 1, high: 2}", "depth: {low: 3, high: 2}"), "model.depth",
     "low (3) > high"),
    (mutate("[mamba1, mamba2, attention]", "[mamba1, transformer]"), "model.layer_types[1]",
     "must be one of"),
    (mutate("mlp_after_mixer: never", "mlp_after_mixer: never\n    attention_count: {min: 3}"),
     "model.rules.attention_count.min", "at most 2"),
    (mutate("mlp_after_mixer: never", "mlp_after_mixer: never\n    first_layer: [mlp]"),
     "model.rules.first_layer[0]", "must be one of"),
    (mutate("max_params: 100000", "max_params: 10"), "budgets.max_params", "smallest"),
    (mutate("metric: accuracy", "metric: acuracy"), "objectives[0].metric", "must be one of"),
    (mutate("  - {metric: accuracy, direction: maximize}\n",
            "  - {metric: accuracy}\n  - {metric: params}\n").replace("pruner: none",
                                                                     "pruner: hyperband"),
     "pruner", "multi-objective"),
    (mutate("lr: 0.003", "lr: -1"), "train.lr", "positive"),
    (mutate("sampler: random", "sampler: annealing"), "sampler.name", "must be one of"),
    (mutate("  attention: {n_heads: 2}", "  attention: {n_heads: 2}\n  mlp: {multiplier: [2.0]}"),
     "model.mlp", "not in layer_types"),
    (mutate("  name: mqar\n", "  options_typo: 1\n"), "task.options_typo", "unknown field"),
    (mutate("mlp_after_mixer: never",
            "mlp_after_mixer: never\n    attention_count: {min: 2, max: 1}"),
     "model.rules.attention_count", "min (2) > max (1)"),
    (mutate("cpus_per_worker: 1", "cpus_per_worker: -1"), "resources.cpus_per_worker", ">= 0"),
    (mutate("d_model: 32", "d_model: {low: 32, high: 64, log: true, step: 0}"),
     "model.d_model.step", ">= 1"),
    (mutate("name: mqar", "name: mqqr"), "task.name", "mqqr"),
    (mutate("num_kv_pairs: 2", "num_kv_pairs: 2, colour: red"), "task.options", "colour"),
    (TINY_SPACE + "lm_eval: {tasks: []}\n", "lm_eval.tasks", "non-empty list"),
    (mutate("metric: accuracy", "metric: bits_per_byte"), "objectives[0].metric",
     "not bits_per_byte"),
    (mutate("d_model: 32", "d_model: {low: 16, high: 64, step: 16, log: true}"),
     "model.d_model.step", "cannot also have a step"),
    (mutate("steps: 20", "steps: abc"), "train.steps", "must be an integer"),
    (mutate("sampler: random", "sampler: {name: tpe, options: {n_startup: 3}}"),
     "sampler.options", "n_startup"),
    (mutate("mlp_after_mixer: never",
            "mlp_after_mixer: never\n    attention_every: 2\n    first_layer: [mamba1]"),
     "model.rules.first_layer", "attention_every"),
    (TINY_SPACE + "lm_eval: {tasks: [hybridlab_bpb], top_k: 0}\n", "lm_eval.top_k", ">= 1"),
]


@pytest.mark.parametrize(("text", "field", "words"), BAD_SPACES,
                         ids=[case[1] for case in BAD_SPACES])
def test_malformed_space_is_rejected_before_anything_is_created(tmp_path, text, field, words):
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        run_search(path, runs_dir=tmp_path / "runs")
    err = info.value
    assert err.field == field
    assert err.source == str(path)
    assert str(err).startswith(f"{path}:")
    assert words in err.message
    assert not (tmp_path / "runs").exists()


# Values that used to load: checked with load_space alone, so a regression cannot start a search.
OUT_OF_RANGE_SPACES = [
    (mutate("max_params: 100000", "max_params: 100000\n  max_flops_per_token: .nan"),
     "budgets.max_flops_per_token", "finite number, got nan"),
    (mutate("max_params: 100000", "max_params: 100000\n  max_flops_per_token: .inf"),
     "budgets.max_flops_per_token", "finite number, got inf"),
    (mutate("cpus_per_worker: 1", "cpus_per_worker: .inf"), "resources.cpus_per_worker",
     "finite number"),
    (mutate("cpus_per_worker: 1", "cpus_per_worker: .nan"), "resources.cpus_per_worker",
     "finite number"),
    (mutate("mlp_after_mixer: never", "mlp_after_mixer: always").replace(
        "  attention: {n_heads: 2}", "  attention: {n_heads: 2}\n  mlp: {multiplier: .nan}"),
     "model.mlp.multiplier", "finite number"),
    (mutate("mlp_after_mixer: never", "mlp_after_mixer: always").replace(
        "  attention: {n_heads: 2}",
        "  attention: {n_heads: 2}\n  mlp: {multiplier: {low: 1.0, high: .inf}}"),
     "model.mlp.multiplier.high", "finite number"),
    (mutate("mlp_after_mixer: never",
            "mlp_after_mixer: never\n    attention_fraction: {min: .nan}"),
     "model.rules.attention_fraction.min", "finite number"),
    (TINY_SPACE + "lm_eval: {tasks: [hybridlab_bpb], limit: .inf}\n", "lm_eval.limit",
     "finite number"),
    (mutate("seed: 0", "seed: 1180591620717411303424"), "seed", "4294967295"),
    (mutate("trials: 4", "trials: 1000000000"), "trials", "at most 100000"),
    (mutate("headdim: 16", "headdim: {low: 0, high: 16}"), "model.mamba2.headdim.low", ">= 1"),
    (mutate("depth: {low: 1, high: 2}", "depth: 0"), "model.depth.low", ">= 1"),
]


@pytest.mark.parametrize(("text", "field", "words"), OUT_OF_RANGE_SPACES,
                         ids=[case[1] for case in OUT_OF_RANGE_SPACES])
def test_non_finite_and_out_of_range_values_are_refused(tmp_path, text, field, words):
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    err = info.value
    assert (err.field, err.source) == (field, str(path))
    assert words in err.message
    line = path.read_text().splitlines()[err.line - 1]
    assert any(f"{part}:" in line for part in field.split(".")), line


def test_lm_eval_stage_is_read():
    space = parse_space(TINY_SPACE + "lm_eval: {tasks: [hybridlab_bpb, arc_easy], top_k: 2}\n")
    assert space.lm_eval.tasks == ("hybridlab_bpb", "arc_easy")
    assert space.lm_eval.top_k == 2 and space.lm_eval.limit is None
    assert parse_space(TINY_SPACE).lm_eval is None


def test_error_line_points_at_the_field(tmp_path):
    path = write_space(tmp_path, mutate("lr: 0.003", "lr: -1"))
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert path.read_text().splitlines()[info.value.line - 1].strip() == "lr: -1"


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml")))
def test_shipped_spaces_load(name):
    space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
    assert space.name == name


def test_state_tracking_space_draws_every_two_mixer_stack():
    text = (ROOT / "search_spaces" / "state-tracking.yaml").read_text()
    patterns = {a.pattern for _, a in draw(text, 60, 0) if isinstance(a, ArchConfig)}
    assert patterns == {f"{a}-{b}-" for a in "M3*" for b in "M3*"}


def draw(text: str, n: int, seed: int) -> list[tuple[dict, ArchConfig | str]]:
    """(trial params, architecture or rejection reason) for ``n`` random-sampler trials."""
    space = parse_space(text)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    draws: list[tuple[dict, ArchConfig | str]] = []
    for _ in range(n):
        trial = study.ask()
        try:
            outcome: ArchConfig | str = sample_architecture(trial, space, vocab_size=64)
        except Rejected as err:
            outcome = str(err)
        draws.append((trial.params, outcome))
        study.tell(trial, 0.0)
    return draws


def sample_many(text: str, n: int = 40, seed: int = 0):
    draws = draw(text, n, seed)
    return ([a for _, a in draws if isinstance(a, ArchConfig)],
            [a for _, a in draws if isinstance(a, str)])


def test_sampling_obeys_first_last_and_template_rules():
    text = mutate("depth: {low: 1, high: 2}", "depth: {low: 3, high: 6}").replace(
        "mlp_after_mixer: never",
        "mlp_after_mixer: always\n    attention_every: 3")
    archs, rejected = sample_many(text)
    assert archs and not rejected
    for arch in archs:
        mixers = arch.pattern.replace("-", "")
        assert arch.pattern == "".join(f"{m}-" for m in mixers)
        for i, symbol in enumerate(mixers):
            assert (symbol == "*") == ((i + 1) % 3 == 0), arch.pattern


def test_attention_count_rule_rejects_and_says_why():
    text = mutate("depth: {low: 1, high: 2}", "depth: {low: 2, high: 4}").replace(
        "mlp_after_mixer: never", "mlp_after_mixer: never\n    attention_count: {min: 1, max: 1}")
    archs, rejected = sample_many(text)
    assert archs and rejected
    assert all(a.pattern.count("*") == 1 for a in archs)
    assert all("attention layers, the rules allow 1..1" in r for r in rejected)


def attention_only(attention: str, d_model: str = "d_model: 48") -> str:
    text = mutate("attention: {n_heads: 2}", f"attention: {attention}").replace(
        "d_model: 32", d_model).replace("[mamba1, mamba2, attention]", "[attention]")
    return "\n".join(line for line in text.splitlines() if "mamba" not in line)


@pytest.mark.parametrize(("text", "field", "words"), [
    (attention_only("{n_heads: [4], n_kv_heads: [2, 3]}"), "model.attention.n_kv_heads",
     "3 makes no valid attention layer for any choice of n_heads, d_model "
     "(n_heads = 4 must be divisible by n_kv_heads = 3)"),
    (attention_only("{n_heads: [4, 5], n_kv_heads: 2}"), "model.attention.n_heads",
     "5 makes no valid attention layer for any choice of n_kv_heads, d_model "
     "(n_heads = 5 must be divisible by n_kv_heads = 2)"),
    (attention_only("{n_heads: {low: 5, high: 7, step: 2}, n_kv_heads: [1, 2]}"),
     "model.attention.n_heads", "(d_model = 48 must be divisible by n_heads = 5 "),
    (mutate("mamba2: {d_state: 8, headdim: 16", "mamba2: {d_state: 8, headdim: [16, 48]"),
     "model.mamba2.headdim", "48 makes no valid mamba2 layer for any choice of d_state, "
     "chunk_size, d_model (expand * d_model = 64 must be divisible by headdim = 48)"),
])
def test_choices_that_are_never_valid_are_refused_at_load(text, field, words):
    with pytest.raises(ConfigError) as info:
        parse_space(text)
    assert info.value.field == field
    assert words in info.value.message


def test_sampled_heads_are_the_recorded_heads():
    # n_kv_heads 3 fits n_heads 6 but not 4: that pair is rejected, never repaired to 2.
    draws = draw(attention_only("{n_heads: [4, 6], n_kv_heads: [2, 3]}"), n=60, seed=3)
    archs = [(params, a) for params, a in draws if isinstance(a, ArchConfig)]
    reasons = [a for _, a in draws if isinstance(a, str)]
    assert len(archs) >= 20 and reasons
    assert all("n_heads = 4 must be divisible by n_kv_heads = 3" in reason for reason in reasons)
    for params, arch in archs:
        for i, layer in enumerate(arch.layers):
            assert layer.n_heads == params[f"layer{i}.attention.n_heads"]
            assert layer.n_kv_heads == params[f"layer{i}.attention.n_kv_heads"]
    assert {a.layers[0].n_kv_heads for _, a in archs} == {2, 3}


def test_same_seed_same_proposals():
    first, rejected = sample_many(TINY_SPACE, n=10, seed=4)
    # Every TINY_SPACE draw is a valid architecture: equal empty lists would prove nothing.
    assert len(first) == 10 and not rejected
    second, _ = sample_many(TINY_SPACE, n=10, seed=4)
    other, _ = sample_many(TINY_SPACE, n=10, seed=5)
    hashes = [a.canonical_hash() for a in first]
    assert hashes == [a.canonical_hash() for a in second]
    assert hashes != [a.canonical_hash() for a in other]
    assert len(set(hashes)) > 1


def test_worker_gives_up_when_every_trial_fails(tmp_path, monkeypatch):
    from hybridlab.search import runner

    class Broken:
        def __init__(self, *args, **kwargs):
            self.slot = None

        def __call__(self, trial):
            raise RuntimeError("boom")

    monkeypatch.setattr(runner, "Objective", Broken)
    space = parse_space(TINY_SPACE)
    opts = runner.RunOptions(study="tiny", storage_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                             trials=2, workers=1, artifacts_dir=tmp_path, poll_seconds=0.01,
                             heartbeat_interval=1, grace_period=2)
    study = runner.prepare_study(space, TINY_SPACE, opts)
    assert runner.worker_loop(TINY_SPACE, None, opts, 0) == runner.max_failures(2)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 3


def searched_mlp_space(rules: str, layer_types: str = "[mamba1, attention, mlp]") -> str:
    text = mutate("depth: {low: 1, high: 2}", "depth: 4").replace(
        "[mamba1, mamba2, attention]", layer_types).replace("mlp_after_mixer: never", rules)
    return "\n".join(line for line in text.splitlines() if "mamba2" not in line)


def test_attention_fraction_counts_mixers_not_mlps():
    # 1 attention + 1 mamba + 2 MLPs: half the mixers are attention, a quarter of the layers.
    text = searched_mlp_space("mlp_after_mixer: search\n    attention_count: {max: 1}\n"
                              "    attention_fraction: {min: 0.5}")
    archs, rejected = sample_many(text, n=200, seed=1)
    assert len(archs) >= 10 and rejected
    for arch in archs:
        mixers = arch.pattern.replace("-", "")
        assert arch.n_layers == 4 and mixers.count("*") == 1, arch.pattern
        assert mixers.count("*") / len(mixers) >= 0.5, arch.pattern
    assert any("-" in arch.pattern for arch in archs)


@pytest.mark.parametrize("rules", [
    # No MLP layers: 1 attention in 4 mixers is a quarter.
    "mlp_after_mixer: never\n    attention_count: {max: 1}\n    attention_fraction: {min: 0.5}",
    # MLPs after every mixer do not count: still 1 in 4 mixers.
    "mlp_after_mixer: always\n    attention_count: {max: 1}\n    attention_fraction: {min: 0.5}",
    # Searched MLPs: 2 attention layers in 4 slots are at least 2 of at most 4 mixers.
    "mlp_after_mixer: search\n    attention_every: 2\n    attention_fraction: {max: 0.4}",
])
def test_infeasible_attention_rules_are_still_refused(rules):
    layer_types = "[mamba1, attention, mlp]" if "search" in rules else "[mamba1, attention]"
    with pytest.raises(ConfigError, match="attention_fraction") as info:
        parse_space(searched_mlp_space(rules, layer_types))
    assert info.value.field == "model.rules"


def moe_space(rules: str, *, moe: str = "{n_experts: [2, 4], top_k: [1, 2]}") -> str:
    text = mutate("depth: {low: 1, high: 2}", "depth: {low: 2, high: 6}").replace(
        "mlp_after_mixer: never", f"mlp_after_mixer: always\n    {rules}")
    return text.replace("  attention: {n_heads: 2}\n",
                        f"  attention: {{n_heads: 2}}\n  moe: {moe}\n").replace(
        "max_params: 100000", "max_params: 1000000")


@pytest.mark.parametrize("every", [0, 1, 2, 3])
def test_moe_every_puts_moe_in_place_of_every_kth_mlp(every):
    archs, rejected = sample_many(moe_space(f"moe_every: {every}"), n=30, seed=every)
    assert archs and not rejected
    for arch in archs:
        mixers, after = arch.pattern[::2], arch.pattern[1::2]
        assert len(mixers) == len(after) and set(mixers) <= {"m", "M", "*"}
        assert after == "".join("E" if every and (i + 1) % every == 0 else "-"
                                for i in range(len(mixers))), arch.pattern
        for spec in arch.layers:
            if spec.type == "moe":
                assert spec.n_experts in (2, 4) and spec.top_k in (1, 2)


def test_fields_where_zero_means_none_may_be_searched_from_zero():
    text = moe_space("moe_every: 1", moe="{n_shared_experts: [0, 2], z_loss_coef: [0.0, 0.01], "
                     "balance_coef: {low: 0.0, high: 0.1}}")
    archs, rejected = sample_many(text, n=30, seed=4)
    assert archs and not rejected
    specs = [s for a in archs for s in a.layers if s.type == "moe"]
    assert {s.n_shared_experts for s in specs} == {0, 2}
    assert {s.z_loss_coef for s in specs} == {0.0, 0.01}


def test_moe_every_can_be_searched_and_is_recorded():
    draws = draw(moe_space("moe_every: [0, 1, 2]"), 40, seed=3)
    seen = set()
    for params, arch in draws:
        assert isinstance(arch, ArchConfig), arch
        every = params["moe_every"]
        seen.add(every)
        assert arch.pattern[1::2] == "".join(
            "E" if every and (i + 1) % every == 0 else "-" for i in range(arch.n_layers // 2))
    assert seen == {0, 1, 2}


def test_an_moe_whose_top_k_exceeds_its_experts_is_rejected_not_repaired():
    text = moe_space("moe_every: 1", moe="{n_experts: [2, 4], top_k: [1, 3]}")
    archs, rejected = sample_many(text, n=40, seed=0)
    assert archs and rejected
    assert all(spec.top_k <= spec.n_experts for a in archs for spec in a.layers
               if spec.type == "moe")
    assert all("top_k = 3 must be at most n_experts = 2" in r for r in rejected)


@pytest.mark.parametrize(("text", "field", "words"), [
    (moe_space("moe_every: -1"), "model.rules.moe_every", ">= 0"),
    (moe_space("moe_every: {low: 0, high: 2}"), "model.rules.moe_every.low", ">= 1"),
    (moe_space("moe_every: [2, two]"), "model.rules.moe_every[1]", "integer"),
    (mutate("mlp_after_mixer: never", "mlp_after_mixer: never\n    moe_every: 2"),
     "model.rules.moe_every", "mlp_after_mixer: always"),
    (mutate("[mamba1, mamba2, attention]", "[mamba1, mamba2, attention, moe]"),
     "model.rules.mlp_after_mixer", "remove 'moe'"),
    (moe_space("moe_every: 2").replace("moe_every: 2", "attention_count: {max: 2}"),
     "model.moe", "not in layer_types"),
    (moe_space("moe_every: 1", moe="{n_experts: 2, top_k: [1, 3]}"),
     "model.moe.top_k", "3 makes no valid moe layer"),
    (moe_space("moe_every: 1", moe="{capacity: 2}"), "model.moe.capacity", "unknown field"),
    (moe_space("moe_every: 1", moe="{n_shared_experts: [0, -1]}"),
     "model.moe.n_shared_experts[1]", ">= 0"),
    (moe_space("moe_every: 1", moe="{balance_coef: {low: -0.1, high: 0.1}}"),
     "model.moe.balance_coef.low", ">= 0"),
    (moe_space("moe_every: 1", moe="{expert_multiplier: 0.0}"),
     "model.moe.expert_multiplier", "positive"),
])
def test_bad_moe_rules_name_the_field(text, field, words):
    with pytest.raises(ConfigError) as err:
        parse_space(text)
    assert err.value.field == field and words in err.value.message, err.value


def parallel_space(parallel: str) -> str:
    return mutate("[mamba1, mamba2, attention]", "[mamba2, parallel]").replace(
        "  attention: {n_heads: 2}\n", f"  parallel: {parallel}\n").replace(
        "max_params: 100000", "max_params: 1000000").replace("  mamba1: {d_state: [4, 8]}\n", "")


def test_parallel_blocks_are_sampled_with_their_branch_settings():
    archs, rejected = sample_many(parallel_space(
        "{ssm: [mamba2, mamba1], combine: [sum, mean], n_heads: [2, 4], d_state: [4, 8], "
        "headdim: 16, chunk_size: 16}"), n=60, seed=2)
    assert archs and not rejected
    specs = [s for a in archs for s in a.layers if s.type == "parallel"]
    assert {s.ssm for s in specs} == {"mamba2", "mamba1"}
    assert {s.combine for s in specs} == {"sum", "mean"}
    assert {s.n_heads for s in specs} == {2, 4} and {s.d_state for s in specs} == {4, 8}
    assert all("P" in a.pattern or "M" in a.pattern for a in archs)


@pytest.mark.parametrize(("parallel", "field", "words"), [
    ("{ssm: [mamba2, mamba3]}", "model.parallel.ssm[1]", "must be one of"),
    ("{combine: max}", "model.parallel.combine", "must be one of"),
    ("{combine: {low: 1, high: 2}}", "model.parallel.combine", "must be one of"),
    ("{n_heads: [2, 3], headdim: 16}", "model.parallel.n_heads", "3 makes no valid parallel"),
])
def test_bad_parallel_settings_name_the_field(parallel, field, words):
    with pytest.raises(ConfigError) as err:
        parse_space(parallel_space(parallel))
    assert err.value.field == field and words in err.value.message, err.value


def test_active_params_budget_counts_routed_experts_only():
    # Every draw: 2 mixers, each followed by an 8-expert top-1 MoE; total parameters are far
    # above the active-parameter budget, active ones straddle it by d_model.
    text = moe_space("moe_every: 1", moe="{n_experts: 8, top_k: 1}").replace(
        "depth: {low: 2, high: 6}", "depth: 2").replace("d_model: 32", "d_model: [32, 64]")
    from hybridlab.cost import active_param_count, param_count
    from hybridlab.search.objective import candidate_costs
    from hybridlab.search.space import check_budgets

    space = parse_space(text)
    archs, _ = sample_many(text, n=20, seed=1)
    small = min(active_param_count(a) for a in archs)
    large = max(active_param_count(a) for a in archs)
    assert small < large and all(param_count(a) > active_param_count(a) for a in archs)
    budget = dataclasses.replace(space.budgets, max_active_params=small, max_params=None)
    for arch in archs:
        costs = candidate_costs(arch, space)
        assert costs["active_params"] == active_param_count(arch)
        if costs["active_params"] > small:
            with pytest.raises(Rejected, match="active parameters > budget"):
                check_budgets(budget, costs)
        else:
            check_budgets(budget, costs)
    loaded = parse_space(text.replace("max_params: 1000000", "max_active_params: 5000"))
    assert loaded.budgets.max_active_params == 5000
