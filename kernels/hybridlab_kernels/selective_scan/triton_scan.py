"""Mamba-1 selective scan and its decoding step as Triton kernels.

One program owns (one batch row, a block of BLOCK_D channels of one B/C group) and walks the
sequence step by step with the (BLOCK_D, N) state in registers. Everything but the final sums over
programs happens in-kernel: the dt prologue (bias, softplus), the D skip, the silu(z) gate and, in
the backward, their gradients. The forward stores the state entering every CHUNK-th step; the
backward walks chunks in reverse, recomputes a chunk's states from its checkpoint into a
per-program scratch buffer, then runs the adjoint recurrence over it. Grads that reduce over the
batch or over channels (A, B, C, D, delta_bias) come out as per-program partials summed in torch:
deterministic, no atomics.

Arithmetic runs in the compute dtype (float32, float64 for float64 inputs) whatever the storage
dtype: decays multiply over thousands of steps, and bf16 math is wrong under the interpreter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import compute_dtype

# The backward rereads a chunk's recomputed states from scratch every step, so the scratch
# (CHUNK * BLOCK_D * BLOCK_N values per program, 32 KiB at 16) should stay in cache; the
# checkpoints then cost batch * dim * N * L / 16 values, at N = 16 one float32 copy of u.
CHUNK_SIZE = 16

# Tests switch this on: every buffer a kernel must fill starts as NaN, so unwritten memory shows.
DEBUG_POISON = False

# Register budget for one state tile: BLOCK_D * BLOCK_N fp32 values over 4 warps.
_TILE_ELEMENTS = 512
_MAX_BLOCK_D = 32

# One config, so nothing is benchmarked: the interpreter would run every candidate, and a
# benchmark would rerun the in-place state update. Only launch parameters belong here; the
# partial-gradient buffers are sized from BLOCK_D before the launch.
_CONFIGS = [triton.Config({}, num_warps=4)]


@triton.jit
def _softplus(x):
    # log1p(exp(x)) with torch's threshold of 20. tl has no log1p, and log(1 + w) drops most of
    # w's bits at dt ~ 1e-3, so use Goldberg's log1p(w) = log(1 + w) * w / ((1 + w) - 1).
    w = tl.exp(tl.minimum(x, 20.0))
    v = 1.0 + w
    log1p = tl.where(v == 1.0, w, tl.log(v) * (w / tl.where(v == 1.0, 1.0, v - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.autotune(configs=_CONFIGS, key=["BLOCK_D", "BLOCK_N"])
@triton.jit
def _scan_fwd_kernel(
    u_ptr,  # (batch, dim, L)
    delta_ptr,  # (batch, dim, L)
    A_ptr,  # (dim, N)
    B_ptr,  # (batch, G, N, L)
    C_ptr,  # (batch, G, N, L)
    D_ptr,  # (dim,)
    z_ptr,  # (batch, dim, L)
    bias_ptr,  # (dim,)
    h0_ptr,  # (batch, dim, N)
    y_ptr,  # (batch, dim, L), out
    states_ptr,  # (batch, n_chunks, dim, N), out: the state entering each chunk
    final_ptr,  # (batch, dim, N), out
    dim,
    L,
    N,
    G,
    dim_per_group,
    blocks_per_group,
    n_chunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    STORE_STATES: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_blk = tl.program_id(1)
    group = pid_blk // blocks_per_group
    offs_in_group = (pid_blk % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]

    row_l = (pid_b * dim + offs_d) * L  # (BLOCK_D,) row starts in the (batch, dim, L) tensors
    row_bc = ((pid_b * G + group) * N + offs_n) * L  # (BLOCK_N,) row starts in B and C
    tile_dn = offs_d[:, None] * N + offs_n[None, :]  # (BLOCK_D, BLOCK_N) offsets in a (dim, N)

    # Padded rows and columns load zeros: their decay is 1 and their input 0, so they stay 0.
    A = tl.load(A_ptr + tile_dn, mask=mask_dn, other=0.0).to(ACC)
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * dim * N + tile_dn, mask=mask_dn, other=0.0).to(ACC)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)

    for c in range(n_chunks):
        if STORE_STATES:
            tl.store(states_ptr + (pid_b * n_chunks + c) * dim * N + tile_dn, h, mask=mask_dn)
        t0 = c * CHUNK
        for t in range(t0, tl.minimum(t0 + CHUNK, L)):
            u_t = tl.load(u_ptr + row_l + t, mask=mask_d, other=0.0).to(ACC)
            dt = tl.load(delta_ptr + row_l + t, mask=mask_d, other=0.0).to(ACC)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            B_t = tl.load(B_ptr + row_bc + t, mask=mask_n, other=0.0).to(ACC)
            C_t = tl.load(C_ptr + row_bc + t, mask=mask_n, other=0.0).to(ACC)
            h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * B_t[None, :]
            y_t = tl.sum(h * C_t[None, :], axis=1)
            if HAS_D:
                y_t += D * u_t
            if HAS_Z:
                z_t = tl.load(z_ptr + row_l + t, mask=mask_d, other=0.0).to(ACC)
                y_t *= z_t * tl.sigmoid(z_t)
            tl.store(y_ptr + row_l + t, y_t.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(final_ptr + pid_b * dim * N + tile_dn, h, mask=mask_dn)


@triton.autotune(configs=_CONFIGS, key=["BLOCK_D", "BLOCK_N"])
@triton.jit
def _scan_bwd_kernel(
    u_ptr,  # (batch, dim, L)
    delta_ptr,  # (batch, dim, L)
    A_ptr,  # (dim, N)
    B_ptr,  # (batch, G, N, L)
    C_ptr,  # (batch, G, N, L)
    D_ptr,  # (dim,)
    z_ptr,  # (batch, dim, L)
    bias_ptr,  # (dim,)
    states_ptr,  # (batch, n_chunks, dim, N): the state entering each chunk
    dy_ptr,  # (batch, dim, L)
    dfinal_ptr,  # (batch, dim, N)
    du_ptr,  # (batch, dim, L), out
    ddelta_ptr,  # (batch, dim, L), out: grad of delta (+ bias), before softplus
    dz_ptr,  # (batch, dim, L), out
    dA_ptr,  # (batch, dim, N), out: summed over time, not yet over batch
    dB_ptr,  # (batch, G * blocks_per_group, L, N), out: summed over this program's channels
    dC_ptr,  # (batch, G * blocks_per_group, L, N), out: likewise
    dD_ptr,  # (batch, dim), out: summed over time
    dh0_ptr,  # (batch, dim, N), out
    scratch_ptr,  # (batch, G * blocks_per_group, CHUNK, BLOCK_D, BLOCK_N): one chunk's states
    dim,
    L,
    N,
    G,
    dim_per_group,
    blocks_per_group,
    n_chunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_blk = tl.program_id(1)
    group = pid_blk // blocks_per_group
    offs_in_group = (pid_blk % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]

    row_l = (pid_b * dim + offs_d) * L
    row_bc = ((pid_b * G + group) * N + offs_n) * L
    tile_dn = offs_d[:, None] * N + offs_n[None, :]
    program = pid_b * G * blocks_per_group + pid_blk
    partial_ln = program * L * N + offs_n  # (BLOCK_N,) + t * N: this program's dB/dC row at t
    scratch = (
        scratch_ptr
        + program * CHUNK * BLOCK_D * BLOCK_N
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N
        + offs_n[None, :]
    )

    A = tl.load(A_ptr + tile_dn, mask=mask_dn, other=0.0).to(ACC)
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    # carry = exp(dt_{t+1} A) * g_{t+1}: what the future sends back into h_t
    carry = tl.load(dfinal_ptr + pid_b * dim * N + tile_dn, mask=mask_dn, other=0.0).to(ACC)

    for c_rev in range(n_chunks):
        c = n_chunks - 1 - c_rev
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, L)
        h = tl.load(
            states_ptr + (pid_b * n_chunks + c) * dim * N + tile_dn, mask=mask_dn, other=0.0
        )
        # Slot k holds h_{t0+k-1}, the state entering step t0 + k.
        for t in range(t0, t1):
            tl.store(scratch + (t - t0) * BLOCK_D * BLOCK_N, h)
            u_t = tl.load(u_ptr + row_l + t, mask=mask_d, other=0.0).to(ACC)
            dt = tl.load(delta_ptr + row_l + t, mask=mask_d, other=0.0).to(ACC)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            B_t = tl.load(B_ptr + row_bc + t, mask=mask_n, other=0.0).to(ACC)
            h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * B_t[None, :]
        tl.debug_barrier()

        for k in range(t1 - t0):
            t = t1 - 1 - k
            h_prev = tl.load(scratch + (t - t0) * BLOCK_D * BLOCK_N)
            u_t = tl.load(u_ptr + row_l + t, mask=mask_d, other=0.0).to(ACC)
            dt_raw = tl.load(delta_ptr + row_l + t, mask=mask_d, other=0.0).to(ACC)
            if HAS_BIAS:
                dt_raw += bias
            dt = _softplus(dt_raw) if SOFTPLUS else dt_raw
            B_t = tl.load(B_ptr + row_bc + t, mask=mask_n, other=0.0).to(ACC)
            C_t = tl.load(C_ptr + row_bc + t, mask=mask_n, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + row_l + t, mask=mask_d, other=0.0).to(ACC)
            decay = tl.exp(dt[:, None] * A)
            h = decay * h_prev + (dt * u_t)[:, None] * B_t[None, :]
            if HAS_Z:
                # dy arrives for y * silu(z); turn it into the grad of y before the gate
                z_t = tl.load(z_ptr + row_l + t, mask=mask_d, other=0.0).to(ACC)
                sig = tl.sigmoid(z_t)
                y_t = tl.sum(h * C_t[None, :], axis=1)
                if HAS_D:
                    y_t += D * u_t
                dz = dy * y_t * sig * (1.0 + z_t * (1.0 - sig))
                tl.store(dz_ptr + row_l + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dy * z_t * sig
            # g_t = dL/dh_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}
            g = carry + dy[:, None] * C_t[None, :]
            tl.store(dC_ptr + partial_ln + t * N, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
            tl.store(
                dB_ptr + partial_ln + t * N, tl.sum(g * (dt * u_t)[:, None], axis=0), mask=mask_n
            )
            gB = tl.sum(g * B_t[None, :], axis=1)  # (BLOCK_D,)
            g_decay_h = g * decay * h_prev  # dL/d(dt_t A) through the decay
            ddt = u_t * gB + tl.sum(g_decay_h * A, axis=1)
            dA_acc += g_decay_h * dt[:, None]
            du = dt * gB
            if HAS_D:
                du += D * dy
                dD_acc += dy * u_t
            if SOFTPLUS:
                ddt *= tl.sigmoid(dt_raw)
            tl.store(du_ptr + row_l + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_ptr + row_l + t, ddt, mask=mask_d)
            carry = decay * g
        # the next chunk's recompute overwrites the slots just read
        tl.debug_barrier()

    tl.store(dh0_ptr + pid_b * dim * N + tile_dn, carry, mask=mask_dn)
    tl.store(dA_ptr + pid_b * dim * N + tile_dn, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)


@triton.autotune(configs=_CONFIGS, key=["BLOCK_D", "BLOCK_N"])
@triton.jit
def _state_update_kernel(
    state_ptr,  # (batch, dim, N), updated in place
    x_ptr,  # (batch, dim)
    dt_ptr,  # (batch, dim)
    A_ptr,  # (dim, N)
    B_ptr,  # (batch, G, N)
    C_ptr,  # (batch, G, N)
    D_ptr,  # (dim,)
    z_ptr,  # (batch, dim)
    bias_ptr,  # (dim,)
    y_ptr,  # (batch, dim), out
    dim,
    N,
    G,
    dim_per_group,
    blocks_per_group,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_blk = tl.program_id(1)
    group = pid_blk // blocks_per_group
    offs_in_group = (pid_blk % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    tile_dn = offs_d[:, None] * N + offs_n[None, :]
    row = pid_b * dim + offs_d
    row_bc = (pid_b * G + group) * N + offs_n

    state_ptrs = state_ptr + pid_b * dim * N + tile_dn
    h = tl.load(state_ptrs, mask=mask_dn, other=0.0).to(ACC)
    A = tl.load(A_ptr + tile_dn, mask=mask_dn, other=0.0).to(ACC)
    x = tl.load(x_ptr + row, mask=mask_d, other=0.0).to(ACC)
    dt = tl.load(dt_ptr + row, mask=mask_d, other=0.0).to(ACC)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if SOFTPLUS:
        dt = _softplus(dt)
    B = tl.load(B_ptr + row_bc, mask=mask_n, other=0.0).to(ACC)
    C = tl.load(C_ptr + row_bc, mask=mask_n, other=0.0).to(ACC)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(h * C[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC) * x
    if HAS_Z:
        z = tl.load(z_ptr + row, mask=mask_d, other=0.0).to(ACC)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if DEBUG_POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(dim_per_group: int, N: int) -> tuple[int, int]:
    """BLOCK_D, BLOCK_N: N padded to a power of two; channels capped so the tile fits registers.

    A block never straddles two groups (the grid runs per group), so BLOCK_D also stops at the
    group's size rounded up to a power of two.
    """
    block_n = triton.next_power_of_2(N)
    block_d = max(1, min(_MAX_BLOCK_D, _TILE_ELEMENTS // block_n))
    return min(block_d, triton.next_power_of_2(dim_per_group)), block_n


@contextlib.contextmanager
def _on(device: torch.device) -> Iterator[None]:
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    softplus: bool,
    chunk_size: int,
    store_states: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Contiguous u, delta, z: (batch, dim, L); B, C: (batch, G, N, L). Returns y (batch, dim, L),
    the final state (batch, dim, N) and, if `store_states`, the states entering each chunk
    (batch, ceil(L / chunk_size), dim, N)."""
    batch, dim, L = u.shape
    G, N = B.shape[1], B.shape[2]
    dim_per_group = dim // G
    block_d, block_n = _blocks(dim_per_group, N)
    blocks_per_group = triton.cdiv(dim_per_group, block_d)
    n_chunks = triton.cdiv(L, chunk_size)
    acc = compute_dtype(u)
    y = _empty((batch, dim, L), u.dtype, u.device)
    final = _empty((batch, dim, N), acc, u.device)
    states = _empty((batch, n_chunks, dim, N), acc, u.device) if store_states else None
    with _on(u.device):
        _scan_fwd_kernel[(batch, G * blocks_per_group)](
            u, delta, A, B, C, D, z, delta_bias, initial_state, y, states, final,
            dim, L, N, G, dim_per_group, blocks_per_group, n_chunks,
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            HAS_H0=initial_state is not None,
            SOFTPLUS=softplus,
            STORE_STATES=store_states,
            CHUNK=chunk_size,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            ACC=_acc(acc),
        )  # fmt: skip
    return y, final, states


