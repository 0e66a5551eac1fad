"""Random inputs for the Mamba-3 scan at its magnitudes, shared by the torch and Triton tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlab_kernels import Mamba3State

TENSORS = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles")


def make_inputs(
    seed: int, batch: int, L: int, H: int, P: int, N: int, G: int, R: int, S: int, *,
    z: bool = True, D: bool = True, initial_state: bool = False,
    dtype: torch.dtype = torch.float64,
) -> tuple[list[Tensor], dict]:
    """(positional tensors, keyword arguments) for `mamba3_scan`.

    dt is log-uniform in [1e-3, 0.1] (mamba_ssm's dt init range) with a tenth of the steps in
    [0.5, 1.5]; A = -softplus(.) clamped to <= -1e-4 as in mamba_ssm's Mamba3; q and k are unit
    RMS like their RMSNorm's outputs; trap spans the sigmoid's range; angles reach tanh's tails.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=dtype)

    dt = torch.exp(math.log(1e-3) + rand(batch, L, H) * math.log(100))
    dt = torch.where(rand(batch, L, H) < 0.1, 0.5 + rand(batch, L, H), dt)
    A = (-F.softplus(randn(batch, L, H) + 1)).clamp(max=-1e-4)
    tensors = [
        randn(batch, L, R, G, N), randn(batch, L, R, G, N), randn(batch, L, H, P), A * dt, dt,
        2 * randn(batch, L, H), 1 + 0.1 * randn(H, R, N), 1 + 0.1 * randn(H, R, N),
        2 * randn(batch, L, S),
    ]
    kwargs: dict = {}
    if D:
        kwargs["D"] = 1 + 0.1 * randn(H)
    if z:
        kwargs["z"] = randn(batch, L, H, P)
    if R > 1:
        kwargs["mimo_x"] = 1 / R + 0.1 * randn(H, R, P)
        kwargs["mimo_o"] = 1 / R + 0.1 * randn(H, R, P)
        if z:
            kwargs["mimo_z"] = 1 + 0.1 * randn(H, R, P)
    if initial_state:
        kwargs["initial_state"] = Mamba3State(
            2 * math.pi * rand(batch, H, S), randn(batch, H, P, N), randn(batch, R, H, N),
            randn(batch, H, P),
        )
    return tensors, kwargs
