"""Layer types of a hybrid stack. Importing this package registers every built-in type; each
lives in its own module (spec, cost, module, registry entry)."""

from __future__ import annotations

from hybridlab.layers.attention import Attention, AttentionSpec, attention_backend
from hybridlab.layers.mamba1 import Mamba1, Mamba1Spec
from hybridlab.layers.mamba2 import Mamba2, Mamba2Spec
from hybridlab.layers.mamba3 import Mamba3, Mamba3Spec
from hybridlab.layers.mlp import GatedMLP, MLPSpec
from hybridlab.layers.moe import MoE, MoESpec
from hybridlab.layers.norm import RMSNorm, RMSNormGated
from hybridlab.layers.parallel import Parallel, ParallelSpec
from hybridlab.layers.registry import (
    LAYER_TYPES,
    SYMBOLS,
    LayerType,
    build_layer,
    layer_type,
    mixer_types,
)
from hybridlab.layers.spec import LayerSpec

__all__ = [
    "LAYER_TYPES",
    "SYMBOLS",
    "Attention",
    "AttentionSpec",
    "GatedMLP",
    "LayerSpec",
    "LayerType",
    "MLPSpec",
    "Mamba1",
    "Mamba1Spec",
    "Mamba2",
    "Mamba2Spec",
    "Mamba3",
    "Mamba3Spec",
    "MoE",
    "MoESpec",
    "Parallel",
    "ParallelSpec",
    "RMSNorm",
    "RMSNormGated",
    "attention_backend",
    "build_layer",
    "layer_type",
    "mixer_types",
]
