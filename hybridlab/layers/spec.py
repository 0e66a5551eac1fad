"""The base of every layer type's spec: reading from a dict, field kinds, validation and cost.

A spec is a frozen keyword-only dataclass declared in its layer type's own module. Its fields are
the genome's settings for one layer and, unchanged, the search-space parameters of that type; the
kind of each field (integer, number, flag or a word from a fixed list) follows from its default,
so parsing, validation and sampling read the fields and never branch on the type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from hybridlab.errors import ConfigError


class LayerSpec:
    """One layer's settings. Subclasses are ``@dataclass(frozen=True, kw_only=True)``."""

    type: ClassVar[str]
    # Megatron-style pattern letter; unique across the registry.
    symbol: ClassVar[str]
    # Words a string field may take ({field: (word, ...)}); a string default without an entry
    # here is "auto" (an integer that the spec derives).
    words: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # Integer fields for which 0 is meaningful (say, no shared expert); all others are positive.
    may_be_zero: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def field_kinds(cls) -> dict[str, type]:
        """{field: int | float | bool | str}: how the field is read and searched."""
        kinds: dict[str, type] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            default = f.default
            if isinstance(default, bool):
                kinds[f.name] = bool
            elif isinstance(default, float):
                kinds[f.name] = float
            elif isinstance(default, str):
                kinds[f.name] = str
            else:
                kinds[f.name] = int
        return kinds

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> LayerSpec:
        """Parse the fields of ``data`` (its ``type`` already checked); ``where`` prefixes field
        names in errors (``layers[3].``)."""
        kinds = cls.field_kinds()
        check_keys(data, {"type", *kinds}, where)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            kind, name = kinds[f.name], f.name
            if kind is bool:
                values[name] = read_bool(data, name, where, default=f.default)
            elif kind is float:
                values[name] = read_float(data, name, where, default=f.default)
            elif kind is str and name in cls.words:
                values[name] = data.get(name, f.default)
            else:
                values[name] = read_int(data, name, where, default=f.default)
                if values[name] is None and isinstance(f.default, str):
                    raise ConfigError(f"{where}{name}",
                                      f"must be a positive integer or {f.default!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    def check(self, d_model: int, where: str) -> None:
        """Raise ConfigError naming the first bad field (``{where}.{field}``)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            name = f"{where}.{f.name}"
            if f.name in self.words:
                if value not in self.words[f.name]:
                    raise ConfigError(name, f"must be one of {list(self.words[f.name])}, "
                                      f"got {value!r}")
            elif isinstance(value, str):
                # A string outside ``words`` is the derived-integer marker ("auto").
                if value != f.default:
                    raise ConfigError(name, f"must be a positive integer or {f.default!r}, "
                                      f"got {value!r}")
            elif not (isinstance(value, bool) or value is None
                      or (f.name in self.may_be_zero and value == 0)):
                positive(value, name)
        self.check_sizes(d_model, where)

    def check_sizes(self, d_model: int, where: str) -> None:
        """Checks that relate fields to each other and to d_model; none by default."""

    # The cost model (see hybridlab.cost for the conventions). ``params`` is the layer's module,
    # without the block's pre-norm.
    def params(self, d_model: int) -> int:
        raise NotImplementedError

    def active_params(self, d_model: int) -> int:
        """Parameters one token passes through (fewer than ``params`` for routed layers)."""
        return self.params(d_model)

    def flops(self, d_model: int, context: int, *, decode: bool = False) -> float:
        raise NotImplementedError

    def state_bytes(self, d_model: int, context: int, *, cache_bytes: int) -> int:
        raise NotImplementedError

    def semantics(self, d_model: int) -> dict[str, Any]:
        """What the layer computes, sizes resolved: equal semantics compute the same function
        (exports compare these, not field values that may be written differently)."""
        return self.to_dict()

    def width(self, d_model: int) -> int:
        """The layer's inner width, for drawing."""
        return d_model

    # Scaling (hybridlab.scale): a stretch widens d_model and resizes what is tied to it.
    def width_step(self, d_model: int) -> int:
        """Every multiple of this at or above ``d_model`` is a width at which ``stretched``
        gives a valid layer; 1 (the default) for a layer whose sizes follow d_model freely."""
        return 1

    def stretched(self, *, d_from: int, d_to: int, scale_d_state: bool) -> LayerSpec:
        """This layer at width ``d_to`` instead of ``d_from`` (on ``width_step``'s lattice);
        unchanged by default (sizes given relative to d_model, such as multipliers)."""
        return self


def check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}{key}", f"unknown field; expected one of {sorted(allowed)}")


def read_int(data: Mapping[str, Any], key: str, where: str, *, default: Any) -> Any:
    value = data.get(key, default)
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}{key}", f"must be an integer, got {value!r}")
    return value


def read_float(data: Mapping[str, Any], key: str, where: str, *, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}{key}", f"must be a number, got {value!r}")
    finite(value, f"{where}{key}")
    return float(value)


def read_bool(data: Mapping[str, Any], key: str, where: str, *, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{key}", f"must be true or false, got {value!r}")
    return value


def finite(value: int | float, name: str) -> None:
    # NaN compares false with every bound, so range checks alone let it through.
    if not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")


def positive(value: Any, name: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"must be a positive number, got {value!r}")
    finite(value, name)
    if value <= 0:
        raise ConfigError(name, f"must be positive, got {value!r}")
