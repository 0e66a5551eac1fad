"""The mixture-of-experts layer against a per-token reference: outputs, losses, costs, config."""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from hybridlab.config import ArchConfig, ConfigError, Mamba2Spec
from hybridlab.cost import active_param_count, param_count
from hybridlab.layers import LAYER_TYPES, build_layer, layer_type
from hybridlab.layers.moe import MoE, MoESpec
from hybridlab.layers.registry import EXPORT_FORMATS
from hybridlab.model import HybridLM


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make(d_model: int, spec: MoESpec, seed: int, *, dtype=torch.float32) -> MoE:
    """A layer with every weight drawn at unit scale (1/sqrt(fan-in)), so that outputs are O(1)
    and routing is decisive (the init's 0.1-scaled router leaves it near uniform)."""
    layer = build_layer(spec, d_model)
    g = gen(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        layer.router.weight.mul_(4.0)
    return layer.to(dtype)


def reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, plain matmuls: softmax router, top-k, renormalise, SwiGLU experts."""
    d = x.shape[-1]
    tokens = x.reshape(-1, d)
    hidden = layer.d_hidden
    out = torch.zeros_like(tokens)
    wide = torch.promote_types(x.dtype, torch.float32)
    for t in range(tokens.shape[0]):
        v = tokens[t]
        logits = (layer.router.weight @ v).to(wide)
        probs = torch.exp(logits - logits.max())
        probs = probs / probs.sum()
        top, chosen = torch.topk(probs, layer.top_k)
        top = top / top.sum()
        for weight, e in zip(top, chosen.tolist(), strict=True):
            h = layer.w1[e] @ v
            value, gate = h[:hidden], h[hidden:]
            out[t] += weight * (layer.w2[e] @ (value * gate * torch.sigmoid(gate)))
        if layer.shared_experts is not None:
            fc1, fc2 = layer.shared_experts.fc1.weight, layer.shared_experts.fc2.weight
            h = fc1 @ v
            width = fc2.shape[1]
            value, gate = h[:width], h[width:]
            out[t] += fc2 @ (value * gate * torch.sigmoid(gate))
    return out.reshape(x.shape)


# (batch, seqlen, d_model, n_experts, top_k, n_shared, expert_multiplier)
SHAPES = [
    (1, 1, 16, 4, 1, 0, 1.0),
    (2, 7, 32, 8, 2, 1, 1.0),
    (3, 5, 24, 6, 3, 2, 1.5),
    (2, 9, 16, 5, 5, 0, 0.5),
    (1, 13, 32, 16, 2, 1, 0.25),
    (4, 3, 8, 2, 1, 3, 2.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_per_token_reference(shape, dtype):
    batch, seqlen, d, n_experts, top_k, shared, mult = shape
    spec = MoESpec(n_experts=n_experts, top_k=top_k, n_shared_experts=shared,
                   expert_multiplier=mult)
    seed = seed_of(shape, str(dtype))
    layer = make(d, spec, seed, dtype=dtype).eval()
    x = torch.randn(batch, seqlen, d, generator=gen(seed + 1), dtype=dtype)
    with torch.no_grad():
        got = layer(x)
        want = reference(layer, x)
    assert got.shape == x.shape and got.dtype == dtype
    assert want.abs().max() > 0.1  # a real signal, not an output near zero
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_every_expert_is_used_somewhere_and_train_mode_computes_the_same():
    spec = MoESpec(n_experts=8, top_k=2, n_shared_experts=1)
    layer = make(32, spec, 5)
    x = torch.randn(4, 16, 32, generator=gen(6))
    with torch.no_grad():
        trained = layer.train()(x)
        evaluated = layer.eval()(x)
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)
    assert (layer.load > 0).all()  # a test where every expert's slice is non-empty
    torch.testing.assert_close(evaluated, reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tokens", "top_k"), [(1, 2), (2, 3), (3, 2)])
def test_gradients_reach_only_the_chosen_experts(tokens, top_k):
    n_experts, d = 16, 16
    spec = MoESpec(n_experts=n_experts, top_k=top_k, n_shared_experts=1)
    seed = seed_of(tokens, top_k)
    layer = make(d, spec, seed).eval()  # eval: no aux loss, the router learns through weights
    x = torch.randn(1, tokens, d, generator=gen(seed + 1))
    upstream = torch.randn(1, tokens, d, generator=gen(seed + 2))
    (layer(x) * upstream).sum().backward()
    with torch.no_grad():
        chosen = layer.router(x[0]).softmax(-1).topk(top_k, dim=-1).indices.unique().tolist()
    assert len(chosen) < n_experts
    for e in range(n_experts):
        for w in (layer.w1, layer.w2):
            if e in chosen:
                assert w.grad[e].abs().sum() > 0, f"expert {e} was chosen but got no gradient"
            else:
                assert torch.count_nonzero(w.grad[e]) == 0, f"expert {e} unchosen, got gradient"
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.shared_experts.fc1.weight.grad.abs().sum() > 0


def test_gradients_match_the_reference():
    spec = MoESpec(n_experts=6, top_k=2, n_shared_experts=1)
    layer = make(16, spec, 11, dtype=torch.float64)
    x = torch.randn(2, 5, 16, generator=gen(12), dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 16, generator=gen(13), dtype=torch.float64)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad((layer.eval()(x) * upstream).sum(), params)
    want = torch.autograd.grad((reference(layer, x) * upstream).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def expected_aux(layer: MoE, x: torch.Tensor, balance_coef: float, z_coef: float):
    """The Switch / GShard balance loss and the ST-MoE z-loss, from their definitions."""
    tokens = x.reshape(-1, x.shape[-1]).double()
    logits = tokens @ layer.router.weight.double().T  # (T, E)
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    n_tokens, n_experts = logits.shape
    chosen = probs.topk(layer.top_k, dim=-1).indices  # (T, k)
    f = torch.tensor([(chosen == i).sum().item() for i in range(n_experts)],
                     dtype=torch.float64) / (n_tokens * layer.top_k)
    p = probs.sum(0) / n_tokens
    balance = n_experts * sum(f[i] * p[i] for i in range(n_experts))
    z = sum(torch.log(torch.exp(logits[t]).sum()) ** 2 for t in range(n_tokens)) / n_tokens
    return balance_coef * balance + z_coef * z, f


@pytest.mark.parametrize(("n_experts", "top_k", "balance_coef", "z_coef"),
                         [(8, 2, 0.01, 0.001), (4, 1, 1.0, 0.0), (6, 3, 0.0, 0.5),
                          (5, 5, 0.3, 0.2)])
def test_aux_loss_matches_its_definition(n_experts, top_k, balance_coef, z_coef):
    spec = MoESpec(n_experts=n_experts, top_k=top_k, balance_coef=balance_coef,
                   z_loss_coef=z_coef)
    seed = seed_of(n_experts, top_k, balance_coef)
    layer = make(24, spec, seed).train()
    x = torch.randn(3, 7, 24, generator=gen(seed + 1))
    layer(x)
    want, load = expected_aux(layer, x, balance_coef, z_coef)
    assert layer.aux_loss.dim() == 0
    torch.testing.assert_close(layer.aux_loss.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.load.double(), load, rtol=1e-6, atol=1e-7)
    assert not layer.load.requires_grad
    if balance_coef or z_coef:
        layer.aux_loss.backward()
        assert layer.router.weight.grad.abs().sum() > 0


def test_uniform_router_gives_balance_one_and_z_loss_log_squared():
    n_experts = 8
    layer = make(16, MoESpec(n_experts=n_experts, balance_coef=1.0, z_loss_coef=0.0), 0).train()
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(2, 6, 16, generator=gen(1))
    layer(x)
    torch.testing.assert_close(layer.aux_loss, torch.tensor(1.0))
    layer.z_loss_coef, layer.balance_coef = 1.0, 0.0
    layer(x)
    torch.testing.assert_close(layer.aux_loss, torch.tensor(math.log(n_experts) ** 2))


def test_eval_sets_load_but_no_aux_loss():
    layer = make(16, MoESpec(n_experts=4), 0)
    x = torch.randn(2, 5, 16, generator=gen(1))
    layer.train()(x)
    assert layer.aux_loss is not None
    layer.eval()(x)
    assert layer.aux_loss is None
    assert layer.load.shape == (4,)
    torch.testing.assert_close(layer.load.sum(), torch.tensor(1.0))


def test_bfloat16_autocast_runs_and_stays_close():
    layer = make(32, MoESpec(n_experts=4, n_shared_experts=1), 3).eval()
    x = torch.randn(2, 8, 32, generator=gen(4))
    with torch.no_grad():
        full = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x)
    torch.testing.assert_close(low.float(), full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("d", "spec"), [
    (32, MoESpec()),
    (24, MoESpec(n_experts=6, top_k=3, n_shared_experts=2, expert_multiplier=1.5)),
    (40, MoESpec(n_experts=3, top_k=1, n_shared_experts=1, expert_multiplier=0.3,
                 multiple_of=8)),
])
def test_param_counts_equal_the_module(d, spec):
    layer = build_layer(spec, d)
    assert spec.params(d) == sum(p.numel() for p in layer.parameters())
    one_expert = layer.w1[0].numel() + layer.w2[0].numel()
    shared = 0 if layer.shared_experts is None else sum(
        p.numel() for p in layer.shared_experts.parameters())
    assert shared == spec.n_shared_experts * one_expert
    active = layer.router.weight.numel() + spec.top_k * one_expert + shared
    assert spec.active_params(d) == active
    assert spec.flops(d, 100) == 2 * active
    assert spec.state_bytes(d, 100, cache_bytes=2) == 0
    hidden = spec.d_expert(d)
    assert hidden % spec.multiple_of == 0 and hidden >= spec.expert_multiplier * d
    assert layer.w1.shape == (spec.n_experts, 2 * hidden, d)
    assert spec.width(d) == hidden * spec.top_k
    assert spec.semantics(d) == {"n_experts": spec.n_experts, "top_k": spec.top_k,
                                 "expert_width": hidden,
                                 "n_shared_experts": spec.n_shared_experts}


def stack_config(*, tie: bool = True) -> ArchConfig:
    return ArchConfig.from_pattern(
        "ME*E", d_model=32, vocab_size=50, tie_embeddings=tie,
        moe=MoESpec(n_experts=4, top_k=2, n_shared_experts=1),
        mamba2=Mamba2Spec(d_state=16, headdim=16, chunk_size=8),
    )


@pytest.mark.parametrize("tie", [True, False])
def test_model_param_count_equals_cost_model(tie):
    config = stack_config(tie=tie)
    assert config.pattern == "ME*E"
    model = HybridLM(config, seed=0)
    assert param_count(config) == sum(p.numel() for p in model.parameters())
    # Active: all but the unchosen experts of each MoE layer.
    unchosen = sum(
        (spec.n_experts - spec.top_k) * 3 * config.d_model * spec.d_expert(config.d_model)
        for spec in config.layers if spec.type == "moe"
    )
    assert active_param_count(config) == param_count(config) - unchosen


def decisive_model(config: ArchConfig, seed: int) -> HybridLM:
    """The init's router is near uniform; a sharper one makes decode routing nontrivial."""
    model = HybridLM(config, seed=seed).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoE):
                module.router.weight.mul_(100.0)
    return model


