"""Forward stages of the chunked SSD as Triton kernels (the backward recomputes them too).

Notation, per batch row b, chunk c of T steps and head h (group g = h // heads_per_group):
dt_l is dt after bias and softplus, s_l = dt_0 A + ... + dt_l A the within-chunk cumulative sum
(s_end its last value), u_l = dt_l x_l. Steps past the sequence end get dt = 0: decay 1, no input.

1. `dt_cumsum`: dt_l and s_l, both (batch, H, nc, T).
2. `chunk_cb`: C_l . B_m for l, m in one chunk, per group (shared by the group's heads).
3. `chunk_state`: the chunk's own end state sum_l exp(s_end - s_l) u_l B_l^T, from a zero state.
4. `state_passing`: h_in(c + 1) = exp(s_end(c)) h_in(c) + own(c), sequential over chunks.
5. `chunk_scan`: y_l = sum_{m <= l} exp(s_l - s_m) (C_l . B_m) u_m + exp(s_l) h_in C_l + D x_l,
   times silu(z_l).

Every exponent is a difference of cumulative sums within one chunk (<= 0 for a decaying SSM), so
nothing overflows however long the sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (
    PLAIN_CONFIGS,
    STATE_BLOCK,
    TILE_CONFIGS,
    acc_dtype,
    empty,
    feature_block,
    softplus,
)


@triton.autotune(configs=PLAIN_CONFIGS, key=["BLOCK_T", "BLOCK_H"])
@triton.jit
def _dt_cumsum_kernel(
    dt_ptr,  # (batch, L, H)
    A_ptr,  # (H,)
    bias_ptr,  # (H,)
    dt_out_ptr,  # (batch, H, nc, T), out: dt after bias and softplus, 0 past the sequence end
    dA_cs_ptr,  # (batch, H, nc, T), out: within-chunk cumulative sum of dt * A
    L,
    H,
    T,
    nc,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = pid_bc // nc
    c = pid_bc % nc
    chunk_len = tl.minimum(T, L - c * T)
    offs_t = tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    valid = (offs_t[:, None] < chunk_len) & mask_h[None, :]

    dt_base = dt_ptr + b.to(tl.int64) * stride_dt_b + (c * T).to(tl.int64) * stride_dt_l
    dt_ptrs = dt_base + offs_t[:, None] * stride_dt_l + offs_h[None, :] * stride_dt_h
    dt = tl.load(dt_ptrs, mask=valid, other=0.0).to(ACC)  # (BLOCK_T, BLOCK_H)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(ACC)[None, :]
    if SOFTPLUS:
        dt = softplus(dt)
    dt = tl.where(valid, dt, 0.0)
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(ACC)
    dA_cs = tl.cumsum(dt * A[None, :], axis=0)

    out = ((b * H + offs_h[None, :]).to(tl.int64) * nc + c) * T + offs_t[:, None]
    mask_out = (offs_t[:, None] < T) & mask_h[None, :]
    tl.store(dt_out_ptr + out, dt, mask=mask_out)
    tl.store(dA_cs_ptr + out, dA_cs, mask=mask_out)


@triton.autotune(configs=TILE_CONFIGS, key=["BLOCK_N"])
@triton.jit
def _chunk_cb_kernel(
    C_ptr,  # (batch, L, G, N)
    B_ptr,  # (batch, L, G, N)
    cb_ptr,  # (batch, nc, G, T, T), out: C_l . B_m, for the tiles on or below the diagonal
    L,
    G,
    T,
    N,
    nc,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    stride_b_b,
    stride_b_l,
    stride_b_g,
    stride_b_n,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    g = tl.program_id(1)
    pid_t = tl.program_id(2)
    n_k_tiles = tl.cdiv(T, BLOCK_K)
    pid_m = pid_t // n_k_tiles
    pid_k = pid_t % n_k_tiles
    # Every reader masks m > l, so tiles wholly above the diagonal are never needed.
    if pid_k * BLOCK_K >= (pid_m + 1) * BLOCK_M:
        return
    b = pid_bc // nc
    c = pid_bc % nc
    chunk_len = tl.minimum(T, L - c * T)
    offs_l = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)

    C_base = C_ptr + b.to(tl.int64) * stride_c_b + (c * T).to(tl.int64) * stride_c_l
    C_base += g * stride_c_g
    B_base = B_ptr + b.to(tl.int64) * stride_b_b + (c * T).to(tl.int64) * stride_b_l
    B_base += g * stride_b_g
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        C_tile = tl.load(
            C_base + offs_l[:, None] * stride_c_l + n[None, :] * stride_c_n,
            mask=(offs_l[:, None] < chunk_len) & (n[None, :] < N),
            other=0.0,
        ).to(ACC)  # (BLOCK_M, BLOCK_N)
        Bt_tile = tl.load(
            B_base + offs_k[None, :] * stride_b_l + n[:, None] * stride_b_n,
            mask=(offs_k[None, :] < chunk_len) & (n[:, None] < N),
            other=0.0,
        ).to(ACC)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(C_tile, Bt_tile, input_precision="ieee")

    cb_base = cb_ptr + ((b * nc + c) * G + g).to(tl.int64) * T * T
    cb_ptrs = cb_base + offs_l[:, None] * T + offs_k[None, :]
    tl.store(cb_ptrs, acc, mask=(offs_l[:, None] < T) & (offs_k[None, :] < T))


@triton.autotune(configs=TILE_CONFIGS, key=["FROM_END", "BLOCK_P", "BLOCK_N"])
@triton.jit
def _chunk_state_kernel(
    x_ptr,  # (batch, L, H, P): x, or the gradient of y for the backward
    B_ptr,  # (batch, L, G, N): B, or C for the backward
    dt_ptr,  # (batch, H, nc, T)
    dA_cs_ptr,  # (batch, H, nc, T)
    out_ptr,  # (batch, nc, H, P, N), out
    L,
    H,
    T,
    P,
    N,
    nc,
    heads_per_group,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_b_b,
    stride_b_l,
    stride_b_g,
    stride_b_n,
    FROM_END: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out = sum_l w_l x_l ⊗ B_l over the chunk, with w_l = dt_l exp(s_end - s_l) if FROM_END (the
    # chunk's own end state), else exp(s_l) (the gradient of the state entering the chunk).
    pid_bc = tl.program_id(0)
    h = tl.program_id(1)
    pid_t = tl.program_id(2)
    n_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_p = pid_t // n_n_tiles
    pid_n = pid_t % n_n_tiles
    b = pid_bc // nc
    c = pid_bc % nc
    g = h // heads_per_group
    chunk_len = tl.minimum(T, L - c * T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    x_base = x_ptr + b.to(tl.int64) * stride_x_b + (c * T).to(tl.int64) * stride_x_l
    x_base += h * stride_x_h
    B_base = B_ptr + b.to(tl.int64) * stride_b_b + (c * T).to(tl.int64) * stride_b_l
    B_base += g * stride_b_g
    chunk_base = ((b * H + h) * nc + c).to(tl.int64) * T
    if FROM_END:
        s_end = tl.load(dA_cs_ptr + chunk_base + chunk_len - 1).to(ACC)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    for k0 in range(0, chunk_len, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < chunk_len
        s = tl.load(dA_cs_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
        if FROM_END:
            dt = tl.load(dt_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
            w = dt * tl.exp(s_end - s)
        else:
            w = tl.exp(s)
        w = tl.where(mask_k, w, 0.0)
        xt_tile = tl.load(
            x_base + k[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
            mask=mask_k[None, :] & (offs_p[:, None] < P),
            other=0.0,
        ).to(ACC)  # (BLOCK_P, BLOCK_K)
        B_tile = tl.load(
            B_base + k[:, None] * stride_b_l + offs_n[None, :] * stride_b_n,
            mask=mask_k[:, None] & (offs_n[None, :] < N),
            other=0.0,
        ).to(ACC)  # (BLOCK_K, BLOCK_N)
        acc += tl.dot(xt_tile * w[None, :], B_tile, input_precision="ieee")

    out_base = out_ptr + ((b * nc + c) * H + h).to(tl.int64) * P * N
    out_ptrs = out_base + offs_p[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.autotune(configs=PLAIN_CONFIGS, key=["HAS_INIT", "BLOCK_D"])
@triton.jit
def _state_passing_kernel(
    states_ptr,  # (batch, nc, H, P, N): in, each chunk's own end state; out, the state entering it
    dA_cs_ptr,  # (batch, H, nc, T)
    init_ptr,  # (batch, H, P, N)
    final_ptr,  # (batch, H, P, N), out
    H,
    T,
    P,
    N,
    nc,
    stride_init_b,
    stride_init_h,
    stride_init_p,
    stride_init_n,
    HAS_INIT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # flat (p, n) index p * N + n
    mask = offs < P * N
    if HAS_INIT:
        init_base = init_ptr + b.to(tl.int64) * stride_init_b + h * stride_init_h
        init_ptrs = init_base + (offs // N) * stride_init_p + (offs % N) * stride_init_n
        state = tl.load(init_ptrs, mask=mask, other=0.0).to(ACC)
    else:
        state = tl.zeros([BLOCK_D], dtype=ACC)
    for c in range(nc):
        ptrs = states_ptr + ((b * nc + c) * H + h).to(tl.int64) * P * N + offs
        own = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
        tl.store(ptrs, state, mask=mask)
        # padded steps have dt = 0, so the last entry is the decay over the chunk's real steps
        s_end = tl.load(dA_cs_ptr + ((b * H + h) * nc + c).to(tl.int64) * T + T - 1).to(ACC)
        state = tl.exp(s_end) * state + own
    tl.store(final_ptr + (b * H + h).to(tl.int64) * P * N + offs, state, mask=mask)


@triton.autotune(configs=TILE_CONFIGS, key=["HAS_D", "HAS_Z", "STORE_PRE", "BLOCK_P", "BLOCK_N"])
@triton.jit
def _chunk_scan_kernel(
    x_ptr,  # (batch, L, H, P)
    z_ptr,  # (batch, L, H, P)
    C_ptr,  # (batch, L, G, N)
    cb_ptr,  # (batch, nc, G, T, T)
    dt_ptr,  # (batch, H, nc, T)
    dA_cs_ptr,  # (batch, H, nc, T)
    states_ptr,  # (batch, nc, H, P, N): the state entering each chunk
    D_ptr,  # (H,) or (H, P)
    y_ptr,  # (batch, L, H, P), out
    y_pre_ptr,  # (batch, L, H, P), out if STORE_PRE: y before the silu(z) gate
    L,
    H,
    T,
    P,
    N,
    nc,
    heads_per_group,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_z_b,
    stride_z_l,
    stride_z_h,
    stride_z_p,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    stride_D_h,
    stride_D_p,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    STORE_PRE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    h = tl.program_id(1)
    pid_t = tl.program_id(2)
    n_p_tiles = tl.cdiv(P, BLOCK_P)
    pid_m = pid_t // n_p_tiles
    pid_p = pid_t % n_p_tiles
    b = pid_bc // nc
    c = pid_bc % nc
    g = h // heads_per_group
    chunk_len = tl.minimum(T, L - c * T)
    offs_l = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_l = offs_l < chunk_len
    mask_p = offs_p < P

    x_base = x_ptr + b.to(tl.int64) * stride_x_b + (c * T).to(tl.int64) * stride_x_l
    x_base += h * stride_x_h
    C_base = C_ptr + b.to(tl.int64) * stride_c_b + (c * T).to(tl.int64) * stride_c_l
    C_base += g * stride_c_g
    chunk_base = ((b * H + h) * nc + c).to(tl.int64) * T
    s_l = tl.load(dA_cs_ptr + chunk_base + offs_l, mask=mask_l, other=0.0).to(ACC)

    # the state entering the chunk, decayed to step l and read out by C_l
    state_base = states_ptr + ((b * nc + c) * H + h).to(tl.int64) * P * N
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        C_tile = tl.load(
            C_base + offs_l[:, None] * stride_c_l + n[None, :] * stride_c_n,
            mask=mask_l[:, None] & (n[None, :] < N),
            other=0.0,
        ).to(ACC)  # (BLOCK_M, BLOCK_N)
        state_t = tl.load(
            state_base + offs_p[None, :] * N + n[:, None],
            mask=mask_p[None, :] & (n[:, None] < N),
            other=0.0,
        ).to(ACC)  # (BLOCK_N, BLOCK_P)
        acc += tl.dot(C_tile, state_t, input_precision="ieee")
    acc *= tl.exp(s_l)[:, None]

    # steps m <= l of this chunk: decay-weighted C_l . B_m applied to u_m = dt_m x_m
    cb_base = cb_ptr + ((b * nc + c) * (H // heads_per_group) + g).to(tl.int64) * T * T
    hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_len)
    for k0 in range(0, hi, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < chunk_len
        cb = tl.load(
            cb_base + offs_l[:, None] * T + k[None, :],
            mask=mask_l[:, None] & mask_k[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_M, BLOCK_K)
        s_k = tl.load(dA_cs_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
        dt_k = tl.load(dt_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
        causal = (offs_l[:, None] >= k[None, :]) & mask_k[None, :]
        # Selects, not products with the mask: above the diagonal exp may overflow and cb holds
        # unwritten memory.
        decay = tl.exp(tl.where(causal, s_l[:, None] - s_k[None, :], 0.0))
        scores = tl.where(causal, cb * decay * dt_k[None, :], 0.0)
        x_tile = tl.load(
            x_base + k[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
            mask=mask_k[:, None] & mask_p[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_K, BLOCK_P)
        acc += tl.dot(scores, x_tile, input_precision="ieee")

    mask_lp = mask_l[:, None] & mask_p[None, :]
    if HAS_D:
        x_l = tl.load(
            x_base + offs_l[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
            mask=mask_lp,
            other=0.0,
        ).to(ACC)
        D = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=mask_p, other=0.0).to(ACC)
        acc += D[None, :] * x_l
    # y is (batch, L, H, P) contiguous
    out = ((b.to(tl.int64) * L + c * T + offs_l[:, None]) * H + h) * P + offs_p[None, :]
    if HAS_Z:
        if STORE_PRE:
            tl.store(y_pre_ptr + out, acc, mask=mask_lp)
        z_base = z_ptr + b.to(tl.int64) * stride_z_b + (c * T).to(tl.int64) * stride_z_l
        z_ptrs = z_base + h * stride_z_h + offs_l[:, None] * stride_z_l
        z = tl.load(z_ptrs + offs_p[None, :] * stride_z_p, mask=mask_lp, other=0.0).to(ACC)
        acc *= z * tl.sigmoid(z)
    tl.store(y_ptr + out, acc, mask=mask_lp)


def dt_cumsum(
    dt: Tensor, A: Tensor, dt_bias: Tensor | None, softplus: bool, T: int, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """dt (batch, L, H) -> (dt after bias and softplus, within-chunk cumsum of dt * A), both
    (batch, H, nc, T) in `acc`, 0 and flat past the sequence end."""
    batch, L, H = dt.shape
    nc = triton.cdiv(L, T)
    dt_out = empty((batch, H, nc, T), acc, dt.device)
    dA_cs = empty((batch, H, nc, T), acc, dt.device)
    block_h = min(triton.next_power_of_2(H), 16)
    _dt_cumsum_kernel[(batch * nc, triton.cdiv(H, block_h))](
        dt, A, dt_bias, dt_out, dA_cs,
        L, H, T, nc,
        *dt.stride(),
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=softplus,
        BLOCK_T=max(triton.next_power_of_2(T), 16),
        BLOCK_H=block_h,
        ACC=acc_dtype(acc),
    )  # fmt: skip
    return dt_out, dA_cs


def chunk_cb(C: Tensor, B: Tensor, T: int, acc: torch.dtype) -> Tensor:
    """C_l . B_m within each chunk: (batch, nc, G, T, T) in `acc`, defined for m <= l only."""
    batch, L, G, N = B.shape
    nc = triton.cdiv(L, T)
    cb = empty((batch, nc, G, T, T), acc, B.device)

    def grid(meta: dict) -> tuple[int, int, int]:
        tiles = triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(T, meta["BLOCK_K"])
        return batch * nc, G, tiles

    _chunk_cb_kernel[grid](
        C, B, cb,
        L, G, T, N, nc,
        *C.stride(),
        *B.stride(),
        BLOCK_N=feature_block(N),
        ACC=acc_dtype(acc),
    )  # fmt: skip
    return cb


def chunk_state(
    x: Tensor, B: Tensor, dt: Tensor, dA_cs: Tensor, *, from_end: bool, acc: torch.dtype
) -> Tensor:
    """Per chunk, sum_l w_l x_l ⊗ B_l: (batch, nc, H, P, N) in `acc`.

    x: (batch, L, H, P); B: (batch, L, G, N); dt, dA_cs: (batch, H, nc, T).
    w_l = dt_l exp(s_end - s_l) if `from_end` (the chunk's own end state), else exp(s_l).
    """
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc, T = dt.shape[2], dt.shape[3]
    out = empty((batch, nc, H, P, N), acc, x.device)
    block_p, block_n = feature_block(P), feature_block(N)
    grid = (batch * nc, H, triton.cdiv(P, block_p) * triton.cdiv(N, block_n))
    _chunk_state_kernel[grid](
        x, B, dt, dA_cs, out,
        L, H, T, P, N, nc, H // G,
        *x.stride(),
        *B.stride(),
        FROM_END=from_end,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        ACC=acc_dtype(acc),
    )  # fmt: skip
    return out


def state_passing(
    states: Tensor, dA_cs: Tensor, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Turn each chunk's own end state into the state entering it, in place.

    states: (batch, nc, H, P, N); dA_cs: (batch, H, nc, T); initial_state: (batch, H, P, N).
    Returns (states, final state (batch, H, P, N)), in states' dtype.
    """
    batch, nc, H, P, N = states.shape
    final = empty((batch, H, P, N), states.dtype, states.device)
    block_d = min(triton.next_power_of_2(P * N), STATE_BLOCK)
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0, 0)
    _state_passing_kernel[(batch, H, triton.cdiv(P * N, block_d))](
        states, dA_cs, initial_state, final,
        H, dA_cs.shape[3], P, N, nc,
        *init_strides,
        HAS_INIT=initial_state is not None,
        BLOCK_D=block_d,
        ACC=acc_dtype(states.dtype),
    )  # fmt: skip
    return states, final


