"""Sequential reference for the Mamba-3 scan: the decoding step, once per time step."""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import compute_dtype, no_autocast
from .inputs import Mamba3Inputs
from .step import Mamba3State, step, zero_state


def mamba3_ref(
    inputs: Mamba3Inputs,
    *,
    chunk_size: int = 64,
    initial_state: Mamba3State | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Mamba3State]:
    """`mamba3_scan` step by step (`chunk_size` is accepted and ignored)."""
    batch, L, H, P = inputs.v.shape
    R, N, S = inputs.q.shape[2], inputs.q.shape[-1], inputs.angles.shape[-1]
    dtype = compute_dtype(inputs.v)
    with no_autocast(inputs.v.device):
        if initial_state is None:
            state = zero_state(batch, H, P, N, R, S, device=inputs.v.device, dtype=dtype)
        else:
            state = Mamba3State(*(t.to(dtype) for t in initial_state))
        ys = []
        for t in range(L):
            y_t, state = step(state, inputs.at(t))
            ys.append(y_t)
        y = torch.stack(ys, dim=1).to(inputs.v.dtype)
    return (y, state) if return_final_state else y
