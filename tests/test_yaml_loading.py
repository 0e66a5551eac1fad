"""Hostile or broken YAML files fail fast with the file (and line) named, for every reader."""

from pathlib import Path

import pytest

from hybridlab.config import ArchConfig, ConfigError, load_yaml_file, load_yaml_with_lines
from hybridlab.search.space import load_space

TINY_SPACE = (Path(__file__).parent / "search" / "tiny_space.yaml").read_text()


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """"Billion laughs": each level is a list of ``width`` aliases of the level before."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        items = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{items}]")
    return "\n".join(lines) + "\n"


READERS = {
    "yaml": lambda path: load_yaml_file(path),
    "arch": ArchConfig.load,
    "space": load_space,
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("reader", READERS)
def test_alias_bomb_is_refused_at_the_alias(tmp_path, reader):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    with pytest.raises(ConfigError) as info:
        READERS[reader](path)
    err = info.value
    assert err.source == str(path)
    assert "alias" in err.message
    assert str(err).startswith(f"{path}:{err.line}: ")
    assert "*a" in path.read_text().splitlines()[err.line - 1]


@pytest.mark.timeout(20)
def test_self_referencing_alias_is_refused():
    with pytest.raises(ConfigError, match="contains it") as info:
        load_yaml_with_lines("layers:\n  - &loop [*loop]\n", source="loop.yaml")
    assert info.value.line == 2


def test_a_few_aliases_still_load(tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text(
        "d_model: 64\n"
        "vocab_size: 100\n"
        "layers:\n"
        "  - &m2 {type: mamba2, headdim: 16, d_state: 32}\n"
        "  - {type: mlp}\n"
        "  - *m2\n"
        "  - {<<: *m2, d_state: 8}\n"
    )
    config = ArchConfig.load(path)
    assert config.pattern == "M-MM"
    assert [layer.d_state for layer in config.layers if layer.type == "mamba2"] == [32, 32, 8]


def test_error_inside_an_alias_points_at_the_alias_use():
    text = "d_model: 64\nvocab_size: 100\nbad: &b {type: mlp, multiplier: -1}\nlayers:\n  - *b\n"
    data, lines = load_yaml_with_lines(text)
    with pytest.raises(ConfigError) as info:
        ArchConfig.from_dict({k: v for k, v in data.items() if k != "bad"}, lines=lines)
    assert info.value.field == "layers[0].multiplier"
    assert info.value.line == 5


@pytest.mark.parametrize("reader", READERS)
def test_binary_file_is_named(tmp_path, reader):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"name: x\n" + bytes(range(128, 256)) * 4)
    with pytest.raises(ConfigError) as info:
        READERS[reader](path)
    err = info.value
    assert err.source == str(path)
    assert err.line == 2
    assert "UTF-8" in err.message


def test_binary_space_is_named_after_the_yaml_checks(tmp_path):
    # A valid UTF-8 prefix then garbage: the decode error comes before any YAML field is read.
    path = tmp_path / "space.yaml"
    path.write_bytes(TINY_SPACE.encode() + b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_space(path)
    assert info.value.line == TINY_SPACE.count("\n") + 1


def test_missing_and_folder_paths_are_named(tmp_path):
    for path in (tmp_path / "nope.yaml", tmp_path):
        with pytest.raises(ConfigError, match="no such file") as info:
            load_yaml_file(path)
        assert info.value.source == str(path)
