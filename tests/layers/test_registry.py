"""Every registered layer type has every piece the platform reads: a test per type and piece, so
a new type that forgets one fails here (README: "Adding a layer type")."""

import dataclasses
import json
import re
import zlib
from typing import ClassVar

import optuna
import pytest
import torch

from hybridlab.config import ArchConfig
from hybridlab.cost import cost_report, param_count
from hybridlab.export import ExportError, ExportRefused, export_model, load_hybridlab
from hybridlab.export.writer import WRITES, check_layer_coverage
from hybridlab.layers import LAYER_TYPES, SYMBOLS, LayerSpec, build_layer
from hybridlab.layers.registry import EXPORT_FORMATS, NO_WEIGHT_DECAY, no_weight_decay_ids
from hybridlab.model import HybridLM
from hybridlab.search.space import Rejected, parse_space, sample_architecture
from hybridlab_dashboard.data import layer_types as dashboard_layer_types

D_MODEL = 64
# Every default spec is valid at this width except where a field must fit it: small settings
# that keep each type's test fast, keyed by type (a new type needs no entry).
SMALL = {
    "mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 8},
    "parallel": {"d_state": 16, "headdim": 16, "chunk_size": 8},
}
NAMES = sorted(LAYER_TYPES)


def small_spec(name: str) -> LayerSpec:
    return LAYER_TYPES[name].spec(**SMALL.get(name, {}))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stack(name: str) -> tuple[ArchConfig, int]:
    """A stack every format could hold but for the type, and the type's index in it: a mixer
    between two Mamba-2 + MLP blocks' halves (``M-X-``); a per-token type in place of the MLP
    after a Mamba-2 layer (``MX``)."""
    mixer, mlp, layer = small_spec("mamba2"), small_spec("mlp"), small_spec(name)
    if LAYER_TYPES[name].mixes_sequence:
        layers, index = (mixer, mlp, layer, mlp), 2
    else:
        layers, index = (mixer, layer), 1
    return ArchConfig(d_model=D_MODEL, vocab_size=48, layers=layers), index


def test_the_built_in_types_are_registered():
    assert {"mamba1", "mamba2", "attention", "mlp", "moe", "parallel"} <= set(LAYER_TYPES)


@pytest.mark.parametrize("name", NAMES)
def test_declaration(name):
    entry = LAYER_TYPES[name]
    spec_cls = entry.spec
    assert dataclasses.is_dataclass(spec_cls) and issubclass(spec_cls, LayerSpec)
    assert entry.name == name == spec_cls.type
    assert SYMBOLS[spec_cls.symbol] is entry and len(spec_cls.symbol) == 1
    assert entry.label.strip() and re.fullmatch(r"#[0-9a-f]{6}", entry.colour)
    assert [t.colour for t in LAYER_TYPES.values()].count(entry.colour) == 1
    for fmt, reason in entry.refused.items():
        assert fmt in EXPORT_FORMATS and reason.strip()


@pytest.mark.parametrize("name", NAMES)
def test_fields_are_search_parameters_with_kinds_and_defaults(name):
    spec_cls = LAYER_TYPES[name].spec
    kinds = spec_cls.field_kinds()
    assert kinds and set(kinds.values()) <= {int, float, bool, str}
    default = spec_cls()
    for field, words in spec_cls.words.items():
        assert kinds[field] is str and getattr(default, field) in words
    for field in spec_cls.may_be_zero:
        assert field in kinds
    # Each field can be named in a search space, and a sampled layer takes the value given.
    settings = {k: v for k, v in dataclasses.asdict(small_spec(name)).items() if v is not None}
    block = ", ".join(f"{k}: {json.dumps(v)}" for k, v in settings.items())
    types = f"[{name}]" if LAYER_TYPES[name].mixes_sequence else f"[mamba2, {name}]"
    space = parse_space(f"""
name: registry
task: {{name: mqar, options: {{vocab_size: 48, seq_len: 16, num_kv_pairs: 2, n_test: 8}}}}
train: {{steps: 1}}
model:
  d_model: {D_MODEL}
  depth: 2
  layer_types: {types}
  rules: {{mlp_after_mixer: search}}
  {name}: {{{block}}}
""" + ("" if name == "mamba2" or LAYER_TYPES[name].mixes_sequence
       else "  mamba2: {d_state: 16, headdim: 16, chunk_size: 8}\n"))
    assert set(space.model.layer_params[name]) == set(settings)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = []
    for _ in range(20):
        try:
            arch = sample_architecture(study.ask(), space, vocab_size=48)
        except Rejected:
            continue
        sampled += [spec for spec in arch.layers if spec.type == name]
    assert sampled and all(spec == small_spec(name) for spec in sampled)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_and_pattern(name):
    config, index = stack(name)
    assert config.pattern[index] == LAYER_TYPES[name].spec.symbol
    assert ArchConfig.from_yaml(config.to_yaml()) == config
    assert ArchConfig.from_dict(json.loads(config.to_json())) == config
    json.dumps(small_spec(name).semantics(D_MODEL))  # semantics are plain data
    assert small_spec(name).width(D_MODEL) > 0


