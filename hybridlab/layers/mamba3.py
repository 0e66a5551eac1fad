"""Mamba-3 mixer (Lahoti et al., arXiv 2603.15569); names and shapes follow mamba_ssm's ``Mamba3``.

``in_proj`` emits [z, x, B, C, dt, A, trap, angles] in that order. Against Mamba-2: no short
convolution; A is data-dependent (one per head and token, ``-softplus`` clamped to at most
``-A_floor``); the exponential-trapezoidal rule mixes the current and the previous input by
``sigmoid(trap)``; B and C are RMS-normed, biased per head (``B_bias``, ``C_bias``, init 1) and
turned by data-dependent rotary angles (a complex-valued state); the output is gated by
``silu(z)`` without a norm (mamba_ssm's ``is_outproj_norm=False``). ``mimo_rank > 1`` is the
multi-input multi-output variant: rank-R B and C, and per-rank projections of x, z and the output
(``mimo_x``, ``mimo_z``, ``mimo_o``). The recurrence is in ``hybridlab_kernels.mamba3``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.errors import ConfigError
from hybridlab.layers.init import dt_bias_, fan_in_, residual_
from hybridlab.layers.mamba1 import SSM_STATE_BYTES, scaled_state
from hybridlab.layers.norm import RMSNorm
from hybridlab.layers.registry import LayerType, register
from hybridlab.layers.spec import LayerSpec
from hybridlab_kernels import Mamba3State, mamba3_scan, mamba3_state_update

A_FLOOR = 1e-4  # mamba_ssm's default: every head forgets at least this fast
ROPE_FRACTIONS = (0.5, 1.0)  # mamba_ssm's choices: half or all of B's and C's channels turn
# FLOPs per token, state element and rank of the recurrence: the two rank-R outer products
# (current and previous input) with their weights, and the read-out; plus the decay (once).
SCAN_FLOPS_PER_RANK = 6


@dataclass(frozen=True, kw_only=True)
class Mamba3Spec(LayerSpec):
    """Mamba-3 mixer; ``mimo_rank`` 1 is SISO, more is MIMO."""

    type: ClassVar[str] = "mamba3"
    symbol: ClassVar[str] = "3"
    d_state: int = 64
    headdim: int = 64
    expand: int = 2
    ngroups: int = 1
    mimo_rank: int = 1
    rope_fraction: float = 0.5
    chunk_size: int = 64

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def nheads(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.headdim

    def n_angles(self) -> int:
        """Rotary angles per token, shared by the heads (mamba_ssm's ``num_rope_angles``)."""
        turned = int(self.d_state * self.rope_fraction)
        return (turned - turned % 2) // 2

    def in_proj_width(self, d_model: int) -> int:
        bc = self.d_state * self.ngroups * self.mimo_rank
        return 2 * self.d_inner(d_model) + 2 * bc + 3 * self.nheads(d_model) + self.n_angles()

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
        if self.rope_fraction not in ROPE_FRACTIONS:
            raise ConfigError(f"{where}.rope_fraction",
                              f"must be one of {list(ROPE_FRACTIONS)}, got {self.rope_fraction}")
        if self.d_state % 2 or self.n_angles() < 1:
            raise ConfigError(f"{where}.d_state",
                              f"must be even and turn at least one pair of channels "
                              f"(d_state * rope_fraction >= 2), got {self.d_state}")

    def params(self, d_model: int) -> int:
        d, di, h = d_model, self.d_inner(d_model), self.nheads(d_model)
        n, r = self.d_state, self.mimo_rank
        mimo = 3 * h * r * self.headdim if r > 1 else 0
        return d * self.in_proj_width(d) + 2 * h + 2 * h * r * n + 2 * n + mimo + di * d

    def flops(self, d_model: int, context: int, *, decode: bool = False) -> float:
        d, di = d_model, self.d_inner(d_model)
        matmuls = d * self.in_proj_width(d) + di * d
        scan = di * self.d_state * (1 + SCAN_FLOPS_PER_RANK * self.mimo_rank)
        return 2 * matmuls + scan

    def state_bytes(self, d_model: int, context: int, *, cache_bytes: int) -> int:
        h, p, n = self.nheads(d_model), self.headdim, self.d_state
        fp32 = (h * p * n + h * self.n_angles()) * SSM_STATE_BYTES  # state, angles
        return fp32 + (self.mimo_rank * h * n + h * p) * cache_bytes  # last token's B and x

    def semantics(self, d_model: int) -> dict[str, Any]:
        # chunk_size only tiles the scan, so it is not part of what the layer computes.
        return {"d_state": self.d_state, "headdim": self.headdim, "expand": self.expand,
                "ngroups": self.ngroups, "mimo_rank": self.mimo_rank,
                "rope_fraction": self.rope_fraction}

    def width(self, d_model: int) -> int:
        return self.d_inner(d_model)

    def width_step(self, d_model: int) -> int:
        per_group = self.headdim * self.ngroups
        return per_group // math.gcd(per_group, self.expand)

    def stretched(self, *, d_from: int, d_to: int, scale_d_state: bool) -> Mamba3Spec:
        if not scale_d_state:
            return self
        d_state = scaled_state(self.d_state, d_to / d_from)
        return dataclasses.replace(self, d_state=max(4, d_state + d_state % 2))


@dataclass
class Mamba3Cache:
    """The four tensors of ``Mamba3State``: angles and SSM state (float32), last B and x."""

    state: Mamba3State

    def tensors(self) -> list[torch.Tensor]:
        return list(self.state)


class Mamba3(nn.Module):
    no_weight_decay = ("D", "dt_bias")

    def __init__(self, d_model: int, spec: Mamba3Spec) -> None:
        super().__init__()
        self.d_inner = spec.d_inner(d_model)
        self.d_state = spec.d_state
        self.headdim = spec.headdim
        self.ngroups = spec.ngroups
        self.nheads = spec.nheads(d_model)
        self.rank = spec.mimo_rank
        self.n_angles = spec.n_angles()
        self.chunk_size = spec.chunk_size
        self.in_proj = nn.Linear(d_model, spec.in_proj_width(d_model), bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.B_bias = nn.Parameter(torch.empty(self.nheads, self.rank, self.d_state))
        self.C_bias = nn.Parameter(torch.empty(self.nheads, self.rank, self.d_state))
        self.B_norm = RMSNorm(self.d_state)
        self.C_norm = RMSNorm(self.d_state)
        if self.rank > 1:
            shape = (self.nheads, self.rank, self.headdim)
            self.mimo_x = nn.Parameter(torch.empty(shape))
            self.mimo_z = nn.Parameter(torch.empty(shape))
            self.mimo_o = nn.Parameter(torch.empty(shape))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, *, n_layers: int) -> None:
        # mamba_ssm's Mamba3 init: biases 1, MIMO projections 1/R (x, out) and 1 (z), D 1
        fan_in_(self.in_proj.weight, generator)
        dt_bias_(self.dt_bias, generator)
        self.B_bias.fill_(1.0)
        self.C_bias.fill_(1.0)
        self.B_norm.reset_parameters()
        self.C_norm.reset_parameters()
        if self.rank > 1:
            self.mimo_x.fill_(1.0 / self.rank)
            self.mimo_z.fill_(1.0)
            self.mimo_o.fill_(1.0 / self.rank)
        self.D.fill_(1.0)
        residual_(self.out_proj.weight, generator, n_layers=n_layers)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, *, device: torch.device, dtype: torch.dtype
    ) -> Mamba3Cache:
        h, p, n = self.nheads, self.headdim, self.d_state
        return Mamba3Cache(Mamba3State(
            torch.zeros(batch_size, h, self.n_angles, device=device, dtype=torch.float32),
            torch.zeros(batch_size, h, p, n, device=device, dtype=torch.float32),
            torch.zeros(batch_size, self.rank, h, n, device=device, dtype=dtype),
            torch.zeros(batch_size, h, p, device=device, dtype=dtype),
        ))

    def _inputs(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """in_proj's outputs as `mamba3_scan`'s arguments; hidden: (..., d_model)."""
        bc = self.d_state * self.ngroups * self.rank
        h = self.nheads
        z, x, b, c, dt, a, trap, angles = self.in_proj(hidden).split(
            [self.d_inner, self.d_inner, bc, bc, h, h, h, self.n_angles], dim=-1
        )
        group = (self.rank, self.ngroups, self.d_state)
        b, c = self.B_norm(b.unflatten(-1, group)), self.C_norm(c.unflatten(-1, group))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = (-F.softplus(a.float())).clamp(max=-A_FLOOR)
        mimo = {}
        if self.rank > 1:
            mimo = {"mimo_x": self.mimo_x, "mimo_z": self.mimo_z, "mimo_o": self.mimo_o}
        heads = (h, self.headdim)
        tensors = [c, b, x.unflatten(-1, heads), A * dt, dt, trap, self.C_bias, self.B_bias,
                   angles]
        return tensors, {"D": self.D, "z": z.unflatten(-1, heads), **mimo}

    def forward(self, hidden: torch.Tensor, *, cache: Mamba3Cache | None = None) -> torch.Tensor:
        """hidden: (B, L, d_model) -> (B, L, d_model); fills ``cache`` when given."""
        tensors, kwargs = self._inputs(hidden)
        result = mamba3_scan(*tensors, **kwargs, chunk_size=self.chunk_size,
                             return_final_state=cache is not None)
        if cache is not None:
            y, final = result
            for slot, value in zip(cache.state, final, strict=True):
                slot.copy_(value)
        else:
            y = result
        return self.out_proj(y.flatten(-2).to(hidden.dtype))

    def step(self, hidden: torch.Tensor, cache: Mamba3Cache) -> torch.Tensor:
        """hidden: (B, d_model) -> (B, d_model); advances ``cache`` by one token."""
        tensors, kwargs = self._inputs(hidden)
        y = mamba3_state_update(cache.state, *tensors, **kwargs)
        return self.out_proj(y.flatten(-2).to(hidden.dtype))


register(LayerType(
    spec=Mamba3Spec, build=lambda spec, d_model, eps: Mamba3(d_model, spec), label="Mamba-3",
    colour="#be185d", mixes_sequence=True,
    refused={
        "hf": "no transformers model class holds Mamba-3 layers (NemotronH, Bamba, "
              "GraniteMoeHybrid and FalconH1 run Mamba-2)",
        "megatron": "megatron-core's hybrid layer pattern has no Mamba-3 layer ('M' is Mamba-2)",
        "mamba_ssm": "mamba_ssm's MambaLMHeadModel (2.3.2) builds ssm_cfg.layer 'Mamba1' or "
                     "'Mamba2' only (create_block raises on 'Mamba3'); its Mamba3 module itself "
                     "loads a mamba3 layer's weights under the same names",
    },
))
