"""Architecture genome: ``ArchConfig``, a list of layer specs.

A hybrid is a list of layers, each of a type from the layer registry (``hybridlab.layers``:
``mamba1`` | ``mamba2`` | ``attention`` | ``mlp`` | ...), each with its own settings (a 64-state
Mamba-2 layer may sit next to a 16-state one). Configs are frozen dataclasses that round-trip
through dict, JSON and YAML; every validation error names the field (``layers[3].n_kv_heads``)
and, when the config came from a file, the file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridlab.errors import ConfigError
from hybridlab.layers import (
    LAYER_TYPES,
    SYMBOLS,
    AttentionSpec,
    LayerSpec,
    Mamba1Spec,
    Mamba2Spec,
    MLPSpec,
)
from hybridlab.layers.spec import check_keys, positive, read_bool, read_float, read_int

# The genome's public names: the built-in specs are importable from here as from their modules.
__all__ = [
    "ArchConfig",
    "AttentionSpec",
    "ConfigError",
    "LayerSpec",
    "MLPSpec",
    "Mamba1Spec",
    "Mamba2Spec",
    "load_yaml_file",
    "load_yaml_with_lines",
    "read_text_file",
]


@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    """The genome of one hybrid language model."""

    d_model: int
    vocab_size: int
    layers: tuple[LayerSpec, ...] = field(default_factory=tuple)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        validate(self)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def pattern(self) -> str:
        """Megatron-style pattern: "M" mamba2, "m" mamba1, "*" attention, "-" mlp."""
        return "".join(layer.symbol for layer in self.layers)

    @classmethod
    def from_pattern(
        cls,
        pattern: str,
        *,
        d_model: int,
        vocab_size: int,
        tie_embeddings: bool = True,
        **specs: LayerSpec,
    ) -> ArchConfig:
        """Build a config from a pattern string; ``specs`` by type name (``mamba2=Mamba2Spec(
        d_state=16)``) set each type's layers, defaults for the types not given."""
        for name, spec in specs.items():
            if name not in LAYER_TYPES or not isinstance(spec, LAYER_TYPES[name].spec):
                raise TypeError(f"from_pattern: {name}={spec!r} is not a {name} spec")
        layers = []
        for i, symbol in enumerate(pattern):
            if symbol not in SYMBOLS:
                raise ConfigError(
                    f"pattern[{i}]",
                    f"unknown layer symbol {symbol!r}; expected one of {''.join(SYMBOLS)!r}",
                )
            entry = SYMBOLS[symbol]
            layers.append(specs.get(entry.name) or entry.spec())
        return cls(
            d_model=d_model, vocab_size=vocab_size, layers=tuple(layers),
            tie_embeddings=tie_embeddings,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "tie_embeddings": self.tie_embeddings,
            "norm_eps": self.norm_eps,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str | None = None,
        lines: Mapping[str, int] | None = None,
    ) -> ArchConfig:
        """Parse a plain dict; ``source``/``lines`` (field path -> line) only decorate errors."""
        try:
            return _arch_from_dict(data)
        except ConfigError as err:
            raise ConfigError(
                err.field, err.message, source=source, line=line_for(err.field, lines)
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, *, source: str | None = None) -> ArchConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError("<document>", f"invalid JSON: {err.msg}", source=source,
                              line=err.lineno) from None
        return cls.from_dict(data, source=source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, *, source: str | None = None) -> ArchConfig:
        data, lines = load_yaml_with_lines(text, source=source)
        return cls.from_dict(data, source=source, lines=lines)

    def save(self, path: str | Path) -> None:
        """Write YAML (or JSON for .json) via a temp file and a rename: never half-written."""
        path = Path(path)
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ArchConfig:
        path = Path(path)
        text = read_text_file(path)
        if path.suffix == ".json":
            return cls.from_json(text, source=str(path))
        return cls.from_yaml(text, source=str(path))

    def canonical_hash(self) -> str:
        """Stable identity of the architecture: equal configs hash equal, whatever their source."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def line_for(field_path: str, lines: Mapping[str, int] | None) -> int | None:
    """Line of the field, or of its closest enclosing field (``layers[2]`` for a missing key)."""
    if not lines:
        return None
    path = field_path
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None


def _spec_from_dict(data: Any, where: str) -> LayerSpec:
    if not isinstance(data, Mapping):
        raise ConfigError(where.rstrip("."), f"must be a mapping with a 'type', got {data!r}")
    kind = data.get("type")
    if kind not in LAYER_TYPES:
        raise ConfigError(
            f"{where}type", f"unknown layer type {kind!r}; expected one of {sorted(LAYER_TYPES)}"
        )
    return LAYER_TYPES[kind].spec.from_dict(data, where)


def _arch_from_dict(data: Any) -> ArchConfig:
    if not isinstance(data, Mapping):
        raise ConfigError("<document>", f"must be a mapping, got {type(data).__name__}")
    top = {f.name for f in dataclasses.fields(ArchConfig)}
    check_keys(data, top, "")
    for required in ("d_model", "vocab_size", "layers"):
        if required not in data:
            raise ConfigError(required, "missing required field")
    layers_data = data["layers"]
    if not isinstance(layers_data, list):
        raise ConfigError("layers", f"must be a list of layer specs, got {layers_data!r}")
    layers = tuple(_spec_from_dict(item, f"layers[{i}].") for i, item in enumerate(layers_data))
    return ArchConfig(
        d_model=read_int(data, "d_model", "", default=None),
        vocab_size=read_int(data, "vocab_size", "", default=None),
        layers=layers,
        tie_embeddings=read_bool(data, "tie_embeddings", "", default=True),
        norm_eps=read_float(data, "norm_eps", "", default=1e-5),
    )


def validate(config: ArchConfig) -> None:
    """Check every field; raises ConfigError naming the first bad one."""
    for name in ("d_model", "vocab_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        positive(value, name)
    positive(config.norm_eps, "norm_eps")
    if not config.layers:
        raise ConfigError("layers", "must contain at least one layer")
    for i, spec in enumerate(config.layers):
        where = f"layers[{i}]"
        entry = LAYER_TYPES.get(getattr(spec, "type", None))  # type: ignore[arg-type]
        if entry is None or not isinstance(spec, entry.spec):
            raise ConfigError(where, f"not a layer spec: {spec!r}")
        spec.check(config.d_model, where)


# Expanded size of a document (each alias counts the whole node it repeats). A config has a few
# hundred nodes; the cap refuses "billion laughs" documents before they are constructed.
MAX_YAML_NODES = 100_000


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of a config file; a missing, unreadable or binary file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<file>", "no such file", source=str(path))
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError("<file>", f"cannot read: {err.strerror}", source=str(path)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError("<file>", f"not UTF-8 text (byte {raw[err.start]:#04x} at offset "
                          f"{err.start}); is this a binary file?", source=str(path),
                          line=line) from None


def load_yaml_file(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Read and parse a YAML file: ``read_text_file`` then ``load_yaml_with_lines``."""
    return load_yaml_with_lines(read_text_file(path), source=str(path))