def chunk_scan(
    x: Tensor,
    C: Tensor,
    cb: Tensor,
    dt: Tensor,
    dA_cs: Tensor,
    states: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    *,
    store_pre: bool,
) -> tuple[Tensor, Tensor | None]:
    """y (batch, L, H, P) in x.dtype and, if `store_pre` and z is given, y before the gate in
    states' dtype (the backward's dz needs it).

    x, z: (batch, L, H, P); C: (batch, L, G, N); cb: (batch, nc, G, T, T); dt, dA_cs:
    (batch, H, nc, T); states: (batch, nc, H, P, N) entering each chunk; D: (H,) or (H, P).
    """
    batch, L, H, P = x.shape
    G, N = C.shape[2], C.shape[3]
    nc, T = dt.shape[2], dt.shape[3]
    y = empty((batch, L, H, P), x.dtype, x.device)
    store_pre = store_pre and z is not None
    y_pre = empty((batch, L, H, P), states.dtype, x.device) if store_pre else None
    block_p = feature_block(P)
    D_strides = (0, 0) if D is None else (D.stride(0), D.stride(1) if D.dim() == 2 else 0)
    z_strides = z.stride() if z is not None else (0, 0, 0, 0)

    def grid(meta: dict) -> tuple[int, int, int]:
        return batch * nc, H, triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(P, block_p)

    _chunk_scan_kernel[grid](
        x, z, C, cb, dt, dA_cs, states, D, y, y_pre,
        L, H, T, P, N, nc, H // G,
        *x.stride(),
        *z_strides,
        *C.stride(),
        *D_strides,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        STORE_PRE=store_pre,
        BLOCK_P=block_p,
        BLOCK_N=feature_block(N),
        ACC=acc_dtype(states.dtype),
    )  # fmt: skip
    return y, y_pre
