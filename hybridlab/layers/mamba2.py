"""Mamba-2 mixer (SSD); parameter names and shapes follow mamba_ssm's ``Mamba2``.

``in_proj`` emits [z, x, B, C, dt] in that order; the conv runs over [x, B, C]; A is one scalar per
head; the output goes through a gated RMSNorm before ``out_proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.cache import MambaCache
from hybridlab.config import Mamba2Spec
from hybridlab.layers.conv import causal_conv1d, conv_step, last_inputs
from hybridlab.layers.init import EMBED_STD, conv_default_, dt_bias_, normal_, residual_std
from hybridlab.layers.norm import RMSNormGated
from hybridlab_kernels import ssd, ssd_state_update

A_INIT_RANGE = (1.0, 16.0)

class Mamba2(nn.Module):
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
        normal_(self.in_proj.weight, EMBED_STD, generator)
        conv_default_(self.conv1d, generator)
        dt_bias_(self.dt_bias, generator)
        low, high = A_INIT_RANGE
        a = torch.empty(self.nheads, dtype=torch.float32).uniform_(low, high, generator=generator)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        self.norm.reset_parameters()
        normal_(self.out_proj.weight, residual_std(n_layers), generator)

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