@pytest.mark.parametrize("name", NAMES)
def test_module_cost_and_cache_agree_with_the_spec(name):
    spec = small_spec(name)
    layer = build_layer(spec, D_MODEL)
    for method in ("forward", "step", "allocate_cache", "reset_parameters"):
        assert callable(getattr(layer, method)), method
    assert spec.params(D_MODEL) == sum(p.numel() for p in layer.parameters())
    assert 0 < spec.active_params(D_MODEL) <= spec.params(D_MODEL)
    for context in (1, 100, 5000):
        for decode in (False, True):
            flops = spec.flops(D_MODEL, context, decode=decode)
            assert 0 < flops < float("inf")
        cache = layer.allocate_cache(2, context, device=torch.device("cpu"),
                                     dtype=torch.bfloat16)
        held = 0 if cache is None else sum(t.numel() * t.element_size() for t in cache.tensors())
        assert held == 2 * spec.state_bytes(D_MODEL, context, cache_bytes=2), context
    for weight_free in getattr(type(layer), NO_WEIGHT_DECAY, ()):
        layer.get_parameter(weight_free)  # names a real parameter


@pytest.mark.parametrize("name", NAMES)
def test_seeded_init_decode_equals_forward_and_cost_model(name):
    config, index = stack(name)
    seed = zlib.crc32(name.encode())
    model = HybridLM(config, seed=seed).eval()
    assert all(torch.equal(a, b) for a, b in zip(
        model.state_dict().values(), HybridLM(config, seed=seed).state_dict().values(),
        strict=True))
    assert param_count(config) == sum(p.numel() for p in model.parameters())
    report = cost_report(config, 64)
    assert [layer.type for layer in report.layers] == [spec.type for spec in config.layers]
    assert report.layers[index].type == name
    ids = torch.randint(48, (2, 9), generator=gen(seed))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 9)
        parts = [model(ids[:, :4], cache=cache)]
        parts += [model.step(ids[:, t], cache)[:, None] for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
    # The trainer's no-decay set holds every vector and every marked matrix, nothing else.
    exempt = no_weight_decay_ids(model)
    assert all(id(p) in exempt for p in model.parameters() if p.dim() < 2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_every_format_writes_the_type_or_refuses_with_its_reason(name, fmt, tmp_path):
    entry = LAYER_TYPES[name]
    config, index = stack(name)
    try:
        export_model(HybridLM(config, seed=1), fmt, tmp_path / "out")
    except ExportRefused as refused:
        text = str(refused)
        assert f"layers[{index}]" in text, text  # the refusal names this layer...
        if entry.refusal(fmt) is not None:  # ...and the registry's reason when it has one
            assert entry.refusal(fmt) in text
        return
    assert entry.refusal(fmt) is None, f"{fmt} wrote {name}, which the registry refuses"
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("name", NAMES)
def test_hybridlab_format_holds_every_type_with_its_card(name, tmp_path):
    config, index = stack(name)
    model = HybridLM(config, seed=2)
    result = export_model(model, "hybridlab", tmp_path / "out")
    assert result.faithful
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{LAYER_TYPES[name].spec.symbol} {name}" in card and f"- {name}" in card
    loaded = load_hybridlab(tmp_path / "out")
    ids = torch.randint(48, (1, 7), generator=gen(index))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), model.eval()(ids))


@pytest.mark.parametrize("name", NAMES)
def test_dashboard_draws_the_type(name):
    drawn = {t["type"]: t for t in dashboard_layer_types()}
    entry = LAYER_TYPES[name]
    assert drawn[name] == {"type": name, "symbol": entry.spec.symbol, "label": entry.label,
                           "colour": entry.colour, "mixer": entry.mixes_sequence}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_each_format_maps_or_refuses_each_type_never_both(name, fmt):
    assert set(WRITES) == set(EXPORT_FORMATS)
    check_layer_coverage(fmt, {name})
    assert (name in WRITES[fmt]) != (LAYER_TYPES[name].refusal(fmt) is not None)


def test_a_type_no_format_knows_is_refused_by_name_not_written(monkeypatch, tmp_path):
    """A registered type whose entry forgets the formats: export stops with what to add."""
    mlp = LAYER_TYPES["mlp"]

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Forgotten(type(small_spec("mlp"))):
        type: ClassVar[str] = "forgotten"
        symbol: ClassVar[str] = "F"

    entry = dataclasses.replace(mlp, spec=Forgotten, refused={})
    monkeypatch.setitem(LAYER_TYPES, "forgotten", entry)
    monkeypatch.setitem(SYMBOLS, "F", entry)
    config = ArchConfig(d_model=D_MODEL, vocab_size=48,
                        layers=(small_spec("mamba2"), Forgotten()))
    model = HybridLM(config)
    for fmt in EXPORT_FORMATS:
        with pytest.raises(ExportError, match=f"format '{fmt}' neither maps nor refuses layer "
                                              "type 'forgotten'"):
            export_model(model, fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()
