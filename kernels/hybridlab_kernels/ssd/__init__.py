"""Mamba-2 SSD: the public op, its sequential reference, the chunked path, one decoding step."""

from __future__ import annotations

from torch import Tensor

from .._common import check_grouped, check_same_shape, check_shape
from ..dispatch import kernel_backend
from .chunked import ssd_chunked, ssd_chunked_decay
from .naive import ssd_ref
from .step import check_head_skip, ssd_state_update

__all__ = ["ssd", "ssd_chunked", "ssd_chunked_decay", "ssd_ref", "ssd_state_update"]

_OP = "ssd"


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 64,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 state-space duality (mamba_ssm's `mamba_chunk_scan_combined` layout).

    x: (batch, L, H, P); dt: (batch, L, H); A: (H,), negative; B, C: (batch, L, G, N) with
    H % G == 0 (head h uses group h // (H // G)); D: (H,) or (H, P); z: (batch, L, H, P);
    dt_bias: (H,); initial_state: (batch, H, P, N).

    dt = dt + dt_bias, softplus'd if `dt_softplus`;
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t   (h: (H, P, N), h_{-1} = initial_state or 0);
    y_t = h_t · C_t (summed over N) + D * x_t, times silu(z_t) if z is given.

    Computes in float32 (float64 if x is float64) whatever the input dtypes or autocast.
    Returns y (batch, L, H, P) in x.dtype, or (y, final_state (batch, H, P, N) in the compute
    dtype) if `return_final_state`. `chunk_size` is used by the "torch" and "triton" backends.
    `backend` ("ref" | "torch" | "triton") overrides $HYBRIDLAB_KERNELS.
    """
    _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state)
    choice = kernel_backend(x.device, backend, op=_OP)
    if choice == "triton":
        # Imported on demand: triton is an optional, GPU-host dependency.
        from .triton_ssd import ssd_triton as impl
    else:
        impl = ssd_ref if choice == "ref" else ssd_chunked
    return impl(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        initial_state=initial_state,
        return_final_state=return_final_state,
    )


def _check_args(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    if x.dim() != 4 or x.shape[1] == 0:
        raise ValueError(
            f"{_OP}: x must have shape (batch, L, H, P) with L >= 1, got {tuple(x.shape)}"
        )
    batch, L, H, P = x.shape
    if chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be a positive integer, got {chunk_size}")
    check_shape(_OP, "dt", dt, [("batch", batch), ("L", L), ("H", H)])
    check_shape(_OP, "A", A, [("H", H)])
    if B.dim() != 4:
        raise ValueError(
            f"{_OP}: B must have shape (batch={batch}, L={L}, G, N), got {tuple(B.shape)}"
        )
    N = B.shape[3]
    check_grouped(_OP, "B", B, [("batch", batch), ("L", L), ("G", 0), ("N", N)], ("H", H))
    check_same_shape(_OP, "C", C, "B", B)
    if D is not None:
        check_head_skip(_OP, D, H, P)
    if z is not None:
        check_shape(_OP, "z", z, [("batch", batch), ("L", L), ("H", H), ("P", P)])
    if dt_bias is not None:
        check_shape(_OP, "dt_bias", dt_bias, [("H", H)])
    if initial_state is not None:
        expected = [("batch", batch), ("H", H), ("P", P), ("N", N)]
        check_shape(_OP, "initial_state", initial_state, expected)
