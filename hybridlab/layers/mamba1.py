"""Mamba-1 mixer (selective SSM); parameter names and shapes follow mamba_ssm's ``Mamba``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.cache import MambaCache
from hybridlab.layers.conv import causal_conv1d, conv_step, last_inputs
from hybridlab.layers.init import conv_default_, dt_bias_, fan_in_, residual_
from hybridlab.layers.registry import LayerType, register
from hybridlab.layers.spec import LayerSpec
from hybridlab_kernels import selective_scan, selective_state_update

SSM_STATE_BYTES = 4  # the SSM state is always float32
# FLOPs per token and state element of the selective scan (the Mamba paper's count).
SCAN_FLOPS = 9


@dataclass(frozen=True, kw_only=True)
class Mamba1Spec(LayerSpec):
    """Mamba-1 selective SSM mixer (Gu & Dao, 2023); names follow mamba_ssm's ``Mamba``."""

    type: ClassVar[str] = "mamba1"
    symbol: ClassVar[str] = "m"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    # "auto" is the paper's ceil(d_model / 16).
    dt_rank: int | Literal["auto"] = "auto"

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def resolved_dt_rank(self, d_model: int) -> int:
        return math.ceil(d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def params(self, d_model: int) -> int:
        d, di, n = d_model, self.d_inner(d_model), self.d_state
        r, k = self.resolved_dt_rank(d), self.d_conv
        in_proj, conv = d * 2 * di, di * k + di
        x_proj, dt_proj = di * (r + 2 * n), r * di + di
        return in_proj + conv + x_proj + dt_proj + di * n + di + di * d

    def flops(self, d_model: int, context: int, *, decode: bool = False) -> float:
        d, di, n, r = d_model, self.d_inner(d_model), self.d_state, self.resolved_dt_rank(d_model)
        matmuls = d * 2 * di + di * (r + 2 * n) + r * di + di * d
        return 2 * matmuls + 2 * di * self.d_conv + SCAN_FLOPS * di * n

    def state_bytes(self, d_model: int, context: int, *, cache_bytes: int) -> int:
        di = self.d_inner(d_model)
        return di * self.d_conv * cache_bytes + di * self.d_state * SSM_STATE_BYTES

    def semantics(self, d_model: int) -> dict[str, Any]:
        return {"d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
                "dt_rank": self.resolved_dt_rank(d_model)}

    def width(self, d_model: int) -> int:
        return self.d_inner(d_model)

    def stretched(self, *, d_from: int, d_to: int, scale_d_state: bool) -> Mamba1Spec:
        changes: dict[str, Any] = {}
        if scale_d_state:
            changes["d_state"] = scaled_state(self.d_state, d_to / d_from)
        if self.dt_rank != "auto":
            changes["dt_rank"] = math.ceil(int(self.dt_rank) * d_to / d_from)
        return dataclasses.replace(self, **changes)


def scaled_state(d_state: int, ratio: float) -> int:
    """A stretch's state size: ``d_state * ratio`` rounded half up, at least 1."""
    return max(1, math.floor(d_state * ratio + 0.5))


class Mamba1(nn.Module):
    no_weight_decay = ("A_log", "D", "dt_proj.bias")

    def __init__(self, d_model: int, spec: Mamba1Spec) -> None:
        super().__init__()
        self.d_inner = spec.d_inner(d_model)
        self.d_state = spec.d_state
        self.d_conv = spec.d_conv
        self.dt_rank = spec.resolved_dt_rank(d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner,
            padding=self.d_conv - 1, bias=True,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # Stored in fp32 and read with .float(): the recurrence accumulates over the whole
        # sequence, so bf16 A or D would drift (autocast leaves parameters untouched).
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, *, n_layers: int) -> None:
        fan_in_(self.in_proj.weight, generator)
        conv_default_(self.conv1d, generator)
        fan_in_(self.x_proj.weight, generator)
        bound = 1.0 / math.sqrt(self.dt_rank)
        self.dt_proj.weight.uniform_(-bound, bound, generator=generator)
        dt_bias_(self.dt_proj.bias, generator)
        # S4D-real init: A[:, n] = -(n + 1) for every channel.
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        residual_(self.out_proj.weight, generator, n_layers=n_layers)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, *, device: torch.device, dtype: torch.dtype
    ) -> MambaCache:
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                   dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                  dtype=torch.float32),
        )

    def _ssm_inputs(self, x: torch.Tensor):
        """x: (..., d_inner) after conv -> dt (..., d_inner), B and C (..., d_state)."""
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj's bias is added inside the scan (in fp32, with the softplus).
        return F.linear(dt, self.dt_proj.weight), b, c

    def forward(self, hidden: torch.Tensor, *, cache: MambaCache | None = None) -> torch.Tensor:
        """hidden: (B, L, d_model) -> (B, L, d_model); fills ``cache`` when given."""
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        if cache is not None:
            cache.conv_state.copy_(last_inputs(x, self.d_conv))
        x = F.silu(causal_conv1d(self.conv1d, x))
        dt, b, c = self._ssm_inputs(x.transpose(1, 2))  # (B, L, .)
        result = selective_scan(
            x, dt.transpose(1, 2), -torch.exp(self.A_log.float()),
            b.transpose(1, 2), c.transpose(1, 2), self.D.float(), z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_final_state=cache is not None,
        )
        if cache is not None:
            y, final_state = result
            cache.ssm_state.copy_(final_state)
        else:
            y = result
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """hidden: (B, d_model) -> (B, d_model); advances ``cache`` by one token."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, d_inner) each
        x = F.silu(conv_step(self.conv1d, cache.conv_state, x))
        dt, b, c = self._ssm_inputs(x)
        y = selective_state_update(
            cache.ssm_state, x, dt, -torch.exp(self.A_log.float()), b, c, self.D.float(), z,
            dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
        )
        return self.out_proj(y.to(hidden.dtype))


register(LayerType(
    spec=Mamba1Spec, build=lambda spec, d_model, eps: Mamba1(d_model, spec), label="Mamba-1",
    colour="#06b6d4", mixes_sequence=True,
))
