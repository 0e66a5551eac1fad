"""SwiGLU MLP; parameter names follow mamba_ssm's ``GatedMLP`` (fc1 -> value, gate; fc2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.config import MLPSpec
from hybridlab.layers.init import EMBED_STD, normal_, residual_std


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, spec: MLPSpec) -> None:
        super().__init__()
        self.d_hidden = spec.d_hidden(d_model)
        self.fc1 = nn.Linear(d_model, 2 * self.d_hidden, bias=False)
        self.fc2 = nn.Linear(self.d_hidden, d_model, bias=False)

    def reset_parameters(self, generator: torch.Generator, *, n_layers: int) -> None:
        normal_(self.fc1.weight, EMBED_STD, generator)
        normal_(self.fc2.weight, residual_std(n_layers), generator)

    def allocate_cache(self, batch_size: int, max_seqlen: int, **_: object) -> None:
        return None

    def forward(self, x: torch.Tensor, *, cache: None = None) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)  # (B, L, d_hidden) each
        return self.fc2(value * F.silu(gate))

    def step(self, x: torch.Tensor, cache: None = None) -> torch.Tensor:
        return self.forward(x)
