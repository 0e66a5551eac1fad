"""SwiGLU MLP; parameter names follow mamba_ssm's ``GatedMLP`` (fc1 -> value, gate; fc2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.layers.init import fan_in_, residual_
from hybridlab.layers.registry import LayerType, register
from hybridlab.layers.spec import LayerSpec


@dataclass(frozen=True, kw_only=True)
class MLPSpec(LayerSpec):
    """SwiGLU MLP; hidden width is ``multiplier * d_model`` rounded up to ``multiple_of``."""

    type: ClassVar[str] = "mlp"
    symbol: ClassVar[str] = "-"
    multiplier: float = 8 / 3
    multiple_of: int = 16

    def d_hidden(self, d_model: int) -> int:
        width = math.ceil(self.multiplier * d_model)
        return -(-width // self.multiple_of) * self.multiple_of

    def params(self, d_model: int) -> int:
        return 3 * d_model * self.d_hidden(d_model)

    def flops(self, d_model: int, context: int, *, decode: bool = False) -> float:
        return 2 * self.params(d_model)

    def state_bytes(self, d_model: int, context: int, *, cache_bytes: int) -> int:
        return 0

    def semantics(self, d_model: int) -> dict[str, Any]:
        return {"width": self.d_hidden(d_model)}

    def width(self, d_model: int) -> int:
        return self.d_hidden(d_model)


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, spec: MLPSpec) -> None:
        super().__init__()
        self.d_hidden = spec.d_hidden(d_model)
        self.fc1 = nn.Linear(d_model, 2 * self.d_hidden, bias=False)
        self.fc2 = nn.Linear(self.d_hidden, d_model, bias=False)

    def reset_parameters(self, generator: torch.Generator, *, n_layers: int) -> None:
        fan_in_(self.fc1.weight, generator)
        residual_(self.fc2.weight, generator, n_layers=n_layers)

    def allocate_cache(self, batch_size: int, max_seqlen: int, **_: object) -> None:
        return None

    def forward(self, x: torch.Tensor, *, cache: None = None) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)  # (B, L, d_hidden) each
        return self.fc2(value * F.silu(gate))

    def step(self, x: torch.Tensor, cache: None = None) -> torch.Tensor:
        return self.forward(x)


register(LayerType(
    spec=MLPSpec, build=lambda spec, d_model, eps: GatedMLP(d_model, spec), label="MLP",
    colour="#a3a3a3", mixes_sequence=False,
))
