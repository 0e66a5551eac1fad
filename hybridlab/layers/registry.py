"""The layer-type registry: every type of layer a hybrid can hold, declared once in its module.

A layer type's module defines its spec (fields, defaults, validation, cost: ``LayerSpec``), its
``nn.Module`` and a ``LayerType`` entry that it passes to ``register``. Config parsing, the cost
model, search spaces, the trainer, the exporters and the dashboard look types up here, so adding
a type is its own module plus one import line in ``hybridlab/layers/__init__.py`` (README:
"Adding a layer type").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from hybridlab.layers.spec import LayerSpec

# The formats hybridlab exports to besides its own (which holds every type).
EXPORT_FORMATS = ("hf", "mamba_ssm", "megatron")
# A module whose training forward adds a term to the loss (a router's balance loss) leaves it, a
# scalar tensor, in this attribute (None in eval); the trainer adds every such term.
AUX_LOSS = "aux_loss"
# A routed module leaves in this attribute the fraction of its token assignments each expert got
# in its last forward (detached, (n_experts,)); the trainer logs how balanced it is.
ROUTER_LOAD = "load"
# A module lists in this class attribute the names of its own parameters that take no weight
# decay (an SSM's dynamics: A_log, D, dt_bias); no vector (norm weight, bias) takes any either.
NO_WEIGHT_DECAY = "no_weight_decay"


@dataclass(frozen=True)
class LayerType:
    spec: type[LayerSpec]
    # (spec, d_model, norm eps) -> the layer's module: forward(x, cache=), step(x, cache),
    # allocate_cache(batch, max_seqlen, device=, dtype=), reset_parameters(generator, n_layers=).
    build: Callable[[LayerSpec, int, float], nn.Module]
    label: str
    colour: str
    # A sequence mixer (Mamba, attention) rather than a per-token layer (MLP); search rules
    # such as attention_fraction and "an MLP after every mixer" count mixers.
    mixes_sequence: bool
    # Export format -> why that format cannot hold this type; a format not named writes it.
    refused: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.type

    def refusal(self, fmt: str) -> str | None:
        return self.refused.get(fmt)


LAYER_TYPES: dict[str, LayerType] = {}
SYMBOLS: dict[str, LayerType] = {}


def register(layer_type: LayerType) -> LayerType:
    spec = layer_type.spec
    if not dataclasses.is_dataclass(spec) or not issubclass(spec, LayerSpec):
        raise TypeError(f"{spec!r} is not a LayerSpec dataclass")
    if spec.type in LAYER_TYPES or spec.symbol in SYMBOLS:
        raise ValueError(f"layer type {spec.type!r} or symbol {spec.symbol!r} already registered")
    unknown = set(layer_type.refused) - set(EXPORT_FORMATS)
    if unknown:
        raise ValueError(f"{spec.type}: refusals for unknown export formats {sorted(unknown)}")
    LAYER_TYPES[spec.type] = layer_type
    SYMBOLS[spec.symbol] = layer_type
    return layer_type


def layer_type(spec: LayerSpec) -> LayerType:
    """The registered type of ``spec``."""
    entry = LAYER_TYPES.get(getattr(spec, "type", None))  # type: ignore[arg-type]
    if entry is None or not isinstance(spec, entry.spec):
        raise TypeError(f"not a registered layer spec: {spec!r}")
    return entry


def build_layer(spec: LayerSpec, d_model: int, *, eps: float = 1e-5) -> nn.Module:
    """The module for one layer spec."""
    return layer_type(spec).build(spec, d_model, eps)


def mixer_types() -> tuple[str, ...]:
    return tuple(name for name, t in LAYER_TYPES.items() if t.mixes_sequence)


def no_weight_decay_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of ``model`` that take no weight decay."""
    ids = {id(p) for p in model.parameters() if p.dim() < 2}
    for module in model.modules():
        for name in getattr(module, NO_WEIGHT_DECAY, ()):
            ids.add(id(module.get_parameter(name)))
    return ids


def aux_losses(model: nn.Module) -> list[torch.Tensor]:
    """The auxiliary loss terms the last training forward of ``model`` left on its modules."""
    return [loss for module in model.modules()
            if (loss := getattr(module, AUX_LOSS, None)) is not None]


def router_loads(model: nn.Module) -> list[torch.Tensor]:
    """Per routed layer, the expert load of its last forward."""
    return [load for module in model.modules()
            if isinstance(load := getattr(module, ROUTER_LOAD, None), torch.Tensor)]
