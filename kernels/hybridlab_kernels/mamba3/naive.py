"""Sequential reference for the Mamba-3 scan: the decoding step, once per time step."""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import compute_dtype, no_autocast
from .step import Mamba3State, step, zero_state


def mamba3_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor,
    q_bias: Tensor,
    k_bias: Tensor,
    angles: Tensor,
    *,
    D: Tensor | None = None,
    z: Tensor | None = None,
    mimo_x: Tensor | None = None,
    mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None,
    chunk_size: int = 64,
    initial_state: Mamba3State | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Mamba3State]:
    """`mamba3_scan` step by step (`chunk_size` is accepted and ignored)."""
    batch, L, H, P = v.shape
    R, N, S = q.shape[2], q.shape[-1], angles.shape[-1]
    dtype = compute_dtype(v)
    with no_autocast(v.device):
        if initial_state is None:
            state = zero_state(batch, H, P, N, R, S, device=v.device, dtype=dtype)
        else:
            state = Mamba3State(*(t.to(dtype) for t in initial_state))
        ys = []
        for t in range(L):
            y_t, state = step(
                state, q[:, t], k[:, t], v[:, t], adt[:, t], dt[:, t], trap[:, t], q_bias,
                k_bias, angles[:, t], D=D, z=None if z is None else z[:, t], mimo_x=mimo_x,
                mimo_z=mimo_z, mimo_o=mimo_o,
            )
            ys.append(y_t)
        y = torch.stack(ys, dim=1).to(v.dtype)
    return (y, state) if return_final_state else y
