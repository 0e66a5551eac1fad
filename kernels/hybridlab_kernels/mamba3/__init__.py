"""Mamba-3 scan: the public op, its sequential reference, the chunked path, one decoding step."""

from __future__ import annotations

from torch import Tensor

from .._common import check_grouped, check_same_shape, check_shape
from ..dispatch import kernel_backend
from .chunked import mamba3_chunked
from .inputs import Mamba3Inputs
from .naive import mamba3_ref
from .step import Mamba3State, mamba3_state_update, zero_state

__all__ = [
    "Mamba3Inputs",
    "Mamba3State",
    "mamba3_chunked",
    "mamba3_ref",
    "mamba3_scan",
    "mamba3_state_update",
    "zero_state",
]

_OP = "mamba3_scan"


def mamba3_scan(
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
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Mamba3State]:
    """Mamba-3 (Lahoti et al., 2026), mamba_ssm's ``mamba3_siso_combined`` / ``mamba3_mimo``.

    q, k: (batch, L, R, G, N), C and B after their RMSNorm, R the MIMO rank (1: SISO), H % G
    == 0; v: (batch, L, H, P), x; adt: (batch, L, H), A * dt <= 0 (A is data-dependent); dt:
    (batch, L, H), after softplus; trap: (batch, L, H), before its sigmoid; q_bias, k_bias:
    (H, R, N); angles: (batch, L, S), 2 S <= N, shared by the heads; D: (H,); z: (batch, L, H,
    P); mimo_x, mimo_z, mimo_o: (H, R, P), given iff R > 1 (mimo_z only with z).

    Per head, with theta_t = theta_{t-1} + pi tanh(angles_t) dt_t, q_t and k_t rotated by theta_t
    (see `rotary.rotate`) after adding their biases, lam = sigmoid(trap), x_r = x * mimo_x_r:
      h_t = exp(adt_t) h_{t-1} + exp(adt_t) (1 - lam_t) dt_t sum_r x_{t-1,r} ⊗ k_{t-1,r}
            + lam_t dt_t sum_r x_{t,r} ⊗ k_{t,r}                    (h: (P, N))
      y_t = sum_r mimo_o_r * (h_t q_{t,r} + D x_{t,r}) * silu(z_t mimo_z_r)
    (R = 1: all projections 1). Computes in float32 (float64 for float64 v); returns y (batch,
    L, H, P) in v.dtype, or (y, final `Mamba3State`) if `return_final_state`. `backend`
    ("ref" | "torch" | "triton") overrides $HYBRIDLAB_KERNELS.
    """
    inputs = Mamba3Inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_x, mimo_z,
                          mimo_o)
    _check_args(inputs, chunk_size, initial_state)
    choice = kernel_backend(v.device, backend, op=_OP)
    if choice == "triton":
        # Imported on demand: triton is an optional, GPU-host dependency.
        from .triton_mamba3 import mamba3_triton as impl
    else:
        impl = mamba3_ref if choice == "ref" else mamba3_chunked
    return impl(inputs, chunk_size=chunk_size, initial_state=initial_state,
                return_final_state=return_final_state)


def _check_args(inputs: Mamba3Inputs, chunk_size: int,
                initial_state: Mamba3State | None) -> None:
    q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_x, mimo_z, mimo_o = inputs
    if v.dim() != 4 or v.shape[1] == 0:
        raise ValueError(
            f"{_OP}: v must have shape (batch, L, H, P) with L >= 1, got {tuple(v.shape)}"
        )
    batch, L, H, P = v.shape
    if chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be a positive integer, got {chunk_size}")
    if q.dim() != 5:
        raise ValueError(
            f"{_OP}: q must have shape (batch={batch}, L={L}, R, G, N), got {tuple(q.shape)}"
        )
    R, N = q.shape[2], q.shape[4]
    check_grouped(_OP, "q", q, [("batch", batch), ("L", L), ("R", R), ("G", 0), ("N", N)],
                  ("H", H))
    check_same_shape(_OP, "k", k, "q", q)
    for name, t in (("adt", adt), ("dt", dt), ("trap", trap)):
        check_shape(_OP, name, t, [("batch", batch), ("L", L), ("H", H)])
    for name, t in (("q_bias", q_bias), ("k_bias", k_bias)):
        check_shape(_OP, name, t, [("H", H), ("R", R), ("N", N)])
    if angles.dim() != 3 or angles.shape[:2] != (batch, L) or not 0 < 2 * angles.shape[2] <= N:
        raise ValueError(
            f"{_OP}: angles must have shape (batch={batch}, L={L}, S) with 0 < 2 S <= N={N}, "
            f"got {tuple(angles.shape)}"
        )
    if D is not None:
        check_shape(_OP, "D", D, [("H", H)])
    if z is not None:
        check_shape(_OP, "z", z, [("batch", batch), ("L", L), ("H", H), ("P", P)])
    projections = {"mimo_x": mimo_x, "mimo_o": mimo_o, "mimo_z": mimo_z}
    for name, t in projections.items():
        wanted = R > 1 and (name != "mimo_z" or z is not None)
        if t is None and wanted:
            raise ValueError(f"{_OP}: rank R={R} > 1 (MIMO) needs {name} of shape (H, R, P)")
        if t is not None and R == 1:
            raise ValueError(f"{_OP}: {name} is for MIMO (R > 1); q and k have R=1")
        if t is not None:
            check_shape(_OP, name, t, [("H", H), ("R", R), ("P", P)])
    if initial_state is not None:
        S = angles.shape[2]
        expected = Mamba3State(
            [("batch", batch), ("H", H), ("S", S)],
            [("batch", batch), ("H", H), ("P", P), ("N", N)],
            [("batch", batch), ("R", R), ("H", H), ("N", N)],
            [("batch", batch), ("H", H), ("P", P)],
        )
        for name, t, want in zip(Mamba3State._fields, initial_state, expected, strict=True):
            check_shape(_OP, f"initial_state.{name}", t, want)
