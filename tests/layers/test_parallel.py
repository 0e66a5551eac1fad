"""The parallel hybrid block against its two branches: outputs, cost, decoding, config."""

import zlib

import pytest
import torch

from hybridlab.config import ArchConfig, ConfigError
from hybridlab.cost import inference_state_bytes, param_count
from hybridlab.layers import (
    LAYER_TYPES,
    Attention,
    Mamba1,
    Mamba2,
    Parallel,
    ParallelSpec,
    RMSNorm,
    build_layer,
)
from hybridlab.model import HybridLM


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


SPECS = [
    ParallelSpec(n_heads=4, d_state=16, headdim=8, chunk_size=4),
    ParallelSpec(n_heads=4, n_kv_heads=2, d_state=8, headdim=16, chunk_size=8, combine="mean",
                 sliding_window=5),
    ParallelSpec(ssm="mamba1", n_heads=2, head_dim=12, d_state=4, expand=1,
                 attention_scale=0.5, ssm_scale=1.7),
    ParallelSpec(ssm="mamba1", n_heads=8, d_state=8, combine="mean", rope=False, dt_rank=3),
]


def built(spec: ParallelSpec, d: int, seed: int) -> Parallel:
    layer = build_layer(spec, d)
    layer.reset_parameters(gen(seed), n_layers=2)
    if layer.attention_norm is not None:
        with torch.no_grad():  # non-trivial learnable scales
            layer.attention_norm.weight.uniform_(0.5, 1.5, generator=gen(seed + 1))
            layer.ssm_norm.weight.uniform_(0.5, 1.5, generator=gen(seed + 2))
    return layer.eval()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(("batch", "seqlen"), [(1, 1), (2, 9), (3, 16)])
def test_output_is_the_published_combination_of_the_branches(spec, batch, seqlen):
    d = 32
    seed = seed_of(spec, batch, seqlen)
    layer = built(spec, d, seed)
    assert isinstance(layer.attention, Attention)
    assert isinstance(layer.ssm, Mamba2 if spec.ssm == "mamba2" else Mamba1)
    # Each branch, rebuilt on its own from its spec with the same weights.
    attention, ssm = (build_layer(s, d).eval() for s in spec.branches())
    attention.load_state_dict(layer.attention.state_dict())
    ssm.load_state_dict(layer.ssm.state_dict())
    x = torch.randn(batch, seqlen, d, generator=gen(seed + 3))
    with torch.no_grad():
        a, s = attention(x), ssm(x)
        if spec.combine == "mean":
            na, ns = RMSNorm(d), RMSNorm(d)
            na.weight.copy_(layer.attention_norm.weight)
            ns.weight.copy_(layer.ssm_norm.weight)
            expected = (na(a) + ns(s)) / 2
        else:
            expected = spec.attention_scale * a + spec.ssm_scale * s
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(("batch", "seqlen", "prefill"), [(1, 1, 0), (2, 11, 4), (2, 13, 13)])
def test_layer_decode_equals_forward(spec, batch, seqlen, prefill):
    d = 32
    seed = seed_of(spec, batch, seqlen, prefill)
    layer = built(spec, d, seed)
    x = torch.randn(batch, seqlen, d, generator=gen(seed + 1))
    with torch.no_grad():
        full = layer(x)
        cache = layer.allocate_cache(batch, seqlen, device=x.device, dtype=x.dtype)
        parts = [layer(x[:, :prefill], cache=cache)] if prefill else []
        parts += [layer.step(x[:, t], cache)[:, None] for t in range(prefill, seqlen)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


def stack(spec: ParallelSpec, *, tie: bool = True) -> ArchConfig:
    return ArchConfig.from_pattern("P-*-P-", d_model=32, vocab_size=40, tie_embeddings=tie,
                                   parallel=spec)


@pytest.mark.parametrize("spec", SPECS)
def test_hybrid_decoding_reproduces_full_logits(spec):
    seed = seed_of(spec)
    config = stack(spec)
    model = HybridLM(config, seed=seed).eval()
    ids = torch.randint(40, (2, 12), generator=gen(seed))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 12)
        parts = [model(ids[:, :5], cache=cache)]
        parts += [model.step(ids[:, t], cache)[:, None] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
    # The cache holds both branches' state: what the cost model says, at these dtypes.
    assert cache.nbytes() == inference_state_bytes(config, 12, dtype=torch.float32, batch_size=2)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("d", [32, 48])
def test_cost_is_the_sum_of_the_branches_plus_the_combination(spec, d):
    attention, ssm = spec.branches()
    layer = build_layer(spec, d)
    combination = 2 * d if spec.combine == "mean" else 0
    assert spec.params(d) == attention.params(d) + ssm.params(d) + combination
    assert spec.params(d) == sum(p.numel() for p in layer.parameters())
    assert sum(p.numel() for p in layer.attention.parameters()) == attention.params(d)
    assert sum(p.numel() for p in layer.ssm.parameters()) == ssm.params(d)
    for context in (1, 7, 300):
        for decode in (False, True):
            assert spec.flops(d, context, decode=decode) == (
                attention.flops(d, context, decode=decode) + ssm.flops(d, context, decode=decode))
        assert spec.state_bytes(d, context, cache_bytes=2) == (
            attention.state_bytes(d, context, cache_bytes=2)
            + ssm.state_bytes(d, context, cache_bytes=2))
    assert spec.width(d) == attention.width(d) + ssm.width(d)


@pytest.mark.parametrize("tie", [True, False])
def test_model_param_count_equals_cost_model(tie):
    config = stack(SPECS[1], tie=tie)
    assert param_count(config) == sum(p.numel() for p in HybridLM(config).parameters())


def test_ssm_dynamics_and_norms_take_no_weight_decay():
    from hybridlab.layers.registry import no_weight_decay_ids

    for spec in SPECS:
        model = HybridLM(stack(spec))
        layer = model.backbone.layers[0].mixer
        exempt = no_weight_decay_ids(model)
        assert id(layer.ssm.A_log) in exempt and id(layer.ssm.D) in exempt
        assert id(layer.attention.in_proj.weight) not in exempt
        if layer.attention_norm is not None:
            assert id(layer.attention_norm.weight) in exempt


def test_config_round_trips_and_names_the_pattern():
    config = stack(SPECS[2])
    assert config.pattern == "P-*-P-"
    assert ArchConfig.from_yaml(config.to_yaml()) == config
    assert ArchConfig.from_dict(config.to_dict()).layers[0] == SPECS[2]


@pytest.mark.parametrize(("fields", "bad"), [
    ({"ssm": "mamba3"}, "ssm"),
    ({"combine": "max"}, "combine"),
    ({"n_heads": 5}, "n_heads"),  # 32 % 5
    ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
    ({"headdim": 24}, "headdim"),  # expand * 32 = 64 % 24
    ({"attention_scale": 0}, "attention_scale"),
    ({"ssm_scale": float("inf")}, "ssm_scale"),
    ({"d_state": 0}, "d_state"),
    ({"dt_rank": "big"}, "dt_rank"),
    ({"mlp": True}, "mlp"),
])
def test_bad_fields_name_the_field(fields, bad):
    data = {"d_model": 32, "vocab_size": 40, "layers": [{"type": "parallel", **fields}]}
    with pytest.raises(ConfigError) as err:
        ArchConfig.from_dict(data)
    assert err.value.field == f"layers[0].{bad}"


def test_registry_entry():
    entry = LAYER_TYPES["parallel"]
    assert entry.mixes_sequence and entry.label
    for fmt in ("hf", "mamba_ssm", "megatron"):
        assert entry.refusal(fmt), fmt
