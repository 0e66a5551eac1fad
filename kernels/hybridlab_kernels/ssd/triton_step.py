"""One decoding step of the Mamba-2 recurrence as a Triton kernel (inference only).

One program owns (batch row, head, BLOCK_P channels): it reads that (BLOCK_P, N) slice of the
state once, decays it, adds dt x ⊗ B, writes it back and reads y out by C, with the dt prologue,
the D skip and the silu(z) gate fused in. Arithmetic in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import compute_dtype
from .triton_common import PLAIN_CONFIGS, acc_dtype, empty, on_device, softplus

# State values per program: the (BLOCK_P, N) tile stays in registers, 16 fp32 a thread at 4 warps.
_TILE_ELEMENTS = 2048


@triton.autotune(
    configs=PLAIN_CONFIGS, key=["HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "BLOCK_P", "BLOCK_N"]
)
@triton.jit
def _state_update_kernel(
    state_ptr,  # (batch, H, P, N), updated in place
    x_ptr,  # (batch, H, P)
    dt_ptr,  # (batch, H)
    A_ptr,  # (H,)
    B_ptr,  # (batch, G, N)
    C_ptr,  # (batch, G, N)
    D_ptr,  # (H,) or (H, P)
    z_ptr,  # (batch, H, P)
    bias_ptr,  # (H,)
    y_ptr,  # (batch, H, P), out
    H,
    P,
    N,
    heads_per_group,
    stride_s_b,
    stride_s_h,
    stride_s_p,
    stride_s_n,
    stride_x_b,
    stride_x_h,
    stride_x_p,
    stride_dt_b,
    stride_dt_h,
    stride_b_b,
    stride_b_g,
    stride_b_n,
    stride_c_b,
    stride_c_g,
    stride_c_n,
    stride_z_b,
    stride_z_h,
    stride_z_p,
    stride_D_h,
    stride_D_p,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pid_p = tl.program_id(2)
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask = mask_p[:, None] & mask_n[None, :]
    b64 = b.to(tl.int64)

    dt = tl.load(dt_ptr + b64 * stride_dt_b + h * stride_dt_h).to(ACC)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(ACC)
    if SOFTPLUS:
        dt = softplus(dt)
    decay = tl.exp(dt * tl.load(A_ptr + h).to(ACC))

    x_ptrs = x_ptr + b64 * stride_x_b + h * stride_x_h + offs_p * stride_x_p
    x = tl.load(x_ptrs, mask=mask_p, other=0.0).to(ACC)
    B_ptrs = B_ptr + b64 * stride_b_b + g * stride_b_g + offs_n * stride_b_n
    B = tl.load(B_ptrs, mask=mask_n, other=0.0).to(ACC)
    C_ptrs = C_ptr + b64 * stride_c_b + g * stride_c_g + offs_n * stride_c_n
    C = tl.load(C_ptrs, mask=mask_n, other=0.0).to(ACC)
    state_ptrs = state_ptr + b64 * stride_s_b + h * stride_s_h
    state_ptrs += offs_p[:, None] * stride_s_p + offs_n[None, :] * stride_s_n
    state = tl.load(state_ptrs, mask=mask, other=0.0).to(ACC)

    state = decay * state + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state, mask=mask)
    # read out the unrounded state, as the torch step does
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        D = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=mask_p, other=0.0).to(ACC)
        y += D * x
    if HAS_Z:
        z_ptrs = z_ptr + b64 * stride_z_b + h * stride_z_h + offs_p * stride_z_p
        z = tl.load(z_ptrs, mask=mask_p, other=0.0).to(ACC)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + (b64 * H + h) * P + offs_p, y, mask=mask_p)


def ssd_state_update_triton(
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
) -> Tensor:
    """Advance `state` by one token in place and return that token's output (no autograd).

    state: (batch, H, P, N), updated in place; x: (batch, H, P); dt: (batch, H); A: (H,);
    B, C: (batch, G, N) with H % G == 0; D: (H,) or (H, P); z: (batch, H, P); dt_bias: (H,).
    Returns y (batch, H, P) in x.dtype. Shapes are checked by `ssd_state_update`.
    """
    tensors = (x, dt, A, B, C, D, z, dt_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "ssd_state_update: the 'triton' backend is inference only and got inputs that "
            "require grad; call it under torch.no_grad(), or pass backend='torch'"
        )
    batch, H, P, N = state.shape
    G = B.shape[1]
    y = empty((batch, H, P), x.dtype, x.device)
    block_n = triton.next_power_of_2(N)
    block_p = min(triton.next_power_of_2(P), max(1, _TILE_ELEMENTS // block_n))
    D_strides = (0, 0) if D is None else (D.stride(0), D.stride(1) if D.dim() == 2 else 0)
    z_strides = z.stride() if z is not None else (0, 0, 0)
    with on_device(x.device):
        _state_update_kernel[(batch, H, triton.cdiv(P, block_p))](
            state, x, dt, A, B, C, D, z, dt_bias, y,
            H, P, N, H // G,
            *state.stride(),
            *x.stride(),
            *dt.stride(),
            *B.stride(),
            *C.stride(),
            *z_strides,
            *D_strides,
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=dt_bias is not None,
            SOFTPLUS=dt_softplus,
            BLOCK_P=block_p,
            BLOCK_N=block_n,
            ACC=acc_dtype(compute_dtype(x)),
        )  # fmt: skip
    return y