class _AliasError(Exception):
    def __init__(self, message: str, mark: yaml.Mark) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts the expanded size of the document while composing it.

    The expanded size is the number of plain nodes plus, for each alias, the expanded size of the
    node it repeats; it is known exactly at composition time, before anything is constructed.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.expanded = 0
        self.sizes: dict[int, int] = {}
        # (id of the sequence, index) -> line of an alias used as its item: an alias node carries
        # the marks of its anchor, so this is the only record of where the alias was written.
        self.alias_lines: dict[tuple[int, int], int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if not self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            self.sizes[id(node)] = 1 + sum(self.sizes[id(child)] for child in children)
            self.expanded += 1
            return node
        mark = self.peek_event().start_mark
        node = super().compose_node(parent, index)
        if isinstance(index, int):
            self.alias_lines[id(parent), index] = mark.line + 1
        size = self.sizes.get(id(node))
        if size is None:
            raise _AliasError("alias refers to a node that contains it", mark)
        self.expanded += size
        if self.expanded > MAX_YAML_NODES:
            raise _AliasError(f"aliases expand the document past {MAX_YAML_NODES} nodes; "
                              "refusing it (a YAML alias bomb?)", mark)
        return node


def load_yaml_with_lines(
    text: str, *, source: str | None = None
) -> tuple[Any, dict[str, int]]:
    """Parse YAML and return (data, {field path: 1-based line}) for error messages.

    Documents whose aliases expand past ``MAX_YAML_NODES`` nodes, or that contain themselves,
    are refused before they are constructed.
    """
    try:
        loader = _BoundedLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
        alias_lines = loader.alias_lines
    except _AliasError as err:
        raise ConfigError("<document>", err.message, source=source,
                          line=err.mark.line + 1) from None
    except RecursionError:
        raise ConfigError("<document>", "nested too deeply to be a config", source=source) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError("<document>", f"invalid YAML: {problem}", source=source,
                          line=line) from None
    lines: dict[str, int] = {}
    if node is not None:
        _collect_lines(node, "", lines, set(), alias_lines)
    return data, lines


def _collect_lines(
    node: yaml.Node, path: str, lines: dict[str, int], seen: set[int],
    alias_lines: Mapping[tuple[int, int], int],
) -> None:
    # An aliased node is walked once, where it is defined; fields reached through an alias take
    # the line of the alias itself (their enclosing field), which is where the reader looks.
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = f"{path}.{key_node.value}" if path else str(key_node.value)
            lines[child] = key_node.start_mark.line + 1
            _collect_lines(value_node, child, lines, seen, alias_lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            lines[child] = alias_lines.get((id(node), i), item.start_mark.line + 1)
            _collect_lines(item, child, lines, seen, alias_lines)