@pytest.mark.parametrize(("batch", "seqlen", "prefill"), [(1, 1, 0), (2, 11, 1), (3, 17, 9)])
def test_hybrid_decoding_reproduces_full_logits(batch, seqlen, prefill):
    seed = seed_of(batch, seqlen, prefill)
    model = decisive_model(stack_config(), seed)
    ids = torch.randint(50, (batch, seqlen), generator=gen(seed + 1))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(batch, seqlen)
        parts = [model(ids[:, :prefill], cache=cache)] if prefill else []
        parts += [model.step(ids[:, t], cache)[:, None] for t in range(prefill, seqlen)]
    assert cache.seqlen == seqlen
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_hybrid_generate_with_cache_equals_without():
    model = decisive_model(stack_config(), 3)
    prompt = torch.randint(50, (2, 5), generator=gen(4))
    cached = model.generate(prompt, 10)
    assert torch.equal(cached, model.generate(prompt, 10, use_cache=False))


@pytest.mark.parametrize(("batch", "seqlen"), [(1, 1), (2, 13)])
def test_layer_step_equals_forward(batch, seqlen):
    layer = make(32, MoESpec(n_experts=8, top_k=2, n_shared_experts=1), seqlen).eval()
    x = torch.randn(batch, seqlen, 32, generator=gen(batch))
    assert layer.allocate_cache(batch, seqlen, device=x.device, dtype=x.dtype) is None
    with torch.no_grad():
        full = layer(x)
        stepped = torch.stack([layer.step(x[:, t], None) for t in range(seqlen)], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


def test_training_step_gives_finite_gradients_with_aux_loss():
    model = HybridLM(stack_config(), seed=1).train()
    ids = torch.randint(50, (2, 12), generator=gen(2))
    logits = model(ids)
    aux = [m.aux_loss for m in model.modules() if isinstance(m, MoE)]
    assert len(aux) == 2 and all(a is not None for a in aux)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)) + sum(aux)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = HybridLM(stack_config(), seed=7).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    second = HybridLM(stack_config(), seed=7).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    layer = HybridLM(stack_config(), seed=7).backbone.layers[1].mixer
    # Router scale 0.1 of fan-in (near-uniform routing); experts at fan-in.
    d_model = layer.router.in_features
    assert layer.router.weight.std().item() == pytest.approx(0.1 / math.sqrt(d_model), rel=0.2)
    assert layer.w1.std().item() == pytest.approx(1 / math.sqrt(d_model), rel=0.1)


