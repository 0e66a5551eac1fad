"""Mamba-1 selective scan: the public op, its sequential reference, the chunked path, one step."""

from __future__ import annotations

from torch import Tensor

from .._common import check_grouped, check_same_shape, check_shape
from ..dispatch import kernel_backend
from .chunked import selective_scan_chunked
from .naive import selective_scan_ref
from .step import selective_state_update

__all__ = [
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update",
]

_OP = "selective_scan"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan (mamba_ssm layout).

    u: (batch, dim, L); delta: (batch, dim, L); A: (dim, N), negative reals;
    B, C: (batch, N, L) or (batch, G, N, L) with dim % G == 0 (channel d uses group
    d // (dim // G)); D: (dim,); z: (batch, dim, L); delta_bias: (dim,);
    initial_state: (batch, dim, N).

    dt = delta + delta_bias, softplus'd if `delta_softplus`;
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t, with h_{-1} = initial_state or 0;
    y_t = sum_n C_t[n] h_t[:, n] + D * u_t, times silu(z_t) if z is given.

    Computes in float32 (float64 if u is float64) whatever the input dtypes or autocast.
    Returns y (batch, dim, L) in u.dtype, or (y, final_state (batch, dim, N) in the compute dtype)
    if `return_final_state`. `backend` ("ref" | "torch" | "triton") overrides $HYBRIDLAB_KERNELS.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    choice = kernel_backend(u.device, backend, op=_OP)
    if choice == "triton":
        # Imported on demand: triton is an optional, GPU-host dependency.
        from .triton_scan import selective_scan_triton as impl
    else:
        impl = selective_scan_ref if choice == "ref" else selective_scan_chunked
    return impl(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        return_final_state=return_final_state,
    )


def _check_args(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    if u.dim() != 3 or u.shape[-1] == 0:
        raise ValueError(
            f"{_OP}: u must have shape (batch, dim, L) with L >= 1, got {tuple(u.shape)}"
        )
    batch, dim, L = u.shape
    check_shape(_OP, "delta", delta, [("batch", batch), ("dim", dim), ("L", L)])
    if A.dim() != 2:
        raise ValueError(f"{_OP}: A must have shape (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    check_shape(_OP, "A", A, [("dim", dim), ("N", N)])
    if B.dim() == 3:
        check_shape(_OP, "B", B, [("batch", batch), ("N", N), ("L", L)])
    else:
        check_grouped(_OP, "B", B, [("batch", batch), ("G", 0), ("N", N), ("L", L)], ("dim", dim))
    check_same_shape(_OP, "C", C, "B", B)
    if D is not None:
        check_shape(_OP, "D", D, [("dim", dim)])
    if z is not None:
        check_shape(_OP, "z", z, [("batch", batch), ("dim", dim), ("L", L)])
    if delta_bias is not None:
        check_shape(_OP, "delta_bias", delta_bias, [("dim", dim)])
    if initial_state is not None:
        check_shape(_OP, "initial_state", initial_state, [("batch", batch), ("dim", dim), ("N", N)])
