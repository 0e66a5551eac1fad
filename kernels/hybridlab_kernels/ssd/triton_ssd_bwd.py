"""Backward stages of the chunked SSD as Triton kernels (notation as in `triton_ssd_fwd`).

With gy the gradient of y before the silu(z) gate and h_in the state entering a chunk:

1. `chunk_state(gy, C, from_end=False)`: d h_in through the chunk's own readout,
   sum_l exp(s_l) gy_l ⊗ C_l.
2. `state_passing_bwd`: walks the chunks backwards; gives the gradient of each chunk's own end
   state (dS), of the initial state, and of each chunk's total decay exp(s_end).
3. `chunk_scan_bwd_dx`: the gradient of u_l = dt_l x_l,
   du_l = sum_{m >= l} exp(s_m - s_l) (C_m . B_l) gy_m + exp(s_end - s_l) dS B_l;
   then dx = dt du + D gy, and the per-step sums that dt's gradient needs.
4. `chunk_scan_bwd_dc` / `chunk_scan_bwd_db`: per head, summed over a group's heads in torch.
5. `chunk_scan_bwd_dda`: the within-chunk decays' gradient w.r.t. each a_k = dt_k A.
6. `dt_bwd`: gathers every path into d dt (through bias and softplus), dA and d dt_bias.

The gradient w.r.t. a_k is summed directly over the terms whose exponent contains a_k (for the
within-chunk decay exp(s_l - s_m): l >= k > m) rather than as the difference of two cumulative
sums, which would cancel catastrophically when the diagonal terms dominate.
"""

from __future__ import annotations

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
    row_tiles,
    softplus,
    softplus_grad,
)


