"""One Mamba-3 decoding step's state update and read-out as a Triton kernel (inference only).

One program owns (batch row, head, BLOCK_P channels): it reads that (BLOCK_P, N) slice of the
state once, applies the trapezoidal update with every rank's current and previous input
(alpha h + beta sum_r x_prev_r ⊗ k_prev_r + gamma sum_r x_r ⊗ k_r), writes it back and reads
each rank's y_r = h q_r. The rotations, biases and weights before it and the skip, gate and MIMO
read-out after it are small (per token, not per state element) and stay in torch
(`step.prepare`, `step.read_out`). Arithmetic in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ssd.triton_common import PLAIN_CONFIGS, acc_dtype, empty, on_device
from .step import StepTerms

# State values per program: the (BLOCK_P, N) tile stays in registers, 16 fp32 a thread at 4 warps.
_TILE_ELEMENTS = 2048


@triton.autotune(configs=PLAIN_CONFIGS, key=["R", "BLOCK_P", "BLOCK_N"])
@triton.jit
def _mamba3_update_kernel(
    state_ptr,  # (batch, H, P, N), updated in place
    q_ptr,  # (batch, R, H, N), contiguous: rotated, biased
    k_ptr,  # (batch, R, H, N)
    k_prev_ptr,  # (batch, R, H, N)
    x_ptr,  # (batch, R, H, P): x per rank
    x_prev_ptr,  # (batch, R, H, P)
    alpha_ptr,  # (batch, H)
    beta_ptr,  # (batch, H)
    gamma_ptr,  # (batch, H)
    y_ptr,  # (batch, R, H, P), out
    H,
    P,
    N,
    stride_s_b,
    stride_s_h,
    stride_s_p,
    stride_s_n,
    R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pid_p = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask = mask_p[:, None] & mask_n[None, :]
    b64 = b.to(tl.int64)

    alpha = tl.load(alpha_ptr + b64 * H + h).to(ACC)
    beta = tl.load(beta_ptr + b64 * H + h).to(ACC)
    gamma = tl.load(gamma_ptr + b64 * H + h).to(ACC)
    state_ptrs = state_ptr + b64 * stride_s_b + h * stride_s_h
    state_ptrs += offs_p[:, None] * stride_s_p + offs_n[None, :] * stride_s_n
    state = alpha * tl.load(state_ptrs, mask=mask, other=0.0).to(ACC)
    for r in tl.static_range(R):
        row = (b64 * R + r) * H + h
        k = tl.load(k_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(ACC)
        k_prev = tl.load(k_prev_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(ACC)
        x = tl.load(x_ptr + row * P + offs_p, mask=mask_p, other=0.0).to(ACC)
        x_prev = tl.load(x_prev_ptr + row * P + offs_p, mask=mask_p, other=0.0).to(ACC)
        state += (gamma * x)[:, None] * k[None, :] + (beta * x_prev)[:, None] * k_prev[None, :]
    tl.store(state_ptrs, state, mask=mask)
    for r in tl.static_range(R):
        row = (b64 * R + r) * H + h
        q = tl.load(q_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(ACC)
        tl.store(y_ptr + row * P + offs_p, tl.sum(state * q[None, :], axis=1), mask=mask_p)


def state_update_triton(ssm: Tensor, inputs: StepTerms) -> tuple[Tensor, Tensor]:
    """The next SSM state (written into `ssm`, which it returns) and y_r (batch, R, H, P)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise RuntimeError(
            "mamba3_state_update: the 'triton' backend is inference only and got inputs that "
            "require grad; call it under torch.no_grad(), or pass backend='torch'"
        )
    batch, H, P, N = ssm.shape
    R = inputs.q.shape[1]
    q, k, k_prev, x, x_prev, alpha, beta, gamma = (
        t.contiguous() for t in (inputs.q, inputs.k, inputs.k_prev, inputs.x, inputs.x_prev,
                                 inputs.alpha, inputs.beta, inputs.gamma)
    )
    y = empty((batch, R, H, P), x.dtype, x.device)
    block_n = triton.next_power_of_2(N)
    block_p = min(triton.next_power_of_2(P), max(1, _TILE_ELEMENTS // block_n))
    with on_device(x.device):
        _mamba3_update_kernel[(batch, H, triton.cdiv(P, block_p))](
            ssm, q, k, k_prev, x, x_prev, alpha, beta, gamma, y,
            H, P, N,
            *ssm.stride(),
            R=R,
            BLOCK_P=block_p,
            BLOCK_N=block_n,
            ACC=acc_dtype(x.dtype),
        )  # fmt: skip
    return y, ssm