def test_config_round_trips():
    config = ArchConfig.from_pattern(
        "ME*E-", d_model=32, vocab_size=50,
        moe=MoESpec(n_experts=6, top_k=3, n_shared_experts=0, expert_multiplier=0.5,
                    balance_coef=0.0, z_loss_coef=0.0),
        mamba2=Mamba2Spec(headdim=16, chunk_size=8),
    )
    assert ArchConfig.from_dict(config.to_dict()) == config
    assert ArchConfig.from_yaml(config.to_yaml()) == config
    assert ArchConfig.from_json(config.to_json()) == config
    assert config.to_dict()["layers"][1] == {
        "type": "moe", "n_experts": 6, "top_k": 3, "expert_multiplier": 0.5, "multiple_of": 16,
        "n_shared_experts": 0, "balance_coef": 0.0, "z_loss_coef": 0.0,
    }
    defaults = ArchConfig.from_dict({"d_model": 32, "vocab_size": 50,
                                     "layers": [{"type": "mamba2", "headdim": 16},
                                                {"type": "moe"}]})
    assert defaults.layers[1] == MoESpec()


@pytest.mark.parametrize(("fields", "bad"), [
    ({"top_k": 9}, "top_k"),
    ({"n_experts": 2, "top_k": 3}, "top_k"),
    ({"n_experts": 0}, "n_experts"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": "two"}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"expert_multiplier": 0}, "expert_multiplier"),
    ({"multiple_of": 0}, "multiple_of"),
    ({"balance_coef": -0.1}, "balance_coef"),
    ({"z_loss_coef": float("nan")}, "z_loss_coef"),
    ({"z_loss_coef": "big"}, "z_loss_coef"),
    ({"capacity_factor": 1.25}, "capacity_factor"),
])
def test_bad_fields_name_the_field(fields, bad):
    data = {"d_model": 32, "vocab_size": 50,
            "layers": [{"type": "mamba2", "headdim": 16}, {"type": "moe", **fields}]}
    with pytest.raises(ConfigError) as err:
        ArchConfig.from_dict(data)
    assert err.value.field == f"layers[1].{bad}"


def test_yaml_error_gives_the_line():
    text = ("d_model: 32\nvocab_size: 50\nlayers:\n  - type: mamba2\n    headdim: 16\n"
            "  - type: moe\n    n_experts: 4\n    top_k: 6\n")
    with pytest.raises(ConfigError) as err:
        ArchConfig.from_yaml(text, source="moe.yaml")
    assert err.value.field == "layers[1].top_k"
    assert err.value.line == 8


def test_registry_entry():
    entry = LAYER_TYPES["moe"]
    assert layer_type(MoESpec()) is entry
    assert entry.label == "MoE" and not entry.mixes_sequence
    assert len({t.colour for t in LAYER_TYPES.values()}) == len(LAYER_TYPES)
    for fmt in EXPORT_FORMATS:
        assert entry.refusal(fmt), fmt
    assert not getattr(MoE, "no_weight_decay", ())
