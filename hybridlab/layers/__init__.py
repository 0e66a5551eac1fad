"""Layer types of a hybrid stack, built from their specs through one registry."""

from __future__ import annotations

from torch import nn

from hybridlab.config import AttentionSpec, LayerSpec, Mamba1Spec, Mamba2Spec, MLPSpec
from hybridlab.layers.attention import Attention, attention_backend
from hybridlab.layers.mamba1 import Mamba1
from hybridlab.layers.mamba2 import Mamba2
from hybridlab.layers.mlp import GatedMLP
from hybridlab.layers.norm import RMSNorm, RMSNormGated

__all__ = [
    "Attention",
    "GatedMLP",
    "Mamba1",
    "Mamba2",
    "RMSNorm",
    "RMSNormGated",
    "attention_backend",
    "build_mixer",
]


def build_mixer(spec: LayerSpec, d_model: int, *, eps: float = 1e-5) -> nn.Module:
    """The mixer module for one layer spec."""
    if isinstance(spec, Mamba1Spec):
        return Mamba1(d_model, spec)
    if isinstance(spec, Mamba2Spec):
        return Mamba2(d_model, spec, eps=eps)
    if isinstance(spec, AttentionSpec):
        return Attention(d_model, spec)
    if isinstance(spec, MLPSpec):
        return GatedMLP(d_model, spec)
    raise TypeError(f"no layer for spec {spec!r}")
