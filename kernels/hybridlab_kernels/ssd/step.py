"""One decoding step of the Mamba-2 recurrence."""

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

_OP = "ssd_state_update"


def ssd_state_update(
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

    state: (batch, H, P, N), updated in place; x: (batch, H, P); dt: (batch, H); A: (H,);
    B, C: (batch, G, N) with H % G == 0; D: (H,) or (H, P); z: (batch, H, P); dt_bias: (H,).
    Returns y (batch, H, P) in x.dtype. `backend` ("ref" | "torch" | "triton") overrides
    $HYBRIDLAB_KERNELS; "ref" and "torch" both run the torch code below, and the Triton kernel is
    inference only (it refuses inputs that need a grad).
    """
    _check_args(state, x, dt, A, B, C, D, z, dt_bias)
    if kernel_backend(state.device, backend, op=_OP) == "triton":
        # Imported on demand: triton is an optional, GPU-host dependency.
        from .triton_step import ssd_state_update_triton

        return ssd_state_update_triton(
            state, x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=dt_softplus
        )
    out_dtype = x.dtype
    dtype = compute_dtype(x)
    with no_autocast(x.device):
        x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
        H = x.shape[1]
        dt = prepare_dt(dt, dt_bias, dt_softplus, (-1,))  # (batch, H)
        # (batch, G, N) -> (batch, H, N): head h reads group h // (H // G)
        B = B.repeat_interleave(H // B.shape[1], dim=1)
        C = C.repeat_interleave(H // C.shape[1], dim=1)
        # A copy, so the in-place update below cannot clobber a value autograd saved
        old = state.to(dtype, copy=True)
        decay = torch.exp(dt * A)[..., None, None]  # (batch, H, 1, 1)
        new = decay * old + (dt[..., None] * x)[..., None] * B[:, :, None, :]  # (batch, H, P, N)
        state.copy_(new)
        y = (new @ C[..., None]).squeeze(-1)  # (batch, H, P)
        if D is not None and D.dim() == 1:
            D = D[:, None]
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
    if state.dim() != 4:
        raise ValueError(f"{_OP}: state must have shape (batch, H, P, N), got {tuple(state.shape)}")
    batch, H, P, N = state.shape
    check_shape(_OP, "x", x, [("batch", batch), ("H", H), ("P", P)])
    check_shape(_OP, "dt", dt, [("batch", batch), ("H", H)])
    check_shape(_OP, "A", A, [("H", H)])
    check_grouped(_OP, "B", B, [("batch", batch), ("G", 0), ("N", N)], ("H", H))
    check_same_shape(_OP, "C", C, "B", B)
    if D is not None:
        check_head_skip(_OP, D, H, P)
    if z is not None:
        check_shape(_OP, "z", z, [("batch", batch), ("H", H), ("P", P)])
    if dt_bias is not None:
        check_shape(_OP, "dt_bias", dt_bias, [("H", H)])


def check_head_skip(op: str, D: Tensor, H: int, P: int) -> None:
    """D is per head (H,) or per head and channel (H, P)."""
    if tuple(D.shape) not in ((H,), (H, P)):
        raise ValueError(
            f"{op}: D must have shape (H={H},) or (H={H}, P={P}), got {tuple(D.shape)}"
        )