@triton.autotune(configs=PLAIN_CONFIGS, key=["HAS_DFINAL", "BLOCK_D"])
@triton.jit
def _state_passing_bwd_kernel(
    dstates_ptr,  # (batch, nc, H, P, N): in, d h_in through each chunk's readout; out, dS
    states_ptr,  # (batch, nc, H, P, N): the state entering each chunk
    dA_cs_ptr,  # (batch, H, nc, T)
    dfinal_ptr,  # (batch, H, P, N)
    dinit_ptr,  # (batch, H, P, N), out
    dend_ptr,  # (n_d_tiles, batch, H, nc), out: partial d loss / d s_end of each chunk
    batch,
    H,
    T,
    P,
    N,
    nc,
    stride_df_b,
    stride_df_h,
    stride_df_p,
    stride_df_n,
    HAS_DFINAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # flat (p, n) index p * N + n
    mask = offs < P * N
    if HAS_DFINAL:
        df_base = dfinal_ptr + b.to(tl.int64) * stride_df_b + h * stride_df_h
        df_ptrs = df_base + (offs // N) * stride_df_p + (offs % N) * stride_df_n
        dstate = tl.load(df_ptrs, mask=mask, other=0.0).to(ACC)
    else:
        dstate = tl.zeros([BLOCK_D], dtype=ACC)
    for i in range(nc):
        c = nc - 1 - i
        chunk_offs = ((b * nc + c) * H + h).to(tl.int64) * P * N + offs
        dscan = tl.load(dstates_ptr + chunk_offs, mask=mask, other=0.0).to(ACC)
        state_in = tl.load(states_ptr + chunk_offs, mask=mask, other=0.0).to(ACC)
        s_end = tl.load(dA_cs_ptr + ((b * H + h) * nc + c).to(tl.int64) * T + T - 1).to(ACC)
        decay = tl.exp(s_end)
        # h_out = decay * h_in + own: own's gradient is d h_out, the decay's <d h_out, h_in>;
        # dS overwrites the readout gradient it no longer needs.
        tl.store(dstates_ptr + chunk_offs, dstate, mask=mask)
        dend = decay * tl.sum(dstate * state_in, axis=0)
        tl.store(dend_ptr + ((pid_d * batch + b) * H + h).to(tl.int64) * nc + c, dend)
        dstate = decay * dstate + dscan
    tl.store(dinit_ptr + (b * H + h).to(tl.int64) * P * N + offs, dstate, mask=mask)


@triton.autotune(configs=TILE_CONFIGS, key=["HAS_D", "BLOCK_P", "BLOCK_N"])
@triton.jit
def _chunk_scan_bwd_dx_kernel(
    x_ptr,  # (batch, L, H, P)
    gy_ptr,  # (batch, L, H, P): gradient of y before the gate
    B_ptr,  # (batch, L, G, N)
    cb_ptr,  # (batch, nc, G, T, T)
    dt_ptr,  # (batch, H, nc, T)
    dA_cs_ptr,  # (batch, H, nc, T)
    dS_ptr,  # (batch, nc, H, P, N): gradient of each chunk's own end state
    D_ptr,  # (H,) or (H, P)
    dx_ptr,  # (batch, L, H, P), out
    ddt_ptr,  # (n_p_tiles, batch, H, nc, T), out: partial sums over p of x_l * du_l
    dw_ptr,  # (n_p_tiles, batch, H, nc, T), out: partial sums over p of u_l * (dS B_l decayed)
    dD_ptr,  # (batch, nc, n_m_tiles, H, P), out: partial sums over l of gy_l * x_l
    batch,
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
    stride_gy_b,
    stride_gy_l,
    stride_gy_h,
    stride_gy_p,
    stride_b_b,
    stride_b_l,
    stride_b_g,
    stride_b_n,
    stride_D_h,
    stride_D_p,
    HAS_D: tl.constexpr,
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
    mask_lp = mask_l[:, None] & mask_p[None, :]

    x_base = x_ptr + b.to(tl.int64) * stride_x_b + (c * T).to(tl.int64) * stride_x_l
    x_base += h * stride_x_h
    gy_base = gy_ptr + b.to(tl.int64) * stride_gy_b + (c * T).to(tl.int64) * stride_gy_l
    gy_base += h * stride_gy_h
    B_base = B_ptr + b.to(tl.int64) * stride_b_b + (c * T).to(tl.int64) * stride_b_l
    B_base += g * stride_b_g
    chunk_base = ((b * H + h) * nc + c).to(tl.int64) * T
    s_l = tl.load(dA_cs_ptr + chunk_base + offs_l, mask=mask_l, other=0.0).to(ACC)
    dt_l = tl.load(dt_ptr + chunk_base + offs_l, mask=mask_l, other=0.0).to(ACC)
    s_end = tl.load(dA_cs_ptr + chunk_base + chunk_len - 1).to(ACC)

    # through the chunk's own end state: exp(s_end - s_l) dS B_l
    dS_base = dS_ptr + ((b * nc + c) * H + h).to(tl.int64) * P * N
    du_state = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        B_tile = tl.load(
            B_base + offs_l[:, None] * stride_b_l + n[None, :] * stride_b_n,
            mask=mask_l[:, None] & (n[None, :] < N),
            other=0.0,
        ).to(ACC)  # (BLOCK_M, BLOCK_N)
        dS_t = tl.load(
            dS_base + offs_p[None, :] * N + n[:, None],
            mask=mask_p[None, :] & (n[:, None] < N),
            other=0.0,
        ).to(ACC)  # (BLOCK_N, BLOCK_P)
        du_state += tl.dot(B_tile, dS_t, input_precision="ieee")
    du_state *= tl.exp(s_end - s_l)[:, None]

    # through the readout of the chunk's steps k >= l: exp(s_k - s_l) (C_k . B_l) gy_k
    cb_base = cb_ptr + ((b * nc + c) * (H // heads_per_group) + g).to(tl.int64) * T * T
    du = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    for k0 in range(pid_m * BLOCK_M, chunk_len, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < chunk_len
        cb_t = tl.load(
            cb_base + k[None, :] * T + offs_l[:, None],
            mask=mask_l[:, None] & mask_k[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_M, BLOCK_K): C_k . B_l
        s_k = tl.load(dA_cs_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
        causal = (k[None, :] >= offs_l[:, None]) & mask_k[None, :]
        # selects, not products with the mask (see the forward's chunk scan)
        decay = tl.exp(tl.where(causal, s_k[None, :] - s_l[:, None], 0.0))
        w = tl.where(causal, cb_t * decay, 0.0)
        gy_tile = tl.load(
            gy_base + k[:, None] * stride_gy_l + offs_p[None, :] * stride_gy_p,
            mask=mask_k[:, None] & mask_p[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_K, BLOCK_P)
        du += tl.dot(w, gy_tile, input_precision="ieee")
    du += du_state

    x_l = tl.load(
        x_base + offs_l[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
        mask=mask_lp,
        other=0.0,
    ).to(ACC)
    dx = du * dt_l[:, None]
    partial = (((pid_p * batch + b) * H + h) * nc + c).to(tl.int64) * T + offs_l
    tl.store(ddt_ptr + partial, tl.sum(x_l * du, axis=1), mask=offs_l < T)
    tl.store(dw_ptr + partial, dt_l * tl.sum(x_l * du_state, axis=1), mask=offs_l < T)
    if HAS_D:
        gy_l = tl.load(
            gy_base + offs_l[:, None] * stride_gy_l + offs_p[None, :] * stride_gy_p,
            mask=mask_lp,
            other=0.0,
        ).to(ACC)
        D = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=mask_p, other=0.0).to(ACC)
        dx += D[None, :] * gy_l
        dD_offs = ((b * nc + c) * tl.cdiv(T, BLOCK_M) + pid_m).to(tl.int64) * H * P
        tl.store(dD_ptr + dD_offs + h * P + offs_p, tl.sum(gy_l * x_l, axis=0), mask=mask_p)
    out = ((b.to(tl.int64) * L + c * T + offs_l[:, None]) * H + h) * P + offs_p[None, :]
    tl.store(dx_ptr + out, dx, mask=mask_lp)


@triton.autotune(configs=TILE_CONFIGS, key=["BLOCK_P", "BLOCK_N"])
@triton.jit
def _chunk_scan_bwd_dc_kernel(
    x_ptr,  # (batch, L, H, P)
    gy_ptr,  # (batch, L, H, P)
    C_ptr,  # (batch, L, G, N)
    B_ptr,  # (batch, L, G, N)
    dt_ptr,  # (batch, H, nc, T)
    dA_cs_ptr,  # (batch, H, nc, T)
    states_ptr,  # (batch, nc, H, P, N): the state entering each chunk
    dC_ptr,  # (batch, L, H, N), out: this head's share of dC
    dinter_ptr,  # (n_n_tiles, batch, H, nc, T), out: partial sums over n of gy_l . y_inter_l
    batch,
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
    stride_gy_b,
    stride_gy_l,
    stride_gy_h,
    stride_gy_p,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    stride_b_b,
    stride_b_l,
    stride_b_g,
    stride_b_n,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dC_l = exp(s_l) h_in^T gy_l + sum_{k <= l} exp(s_l - s_k) dt_k (gy_l . x_k) B_k
    pid_bc = tl.program_id(0)
    h = tl.program_id(1)
    pid_t = tl.program_id(2)
    n_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid_t // n_n_tiles
    pid_n = pid_t % n_n_tiles
    b = pid_bc // nc
    c = pid_bc % nc
    g = h // heads_per_group
    chunk_len = tl.minimum(T, L - c * T)
    offs_l = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    mask_l = offs_l < chunk_len
    mask_n = offs_n < N

    x_base = x_ptr + b.to(tl.int64) * stride_x_b + (c * T).to(tl.int64) * stride_x_l
    x_base += h * stride_x_h
    gy_base = gy_ptr + b.to(tl.int64) * stride_gy_b + (c * T).to(tl.int64) * stride_gy_l
    gy_base += h * stride_gy_h
    C_base = C_ptr + b.to(tl.int64) * stride_c_b + (c * T).to(tl.int64) * stride_c_l
    C_base += g * stride_c_g
    B_base = B_ptr + b.to(tl.int64) * stride_b_b + (c * T).to(tl.int64) * stride_b_l
    B_base += g * stride_b_g
    chunk_base = ((b * H + h) * nc + c).to(tl.int64) * T
    s_l = tl.load(dA_cs_ptr + chunk_base + offs_l, mask=mask_l, other=0.0).to(ACC)

    state_base = states_ptr + ((b * nc + c) * H + h).to(tl.int64) * P * N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + offs_p
        gy_tile = tl.load(
            gy_base + offs_l[:, None] * stride_gy_l + p[None, :] * stride_gy_p,
            mask=mask_l[:, None] & (p[None, :] < P),
            other=0.0,
        ).to(ACC)  # (BLOCK_M, BLOCK_P)
        state_tile = tl.load(
            state_base + p[:, None] * N + offs_n[None, :],
            mask=(p[:, None] < P) & mask_n[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_P, BLOCK_N)
        acc += tl.dot(gy_tile, state_tile, input_precision="ieee")
    acc *= tl.exp(s_l)[:, None]
    C_tile = tl.load(
        C_base + offs_l[:, None] * stride_c_l + offs_n[None, :] * stride_c_n,
        mask=mask_l[:, None] & mask_n[None, :],
        other=0.0,
    ).to(ACC)
    # gy_l . y_inter_l = C_l . (the inter-chunk part of dC_l): exp(s_l)'s weight
    partial = (((pid_n * batch + b) * H + h) * nc + c).to(tl.int64) * T + offs_l
    tl.store(dinter_ptr + partial, tl.sum(C_tile * acc, axis=1), mask=offs_l < T)

    hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_len)
    for k0 in range(0, hi, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < chunk_len
        dcb = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + offs_p
            gy_tile = tl.load(
                gy_base + offs_l[:, None] * stride_gy_l + p[None, :] * stride_gy_p,
                mask=mask_l[:, None] & (p[None, :] < P),
                other=0.0,
            ).to(ACC)  # (BLOCK_M, BLOCK_P)
            xt_tile = tl.load(
                x_base + k[None, :] * stride_x_l + p[:, None] * stride_x_p,
                mask=mask_k[None, :] & (p[:, None] < P),
                other=0.0,
            ).to(ACC)  # (BLOCK_P, BLOCK_K)
            dcb += tl.dot(gy_tile, xt_tile, input_precision="ieee")
        s_k = tl.load(dA_cs_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
        dt_k = tl.load(dt_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
        causal = (offs_l[:, None] >= k[None, :]) & mask_k[None, :]
        decay = tl.exp(tl.where(causal, s_l[:, None] - s_k[None, :], 0.0))
        dcb = tl.where(causal, dcb * decay * dt_k[None, :], 0.0)
        B_tile = tl.load(
            B_base + k[:, None] * stride_b_l + offs_n[None, :] * stride_b_n,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_K, BLOCK_N)
        acc += tl.dot(dcb, B_tile, input_precision="ieee")

    out = ((b.to(tl.int64) * L + c * T + offs_l[:, None]) * H + h) * N + offs_n[None, :]
    tl.store(dC_ptr + out, acc, mask=mask_l[:, None] & mask_n[None, :])


@triton.autotune(configs=TILE_CONFIGS, key=["BLOCK_P", "BLOCK_N"])
@triton.jit
def _chunk_scan_bwd_db_kernel(
    x_ptr,  # (batch, L, H, P)
    gy_ptr,  # (batch, L, H, P)
    C_ptr,  # (batch, L, G, N)
    dt_ptr,  # (batch, H, nc, T)
    dA_cs_ptr,  # (batch, H, nc, T)
    dS_ptr,  # (batch, nc, H, P, N): gradient of each chunk's own end state
    dB_ptr,  # (batch, L, H, N), out: this head's share of dB
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
    stride_gy_b,
    stride_gy_l,
    stride_gy_h,
    stride_gy_p,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dB_m = dt_m exp(s_end - s_m) dS^T x_m + sum_{k >= m} exp(s_k - s_m) dt_m (gy_k . x_m) C_k
    pid_bc = tl.program_id(0)
    h = tl.program_id(1)
    pid_t = tl.program_id(2)
    n_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid_t // n_n_tiles
    pid_n = pid_t % n_n_tiles
    b = pid_bc // nc
    c = pid_bc % nc
    g = h // heads_per_group
    chunk_len = tl.minimum(T, L - c * T)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < chunk_len
    mask_n = offs_n < N

    x_base = x_ptr + b.to(tl.int64) * stride_x_b + (c * T).to(tl.int64) * stride_x_l
    x_base += h * stride_x_h
    gy_base = gy_ptr + b.to(tl.int64) * stride_gy_b + (c * T).to(tl.int64) * stride_gy_l
    gy_base += h * stride_gy_h
    C_base = C_ptr + b.to(tl.int64) * stride_c_b + (c * T).to(tl.int64) * stride_c_l
    C_base += g * stride_c_g
    chunk_base = ((b * H + h) * nc + c).to(tl.int64) * T
    s_m = tl.load(dA_cs_ptr + chunk_base + offs_m, mask=mask_m, other=0.0).to(ACC)
    dt_m = tl.load(dt_ptr + chunk_base + offs_m, mask=mask_m, other=0.0).to(ACC)
    s_end = tl.load(dA_cs_ptr + chunk_base + chunk_len - 1).to(ACC)

    dS_base = dS_ptr + ((b * nc + c) * H + h).to(tl.int64) * P * N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + offs_p
        x_tile = tl.load(
            x_base + offs_m[:, None] * stride_x_l + p[None, :] * stride_x_p,
            mask=mask_m[:, None] & (p[None, :] < P),
            other=0.0,
        ).to(ACC)  # (BLOCK_M, BLOCK_P)
        dS_tile = tl.load(
            dS_base + p[:, None] * N + offs_n[None, :],
            mask=(p[:, None] < P) & mask_n[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_P, BLOCK_N)
        acc += tl.dot(x_tile, dS_tile, input_precision="ieee")
    acc *= (dt_m * tl.exp(s_end - s_m))[:, None]

    for k0 in range(pid_m * BLOCK_M, chunk_len, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < chunk_len
        dcb_t = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + offs_p
            x_tile = tl.load(
                x_base + offs_m[:, None] * stride_x_l + p[None, :] * stride_x_p,
                mask=mask_m[:, None] & (p[None, :] < P),
                other=0.0,
            ).to(ACC)  # (BLOCK_M, BLOCK_P)
            gyt_tile = tl.load(
                gy_base + k[None, :] * stride_gy_l + p[:, None] * stride_gy_p,
                mask=mask_k[None, :] & (p[:, None] < P),
                other=0.0,
            ).to(ACC)  # (BLOCK_P, BLOCK_K)
            dcb_t += tl.dot(x_tile, gyt_tile, input_precision="ieee")
        s_k = tl.load(dA_cs_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
        causal = (k[None, :] >= offs_m[:, None]) & mask_k[None, :]
        decay = tl.exp(tl.where(causal, s_k[None, :] - s_m[:, None], 0.0))
        dcb_t = tl.where(causal, dcb_t * decay * dt_m[:, None], 0.0)
        C_tile = tl.load(
            C_base + k[:, None] * stride_c_l + offs_n[None, :] * stride_c_n,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_K, BLOCK_N)
        acc += tl.dot(dcb_t, C_tile, input_precision="ieee")

    out = ((b.to(tl.int64) * L + c * T + offs_m[:, None]) * H + h) * N + offs_n[None, :]
    tl.store(dB_ptr + out, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=TILE_CONFIGS, key=["BLOCK_P"])
@triton.jit
def _chunk_scan_bwd_dda_kernel(
    x_ptr,  # (batch, L, H, P)
    gy_ptr,  # (batch, L, H, P)
    cb_ptr,  # (batch, nc, G, T, T)
    dt_ptr,  # (batch, H, nc, T)
    dA_cs_ptr,  # (batch, H, nc, T)
    out_ptr,  # (n_m_tiles, batch, H, nc, T), out: this row tile's part of d loss / d a_k
    batch,
    L,
    H,
    T,
    P,
    nc,
    heads_per_group,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_gy_b,
    stride_gy_l,
    stride_gy_h,
    stride_gy_p,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # q[l, m] = gy_l . (the within-chunk term of y_l from step m); exp(s_l - s_m) holds a_k for
    # m < k <= l, so d loss / d a_k = sum_{l >= k} sum_{m < k} q[l, m].
    pid_bc = tl.program_id(0)
    h = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bc // nc
    c = pid_bc % nc
    g = h // heads_per_group
    chunk_len = tl.minimum(T, L - c * T)
    offs_l = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    mask_l = offs_l < chunk_len

    x_base = x_ptr + b.to(tl.int64) * stride_x_b + (c * T).to(tl.int64) * stride_x_l
    x_base += h * stride_x_h
    gy_base = gy_ptr + b.to(tl.int64) * stride_gy_b + (c * T).to(tl.int64) * stride_gy_l
    gy_base += h * stride_gy_h
    chunk_base = ((b * H + h) * nc + c).to(tl.int64) * T
    cb_base = cb_ptr + ((b * nc + c) * (H // heads_per_group) + g).to(tl.int64) * T * T
    out_base = out_ptr + (((pid_m * batch + b) * H + h) * nc + c).to(tl.int64) * T
    s_l = tl.load(dA_cs_ptr + chunk_base + offs_l, mask=mask_l, other=0.0).to(ACC)

    # row_prefix[l] = sum of q[l, m] over the column tiles already done
    row_prefix = tl.zeros([BLOCK_M], dtype=ACC)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_len)
    for k0 in range(0, hi, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < chunk_len
        q = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + offs_p
            gy_tile = tl.load(
                gy_base + offs_l[:, None] * stride_gy_l + p[None, :] * stride_gy_p,
                mask=mask_l[:, None] & (p[None, :] < P),
                other=0.0,
            ).to(ACC)  # (BLOCK_M, BLOCK_P)
            xt_tile = tl.load(
                x_base + k[None, :] * stride_x_l + p[:, None] * stride_x_p,
                mask=mask_k[None, :] & (p[:, None] < P),
                other=0.0,
            ).to(ACC)  # (BLOCK_P, BLOCK_K)
            q += tl.dot(gy_tile, xt_tile, input_precision="ieee")
        cb = tl.load(
            cb_base + offs_l[:, None] * T + k[None, :],
            mask=mask_l[:, None] & mask_k[None, :],
            other=0.0,
        ).to(ACC)
        s_k = tl.load(dA_cs_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
        dt_k = tl.load(dt_ptr + chunk_base + k, mask=mask_k, other=0.0).to(ACC)
        causal = (offs_l[:, None] >= k[None, :]) & mask_k[None, :] & mask_l[:, None]
        decay = tl.exp(tl.where(causal, s_l[:, None] - s_k[None, :], 0.0))
        q = tl.where(causal, q * cb * decay * dt_k[None, :], 0.0)
        # exclusive prefix over m < k within the row, then the rows l >= k
        before_k = row_prefix[:, None] + tl.cumsum(q, axis=1) - q
        dda = tl.sum(tl.where(offs_l[:, None] >= k[None, :], before_k, 0.0), axis=0)
        tl.store(out_base + k, dda, mask=k < T)
        row_prefix += tl.sum(q, axis=1)
    # steps past this row tile's last row get nothing from it
    for k0 in range(tl.cdiv(hi, BLOCK_K) * BLOCK_K, T, BLOCK_K):
        k = k0 + offs_k
        tl.store(out_base + k, tl.zeros([BLOCK_K], dtype=ACC), mask=k < T)


@triton.autotune(configs=PLAIN_CONFIGS, key=["HAS_BIAS", "SOFTPLUS", "BLOCK_T", "BLOCK_H"])
@triton.jit
def _dt_bwd_kernel(
    dt_ptr,  # (batch, L, H): dt as given, before bias and softplus
    A_ptr,  # (H,)
    bias_ptr,  # (H,)
    ddt_u_ptr,  # (batch, H, nc, T): x_l . du_l, the gradient through u_l = dt_l x_l
    dda_ptr,  # (batch, H, nc, T): d loss / d a_k through the within-chunk decays
    dinter_ptr,  # (batch, H, nc, T): weight of exp(s_l) in the readout of the incoming state
    dw_ptr,  # (batch, H, nc, T): weight of exp(s_end - s_l) in the chunk's own end state
    dend_ptr,  # (batch, H, nc): weight of exp(s_end) in the state passing
    ddt_out_ptr,  # (batch, L, H), out
    dA_ptr,  # (batch, nc, H), out: partial sums
    dbias_ptr,  # (batch, nc, H), out: partial sums
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
    v = tl.load(dt_ptrs, mask=valid, other=0.0).to(ACC)  # (BLOCK_T, BLOCK_H)
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(ACC)[None, :]
    dt = v
    if SOFTPLUS:
        dt = softplus(v)
    dt = tl.where(valid, dt, 0.0)
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(ACC)

    offs = ((b * H + offs_h[None, :]).to(tl.int64) * nc + c) * T + offs_t[:, None]
    mask = (offs_t[:, None] < T) & mask_h[None, :]
    ddt_u = tl.load(ddt_u_ptr + offs, mask=mask, other=0.0).to(ACC)
    dda = tl.load(dda_ptr + offs, mask=mask, other=0.0).to(ACC)
    dinter = tl.load(dinter_ptr + offs, mask=mask, other=0.0).to(ACC)
    dw = tl.load(dw_ptr + offs, mask=mask, other=0.0).to(ACC)
    dend = tl.load(dend_ptr + (b * H + offs_h).to(tl.int64) * nc + c, mask=mask_h, other=0.0)
    # a_k sits in exp(s_l) for l >= k, in exp(s_end - s_l) for l < k, and in exp(s_end)
    dda += tl.cumsum(dinter, axis=0, reverse=True) + (tl.cumsum(dw, axis=0) - dw)
    dda = tl.where(valid, dda + dend.to(ACC)[None, :], 0.0)
    tl.store(dA_ptr + (b * nc + c).to(tl.int64) * H + offs_h, tl.sum(dt * dda, axis=0), mask=mask_h)
    ddt = ddt_u + A[None, :] * dda
    if SOFTPLUS:
        ddt *= softplus_grad(v)
    ddt = tl.where(valid, ddt, 0.0)
    if HAS_BIAS:
        dbias_ptrs = dbias_ptr + (b * nc + c).to(tl.int64) * H + offs_h
        tl.store(dbias_ptrs, tl.sum(ddt, axis=0), mask=mask_h)
    out = (b.to(tl.int64) * L + c * T + offs_t[:, None]) * H + offs_h[None, :]
    tl.store(ddt_out_ptr + out, ddt, mask=valid)


def state_passing_bwd(
    dstates: Tensor, states: Tensor, dA_cs: Tensor, dfinal: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of `state_passing`, turning `dstates` into dS in place.

    dstates (batch, nc, H, P, N): gradient of each chunk's incoming state through its readout;
    states: the incoming states; dA_cs: (batch, H, nc, T); dfinal: (batch, H, P, N).
    Returns dS (= dstates), d initial_state (batch, H, P, N) and d s_end (batch, H, nc).
    """
    batch, nc, H, P, N = dstates.shape
    block_d = min(triton.next_power_of_2(P * N), STATE_BLOCK)
    n_d_tiles = triton.cdiv(P * N, block_d)
    dinit = empty((batch, H, P, N), dstates.dtype, dstates.device)
    dend = empty((n_d_tiles, batch, H, nc), dstates.dtype, dstates.device)
    df_strides = dfinal.stride() if dfinal is not None else (0, 0, 0, 0)
    _state_passing_bwd_kernel[(batch, H, n_d_tiles)](
        dstates, states, dA_cs, dfinal, dinit, dend,
        batch, H, dA_cs.shape[3], P, N, nc,
        *df_strides,
        HAS_DFINAL=dfinal is not None,
        BLOCK_D=block_d,
        ACC=acc_dtype(dstates.dtype),
    )  # fmt: skip
    return dstates, dinit, dend.sum(0)


def chunk_scan_bwd_dx(
    x: Tensor,
    gy: Tensor,
    B: Tensor,
    cb: Tensor,
    dt: Tensor,
    dA_cs: Tensor,
    dS: Tensor,
    D: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dx (batch, L, H, P) in the compute dtype, and per step (batch, H, nc, T) the sums over p of
    x_l * du_l and of u_l * (the part of du_l through the chunk's own end state); dD (H, P).

    x, gy: (batch, L, H, P); B: (batch, L, G, N); cb: (batch, nc, G, T, T); dt, dA_cs:
    (batch, H, nc, T); dS: (batch, nc, H, P, N); D: (H,) or (H, P).
    """
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc, T = dt.shape[2], dt.shape[3]
    acc, device = dt.dtype, x.device
    block_p = feature_block(P)
    n_p_tiles = triton.cdiv(P, block_p)
    dx = empty((batch, L, H, P), acc, device)
    ddt = empty((n_p_tiles, batch, H, nc, T), acc, device)
    dw = empty((n_p_tiles, batch, H, nc, T), acc, device)
    dD = empty((batch, nc, row_tiles(T), H, P), acc, device) if D is not None else None
    D_strides = (0, 0) if D is None else (D.stride(0), D.stride(1) if D.dim() == 2 else 0)

    def grid(meta: dict) -> tuple[int, int, int]:
        return batch * nc, H, triton.cdiv(T, meta["BLOCK_M"]) * n_p_tiles

    _chunk_scan_bwd_dx_kernel[grid](
        x, gy, B, cb, dt, dA_cs, dS, D, dx, ddt, dw, dD,
        batch, L, H, T, P, N, nc, H // G,
        *x.stride(),
        *gy.stride(),
        *B.stride(),
        *D_strides,
        HAS_D=D is not None,
        BLOCK_P=block_p,
        BLOCK_N=feature_block(N),
        ACC=acc_dtype(acc),
    )  # fmt: skip
    return dx, ddt.sum(0), dw.sum(0), dD.sum((0, 1, 2)) if dD is not None else None


def chunk_scan_bwd_dc(
    x: Tensor,
    gy: Tensor,
    C: Tensor,
    B: Tensor,
    dt: Tensor,
    dA_cs: Tensor,
    states: Tensor,
) -> tuple[Tensor, Tensor]:
    """dC (batch, L, G, N) and, per step (batch, H, nc, T), gy_l . (the readout of the incoming
    state at l), in the compute dtype. Shapes as in `chunk_scan_bwd_dx`; states are incoming."""
    batch, L, H, P = x.shape
    G, N = C.shape[2], C.shape[3]
    nc, T = dt.shape[2], dt.shape[3]
    acc, device = dt.dtype, x.device
    block_n = feature_block(N)
    n_n_tiles = triton.cdiv(N, block_n)
    dC = empty((batch, L, H, N), acc, device)
    dinter = empty((n_n_tiles, batch, H, nc, T), acc, device)

    def grid(meta: dict) -> tuple[int, int, int]:
        return batch * nc, H, triton.cdiv(T, meta["BLOCK_M"]) * n_n_tiles

    _chunk_scan_bwd_dc_kernel[grid](
        x, gy, C, B, dt, dA_cs, states, dC, dinter,
        batch, L, H, T, P, N, nc, H // G,
        *x.stride(),
        *gy.stride(),
        *C.stride(),
        *B.stride(),
        BLOCK_P=feature_block(P),
        BLOCK_N=block_n,
        ACC=acc_dtype(acc),
    )  # fmt: skip
    return dC.view(batch, L, G, H // G, N).sum(3), dinter.sum(0)


def chunk_scan_bwd_db(
    x: Tensor, gy: Tensor, C: Tensor, dt: Tensor, dA_cs: Tensor, dS: Tensor
) -> Tensor:
    """dB (batch, L, G, N) in the compute dtype. Shapes as in `chunk_scan_bwd_dx`."""
    batch, L, H, P = x.shape
    G, N = C.shape[2], C.shape[3]
    nc, T = dt.shape[2], dt.shape[3]
    block_n = feature_block(N)
    dB = empty((batch, L, H, N), dt.dtype, x.device)

    def grid(meta: dict) -> tuple[int, int, int]:
        return batch * nc, H, triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, block_n)

    _chunk_scan_bwd_db_kernel[grid](
        x, gy, C, dt, dA_cs, dS, dB,
        L, H, T, P, N, nc, H // G,
        *x.stride(),
        *gy.stride(),
        *C.stride(),
        BLOCK_P=feature_block(P),
        BLOCK_N=block_n,
        ACC=acc_dtype(dt.dtype),
    )  # fmt: skip
    return dB.view(batch, L, G, H // G, N).sum(3)


def chunk_scan_bwd_dda(x: Tensor, gy: Tensor, cb: Tensor, dt: Tensor, dA_cs: Tensor) -> Tensor:
    """d loss / d a_k through the within-chunk decays: (batch, H, nc, T) in the compute dtype."""
    batch, L, H, P = x.shape
    G = cb.shape[2]
    nc, T = dt.shape[2], dt.shape[3]
    n_m_tiles = row_tiles(T)
    dda = empty((n_m_tiles, batch, H, nc, T), dt.dtype, x.device)
    _chunk_scan_bwd_dda_kernel[(batch * nc, H, n_m_tiles)](
        x, gy, cb, dt, dA_cs, dda,
        batch, L, H, T, P, nc, H // G,
        *x.stride(),
        *gy.stride(),
        BLOCK_P=feature_block(P),
        ACC=acc_dtype(dt.dtype),
    )  # fmt: skip
    return dda.sum(0)


def dt_bwd(
    dt: Tensor,
    A: Tensor,
    dt_bias: Tensor | None,
    softplus: bool,
    ddt_u: Tensor,
    dda: Tensor,
    dinter: Tensor,
    dw: Tensor,
    dend: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """d dt (batch, L, H), dA (H,) and d dt_bias (H,) in the compute dtype, from the per-step
    weights (batch, H, nc, T) and the chunk decays' weights dend (batch, H, nc)."""
    batch, L, H = dt.shape
    nc, T = ddt_u.shape[2], ddt_u.shape[3]
    acc, device = ddt_u.dtype, dt.device
    ddt = empty((batch, L, H), acc, device)
    dA = empty((batch, nc, H), acc, device)
    dbias = empty((batch, nc, H), acc, device) if dt_bias is not None else None
    block_h = min(triton.next_power_of_2(H), 16)
    _dt_bwd_kernel[(batch * nc, triton.cdiv(H, block_h))](
        dt, A, dt_bias, ddt_u, dda, dinter, dw, dend, ddt, dA, dbias,
        L, H, T, nc,
        *dt.stride(),
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=softplus,
        BLOCK_T=max(triton.next_power_of_2(T), 16),
        BLOCK_H=block_h,
        ACC=acc_dtype(acc),
    )  # fmt: skip
    return ddt, dA.sum((0, 1)), dbias.sum((0, 1)) if dbias is not None else None
