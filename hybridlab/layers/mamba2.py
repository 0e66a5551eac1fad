"""Mamba-2 mixer (SSD); parameter names and shapes follow mamba_ssm's ``Mamba2``.

``in_proj`` emits [z, x, B, C, dt] in that order; the conv runs over [x, B, C]; A is one scalar per
head; the output goes through a gated RMSNorm before ``out_proj``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.cache import MambaCache
from hybridlab.errors import ConfigError
from hybridlab.layers.conv import causal_conv1d, conv_step, last_inputs
from hybridlab.layers.init import conv_default_, dt_bias_, fan_in_, residual_
from hybridlab.layers.mamba1 import SSM_STATE_BYTES, scaled_state
from hybridlab.layers.norm import RMSNormGated
from hybridlab.layers.registry import LayerType, register
from hybridlab.layers.spec import LayerSpec
from hybridlab_kernels import ssd, ssd_state_update

A_INIT_RANGE = (1.0, 16.0)
# FLOPs per token and state element of the SSD recurrence: decay, dt-scaled x outer B, add,
# and the C contraction.
SCAN_FLOPS = 6


@dataclass(frozen=True, kw_only=True)
class Mamba2Spec(LayerSpec):
    """Mamba-2 SSD mixer (Dao & Gu, 2024); names follow mamba_ssm's ``Mamba2``."""

    type: ClassVar[str] = "mamba2"
    symbol: ClassVar[str] = "M"
    d_state: int = 64
    headdim: int = 64
    expand: int = 2
    ngroups: int = 1
    d_conv: int = 4
    chunk_size: int = 64

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def nheads(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.headdim

    def conv_dim(self, d_model: int) -> int:
        return self.d_inner(d_model) + 2 * self.ngroups * self.d_state

    def check_sizes(self, d_model: int, where: str) -> None:
        d_inner = self.d_inner(d_model)
        if d_inner % self.headdim:
            raise ConfigError(
                f"{where}.headdim",
                f"expand * d_model = {d_inner} must be divisible by headdim = {self.headdim}",
            )
        nheads = d_inner // self.headdim
        if nheads % self.ngroups:
            raise ConfigError(
                f"{where}.ngroups",
                f"number of heads {nheads} must be divisible by ngroups = {self.ngroups}",
            )

    def params(self, d_model: int) -> int:
        d, di, h, cd = d_model, self.d_inner(d_model), self.nheads(d_model), self.conv_dim(d_model)
        in_proj, conv = d * (di + cd + h), cd * self.d_conv + cd
        return in_proj + conv + 3 * h + di + di * d

    def flops(self, d_model: int, context: int, *, decode: bool = False) -> float:
        d, di, h, cd = d_model, self.d_inner(d_model), self.nheads(d_model), self.conv_dim(d_model)
        matmuls = d * (di + cd + h) + di * d
        return 2 * matmuls + 2 * cd * self.d_conv + SCAN_FLOPS * di * self.d_state

    def state_bytes(self, d_model: int, context: int, *, cache_bytes: int) -> int:
        ssm = self.nheads(d_model) * self.headdim * self.d_state
        return self.conv_dim(d_model) * self.d_conv * cache_bytes + ssm * SSM_STATE_BYTES

    def semantics(self, d_model: int) -> dict[str, Any]:
        # chunk_size only tiles the scan, so it is not part of what the layer computes.
        return {"d_state": self.d_state, "headdim": self.headdim, "expand": self.expand,
                "ngroups": self.ngroups, "d_conv": self.d_conv}

    def width(self, d_model: int) -> int:
        return self.d_inner(d_model)

    def width_step(self, d_model: int) -> int:
        # expand * d_new must hold whole heads in whole groups.
        per_group = self.headdim * self.ngroups
        return per_group // math.gcd(per_group, self.expand)

    def stretched(self, *, d_from: int, d_to: int, scale_d_state: bool) -> Mamba2Spec:
        if not scale_d_state:
            return self
        return dataclasses.replace(self, d_state=scaled_state(self.d_state, d_to / d_from))

class Mamba2(nn.Module):
    no_weight_decay = ("A_log", "D", "dt_bias")

    def __init__(self, d_model: int, spec: Mamba2Spec, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.d_inner = spec.d_inner(d_model)
        self.d_state = spec.d_state
        self.d_conv = spec.d_conv
        self.headdim = spec.headdim
        self.ngroups = spec.ngroups
        self.nheads = spec.nheads(d_model)
        self.chunk_size = spec.chunk_size
        self.conv_dim = spec.conv_dim(d_model)
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim,
            padding=self.d_conv - 1, bias=True,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = RMSNormGated(self.d_inner, group_size=self.d_inner // self.ngroups, eps=eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, *, n_layers: int) -> None:
        fan_in_(self.in_proj.weight, generator)
        conv_default_(self.conv1d, generator)
        dt_bias_(self.dt_bias, generator)
        low, high = A_INIT_RANGE
        a = torch.empty(self.nheads, dtype=torch.float32).uniform_(low, high, generator=generator)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        self.norm.reset_parameters()
        residual_(self.out_proj.weight, generator, n_layers=n_layers)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, *, device: torch.device, dtype: torch.dtype
    ) -> MambaCache:
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device,
                                   dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state,
                                  device=device, dtype=torch.float32),
        )

    def _split_xbc(self, xbc: torch.Tensor):
        group_width = self.ngroups * self.d_state
        x, b, c = xbc.split([self.d_inner, group_width, group_width], dim=-1)
        heads = x.unflatten(-1, (self.nheads, self.headdim))
        return heads, b.unflatten(-1, (self.ngroups, self.d_state)), c.unflatten(
            -1, (self.ngroups, self.d_state)
        )

    def forward(self, hidden: torch.Tensor, *, cache: MambaCache | None = None) -> torch.Tensor:
        """hidden: (B, L, d_model) -> (B, L, d_model); fills ``cache`` when given."""
        z, xbc, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], -1)
        xbc = xbc.transpose(1, 2)  # (B, conv_dim, L)
        if cache is not None:
            cache.conv_state.copy_(last_inputs(xbc, self.d_conv))
        xbc = F.silu(causal_conv1d(self.conv1d, xbc)).transpose(1, 2)  # (B, L, conv_dim)
        x, b, c = self._split_xbc(xbc)  # (B, L, H, P), (B, L, G, N), (B, L, G, N)
        result = ssd(
            x, dt, -torch.exp(self.A_log.float()), b, c, chunk_size=self.chunk_size,
            D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True,
            return_final_state=cache is not None,
        )
        if cache is not None:
            y, final_state = result
            cache.ssm_state.copy_(final_state)
        else:
            y = result
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y)

    def step(self, hidden: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """hidden: (B, d_model) -> (B, d_model); advances ``cache`` by one token."""
        z, xbc, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], -1)
        xbc = F.silu(conv_step(self.conv1d, cache.conv_state, xbc))
        x, b, c = self._split_xbc(xbc)  # (B, H, P), (B, G, N), (B, G, N)
        y = ssd_state_update(
            cache.ssm_state, x, dt, -torch.exp(self.A_log.float()), b, c, self.D.float(),
            dt_bias=self.dt_bias.float(), dt_softplus=True,
        )
        y = self.norm(y.flatten(-2).to(hidden.dtype), z)
        return self.out_proj(y)



register(LayerType(
    spec=Mamba2Spec, build=lambda spec, d_model, eps: Mamba2(d_model, spec, eps=eps),
    label="Mamba-2", colour="#2563eb", mixes_sequence=True,
))
