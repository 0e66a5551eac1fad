import json

import pytest

from hybridlab.config import (
    ArchConfig,
    AttentionSpec,
    ConfigError,
    Mamba1Spec,
    Mamba2Spec,
    MLPSpec,
)


def mixed_config() -> ArchConfig:
    return ArchConfig(
        d_model=64,
        vocab_size=300,
        tie_embeddings=False,
        layers=(
            Mamba1Spec(d_state=8, dt_rank=3),
            AttentionSpec(n_heads=4, n_kv_heads=2, sliding_window=16),
            MLPSpec(multiplier=3.0),
            Mamba2Spec(d_state=64, headdim=16, ngroups=2, chunk_size=32),
            Mamba2Spec(d_state=16, headdim=32),
            AttentionSpec(n_heads=2, head_dim=24, rope=False),
        ),
    )


def test_pattern_uses_megatron_alphabet():
    assert mixed_config().pattern == "m*-MM*"
    config = ArchConfig.from_pattern("m*-M-*M-", d_model=32, vocab_size=50,
                                     mamba2=Mamba2Spec(headdim=16))
    assert config.pattern == "m*-M-*M-"
    assert config.layers[3] == Mamba2Spec(headdim=16)


def test_layers_of_one_type_may_differ():
    config = mixed_config()
    assert config.layers[3].d_state == 64 and config.layers[4].d_state == 16


@pytest.mark.parametrize("fmt", ["dict", "json", "yaml"])
def test_round_trip(fmt):
    config = mixed_config()
    if fmt == "dict":
        again = ArchConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    elif fmt == "json":
        again = ArchConfig.from_json(config.to_json())
    else:
        again = ArchConfig.from_yaml(config.to_yaml())
    assert again == config
    assert again.canonical_hash() == config.canonical_hash()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_file(tmp_path, suffix):
    path = tmp_path / f"arch{suffix}"
    mixed_config().save(path)
    assert ArchConfig.load(path) == mixed_config()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_hash_distinguishes_configs():
    base = mixed_config()
    other = ArchConfig.from_dict({**base.to_dict(), "d_model": 128})
    assert base.canonical_hash() != other.canonical_hash()


def test_defaults_fill_missing_fields():
    config = ArchConfig.from_dict(
        {"d_model": 32, "vocab_size": 10, "layers": [{"type": "mamba1"}, {"type": "mlp"}]}
    )
    assert config.layers[0] == Mamba1Spec()
    assert config.layers[0].resolved_dt_rank(32) == 2  # ceil(32 / 16)


def base_dict(**layer) -> dict:
    return {"d_model": 64, "vocab_size": 100, "layers": [{"type": "mlp"}, layer]}


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (base_dict(type="transformer"), "layers[1].type", "unknown layer type"),
        (base_dict(type="attention", n_heads=6, n_kv_heads=4), "layers[1].n_kv_heads",
         "divisible"),
        ({"d_model": 64, "vocab_size": 100, "layers": []}, "layers", "at least one layer"),
        ({"d_model": -8, "vocab_size": 100, "layers": [{"type": "mlp"}]}, "d_model", "positive"),
        (base_dict(type="mamba2", d_state=-16), "layers[1].d_state", "positive"),
        (base_dict(type="mamba1", expand=0), "layers[1].expand", "positive"),
        (base_dict(type="mamba2", headdim=48), "layers[1].headdim", "divisible"),
        (base_dict(type="mamba2", headdim=16, ngroups=3), "layers[1].ngroups", "divisible"),
        (base_dict(type="attention", sliding_window=-1), "layers[1].sliding_window", "positive"),
        (base_dict(type="mlp", widht=3), "layers[1].widht", "unknown field"),
        (base_dict(type="mamba1", d_state=True), "layers[1].d_state", "integer"),
        (base_dict(type="mamba1", d_state="16"), "layers[1].d_state", "integer"),
        ({"d_model": 64, "layers": [{"type": "mlp"}]}, "vocab_size", "missing"),
        (base_dict(type="mlp", multiplier=float("nan")), "layers[1].multiplier", "finite"),
        (base_dict(type="attention", rope_theta=float("inf")), "layers[1].rope_theta",
         "finite"),
        ({**base_dict(type="mlp"), "norm_eps": float("nan")}, "norm_eps", "finite"),
        ({**base_dict(type="mlp"), "norm_eps": float("-inf")}, "norm_eps", "finite"),
    ],
)
def test_bad_configs_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as info:
        ArchConfig.from_dict(data)
    assert info.value.field == field
    assert field in str(info.value) and words in str(info.value)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=r"layers\[0\].n_kv_heads"):
        ArchConfig(d_model=32, vocab_size=8, layers=(AttentionSpec(n_heads=4, n_kv_heads=3),))
    for eps in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="norm_eps: must be a finite number"):
            ArchConfig(d_model=32, vocab_size=8, layers=(MLPSpec(),), norm_eps=eps)
    with pytest.raises(ConfigError, match=r"layers\[0\].multiplier: must be a finite number"):
        ArchConfig(d_model=32, vocab_size=8, layers=(MLPSpec(multiplier=float("nan")),))
    with pytest.raises(ConfigError, match="pattern"):
        ArchConfig.from_pattern("M*x", d_model=32, vocab_size=8)


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "d_model: 64\n"
        "vocab_size: 100\n"
        "layers:\n"
        "  - type: mamba2\n"
        "    headdim: 16\n"
        "  - type: attention\n"
        "    n_heads: 8\n"
        "    n_kv_heads: 3\n"
    )
    with pytest.raises(ConfigError) as info:
        ArchConfig.load(path)
    assert info.value.line == 8
    assert str(info.value).startswith(f"{path}:8: layers[1].n_kv_heads")


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("d_model: 64\nlayers: [\n  {type: mlp\n")
    with pytest.raises(ConfigError, match=str(path)) as info:
        ArchConfig.load(path)
    assert info.value.line is not None


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ArchConfig.load(tmp_path / "nope.yaml")
