"""The tensors of one Mamba-3 scan (or one decoding step), as `mamba3_scan` takes them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Fields with a time axis (dim 1) in a scan; a step's tensors have none.
TIMED = ("q", "k", "v", "adt", "dt", "trap", "angles", "z")


class Mamba3Inputs(NamedTuple):
    """Shapes (scan; a decoding step drops L): q, k (batch, L, R, G, N); v, z (batch, L, H, P);
    adt, dt, trap (batch, L, H); q_bias, k_bias (H, R, N); angles (batch, L, S); D (H,);
    mimo_x, mimo_z, mimo_o (H, R, P), MIMO only. See `mamba3_scan` for what each holds."""

    q: Tensor
    k: Tensor
    v: Tensor
    adt: Tensor
    dt: Tensor
    trap: Tensor
    q_bias: Tensor
    k_bias: Tensor
    angles: Tensor
    D: Tensor | None = None
    z: Tensor | None = None
    mimo_x: Tensor | None = None
    mimo_z: Tensor | None = None
    mimo_o: Tensor | None = None

    def cast(self, dtype: torch.dtype) -> Mamba3Inputs:
        return Mamba3Inputs(*(None if t is None else t.to(dtype) for t in self))

    def at(self, t: int) -> Mamba3Inputs:
        """The inputs of time step t, as a decoding step takes them."""
        return self._replace(**{
            name: getattr(self, name)[:, t]
            for name in TIMED if getattr(self, name) is not None
        })