def _scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    states: Tensor,
    dy: Tensor,
    dfinal: Tensor,
    softplus: bool,
    chunk_size: int,
) -> tuple[Tensor, ...]:
    """Grads of the scan for the `_scan_fwd` layouts, each in the compute dtype except du and dz
    (their input's dtype): du, ddelta (batch, dim, L); dA (dim, N); dB, dC (batch, G, N, L);
    dD (dim,) or None; dz (batch, dim, L) or None; d initial_state (batch, dim, N)."""
    batch, dim, L = u.shape
    G, N = B.shape[1], B.shape[2]
    dim_per_group = dim // G
    block_d, block_n = _blocks(dim_per_group, N)
    blocks_per_group = triton.cdiv(dim_per_group, block_d)
    programs = G * blocks_per_group
    acc = compute_dtype(u)
    device = u.device
    du = _empty((batch, dim, L), u.dtype, device)
    # compute dtype: delta_bias's grad is its sum over batch and time
    ddelta = _empty((batch, dim, L), acc, device)
    dz = _empty((batch, dim, L), z.dtype, device) if z is not None else None
    dA = _empty((batch, dim, N), acc, device)
    dB = _empty((batch, programs, L, N), acc, device)
    dC = _empty((batch, programs, L, N), acc, device)
    dD = _empty((batch, dim), acc, device) if D is not None else None
    dh0 = _empty((batch, dim, N), acc, device)
    scratch = _empty((batch, programs, chunk_size, block_d, block_n), acc, device)
    with _on(device):
        _scan_bwd_kernel[(batch, programs)](
            u, delta, A, B, C, D, z, delta_bias, states, dy, dfinal,
            du, ddelta, dz, dA, dB, dC, dD, dh0, scratch,
            dim, L, N, G, dim_per_group, blocks_per_group, states.shape[1],
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus,
            CHUNK=chunk_size,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            ACC=_acc(acc),
        )  # fmt: skip

    def per_group(partial: Tensor) -> Tensor:  # (batch, programs, L, N) -> (batch, G, N, L)
        return partial.view(batch, G, blocks_per_group, L, N).sum(2).transpose(-1, -2)

    dD = dD.sum(0) if dD is not None else None
    return du, ddelta, dA.sum(0), per_group(dB), per_group(dC), dD, dz, dh0


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        initial_state: Tensor | None,
        softplus: bool,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        store_states = any(ctx.needs_input_grad)
        y, final, states = _scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, chunk_size, store_states
        )
        # initial_state is not saved: the first checkpoint is a copy of it
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus, ctx.chunk_size = softplus, chunk_size
        ctx.has_initial_state = initial_state is not None
        return y, final

    @staticmethod
    def backward(ctx, dy: Tensor, dfinal: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dh0 = _scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, states,
            dy.contiguous(), dfinal.contiguous(), ctx.softplus, ctx.chunk_size,
        )  # fmt: skip
        return (
            du,
            ddelta.to(delta.dtype),
            dA.to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD.to(D.dtype) if D is not None else None,
            dz,
            ddelta.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None,
            dh0 if ctx.has_initial_state else None,
            None,
            None,
        )


