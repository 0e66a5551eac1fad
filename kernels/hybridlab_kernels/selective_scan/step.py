"""One decoding step of the Mamba-1 recurrence."""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import (
    check_grouped,
    check_same_shape,
    check_shape,
    compute_dtype,
    no_autocast,
    prepare_dt,
    skip_and_gate,
)
from ..dispatch import kernel_backend

_OP = "selective_state_update"


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Advance `state` by one token in place and return that token's output.

    state: (batch, dim, N), updated in place; x, dt: (batch, dim); A: (dim, N);
    B, C: (batch, N) or (batch, G, N) with dim % G == 0; D: (dim,); z: (batch, dim);
    dt_bias: (dim,). Returns y (batch, dim) in x.dtype. `backend` ("ref" | "torch" | "triton")
    overrides $HYBRIDLAB_KERNELS; "ref" and "torch" both run the torch code below, and the Triton
    kernel is inference only (it refuses inputs that need a grad).
    """
    _check_args(state, x, dt, A, B, C, D, z, dt_bias)
    if kernel_backend(state.device, backend, op=_OP) == "triton":
        # Imported on demand: triton is an optional, GPU-host dependency.
        from .triton_scan import selective_state_update_triton

        return selective_state_update_triton(
            state, x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=dt_softplus
        )
    out_dtype = x.dtype
    dtype = compute_dtype(x)
    with no_autocast(x.device):
        x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
        dim = x.shape[1]
        dt = prepare_dt(dt, dt_bias, dt_softplus, (-1,))  # (batch, dim)
        if B.dim() == 2:
            B, C = B.unsqueeze(1), C.unsqueeze(1)
        # (batch, G, N) -> (batch, dim, N): channel d reads group d // (dim // G)
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
        # A copy, so the in-place update below cannot clobber a value autograd saved
        old = state.to(dtype, copy=True)
        new = torch.exp(dt[..., None] * A) * old + (dt * x)[..., None] * B  # (batch, dim, N)
        state.copy_(new)
        y = (new * C).sum(-1)  # (batch, dim)
        y = skip_and_gate(y, x, D, z)
    return y.to(out_dtype)


def _check_args(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
) -> None:
    if state.dim() != 3:
        raise ValueError(f"{_OP}: state must have shape (batch, dim, N), got {tuple(state.shape)}")
    batch, dim, N = state.shape
    check_shape(_OP, "x", x, [("batch", batch), ("dim", dim)])
    check_shape(_OP, "dt", dt, [("batch", batch), ("dim", dim)])
    check_shape(_OP, "A", A, [("dim", dim), ("N", N)])
    if B.dim() == 2:
        check_shape(_OP, "B", B, [("batch", batch), ("N", N)])
    else:
        check_grouped(_OP, "B", B, [("batch", batch), ("G", 0), ("N", N)], ("dim", dim))
    check_same_shape(_OP, "C", C, "B", B)
    if D is not None:
        check_shape(_OP, "D", D, [("dim", dim)])
    if z is not None:
        check_shape(_OP, "z", z, [("batch", batch), ("dim", dim)])
    if dt_bias is not None:
        check_shape(_OP, "dt_bias", dt_bias, [("dim", dim)])