def selective_scan_triton(
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
    chunk_size: int = CHUNK_SIZE,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan in Triton; same arguments and results as `selective_scan`.

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D: (dim,); z: (batch, dim, L); delta_bias: (dim,); initial_state: (batch, dim, N).
    Returns y (batch, dim, L) in u.dtype, plus the final state (batch, dim, N) in the compute
    dtype (float32, or float64 for float64 inputs) if `return_final_state`. The backward keeps
    the state entering every `chunk_size`-th step, batch * dim * N * L / chunk_size values.
    """
    grouped_B, grouped_C = (t if t.dim() == 4 else t.unsqueeze(1) for t in (B, C))
    y, final = _SelectiveScanFn.apply(
        u.contiguous(),
        delta.contiguous(),
        A.contiguous(),
        grouped_B.contiguous(),
        grouped_C.contiguous(),
        D.contiguous() if D is not None else None,
        z.contiguous() if z is not None else None,
        delta_bias.contiguous() if delta_bias is not None else None,
        initial_state.contiguous() if initial_state is not None else None,
        delta_softplus,
        chunk_size,
    )
    return (y, final) if return_final_state else y


class _StateUpdateFn(torch.autograd.Function):
    """The kernel forward, on a copy of the state; the backward replays the torch step.

    A decoding step is tiny, so its backward (rare: decoding with grad on) recomputes through
    autograd on the torch path rather than carrying a second kernel.
    """

    @staticmethod
    def forward(
        ctx,
        state: Tensor,
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        dt_bias: Tensor | None,
        softplus: bool,
    ) -> tuple[Tensor, Tensor]:
        new = state.clone(memory_format=torch.contiguous_format)
        y = _state_update(new, x, dt, A, B, C, D, z, dt_bias, softplus)
        ctx.save_for_backward(state, x, dt, A, B, C, D, z, dt_bias)
        ctx.softplus = softplus
        return y, new

    @staticmethod
    def backward(ctx, dy: Tensor, dnew: Tensor) -> tuple[Tensor | None, ...]:
        from .step import selective_state_update

        inputs = [t.detach().requires_grad_() if t is not None else None for t in ctx.saved_tensors]
        state, x, dt, A, B, C, D, z, dt_bias = inputs
        with torch.enable_grad():
            new = state.clone()
            y = selective_state_update(
                new, x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=ctx.softplus,
                backend="torch",
            )  # fmt: skip
        present = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad((y, new), present, (dy, dnew)))
        return (*(next(grads) if t is not None else None for t in inputs), None)


def _state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    softplus: bool,
) -> Tensor:
    """Launch the step kernel on a contiguous `state` (batch, dim, N), updated in place;
    B, C: (batch, G, N). Returns y (batch, dim) in x.dtype."""
    batch, dim, N = state.shape
    G = B.shape[1]
    dim_per_group = dim // G
    block_d, block_n = _blocks(dim_per_group, N)
    blocks_per_group = triton.cdiv(dim_per_group, block_d)
    y = _empty((batch, dim), x.dtype, x.device)
    with _on(x.device):
        _state_update_kernel[(batch, G * blocks_per_group)](
            state, x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            D.contiguous() if D is not None else None,
            z.contiguous() if z is not None else None,
            dt_bias.contiguous() if dt_bias is not None else None,
            y, dim, N, G, dim_per_group, blocks_per_group,
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=dt_bias is not None,
            SOFTPLUS=softplus,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            ACC=_acc(compute_dtype(x)),
        )  # fmt: skip
    return y


def selective_state_update_triton(
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
    """One decoding step in Triton; same arguments and results as `selective_state_update`.

    state: (batch, dim, N), updated in place; x, dt: (batch, dim); A: (dim, N);
    B, C: (batch, N) or (batch, G, N); D: (dim,); z: (batch, dim); dt_bias: (dim,).
    Returns y (batch, dim) in x.dtype.
    """
    B, C = (t if t.dim() == 3 else t.unsqueeze(1) for t in (B, C))
    tensors = (state, x, dt, A, B, C, D, z, dt_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        # As on the torch path: step from a copy of the state, then copy the result back, so
        # autograd sees the in-place update and no value it saved is overwritten.
        old = state.to(compute_dtype(x), copy=True)
        y, new = _StateUpdateFn.apply(old, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        state.copy_(new)
        return y
    work = state if state.is_contiguous() else state.contiguous()
    y = _state_update(work, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if work is not state:
        state.copy_(work)
    return y
