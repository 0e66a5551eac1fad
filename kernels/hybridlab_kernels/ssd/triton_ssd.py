"""Mamba-2 SSD as Triton kernels: the chunked algorithm of Mamba-2's GPU implementation.

The sequence splits into chunks of T steps. Within a chunk every interaction is a matmul (the
"attention-like" dual form); across chunks only a (P, N) state per head is carried, sequentially
over L / T chunks. The forward runs five kernels (`triton_ssd_fwd`): dt prologue and cumulative
decays, C B^T per group, each chunk's own end state, state passing, and the chunk scan that writes
y with the D skip and the silu(z) gate. The backward (`triton_ssd_bwd`) recomputes the forward's
intermediates rather than keeping them (only the pre-gate y is saved, when z is given) and mirrors
the stages in reverse. Reductions over a group's heads, over batch and over tiles are per-program
partial sums added in torch: deterministic, no atomics.

Arithmetic is float32 (float64 for float64 inputs) whatever the storage dtype, with IEEE-exact
tl.dot (no TF32): decays multiply over thousands of steps, and bf16 math is wrong under the
interpreter anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import compute_dtype
from .triton_common import on_device
from .triton_ssd_bwd import (
    chunk_scan_bwd_db,
    chunk_scan_bwd_dc,
    chunk_scan_bwd_dda,
    chunk_scan_bwd_dx,
    dt_bwd,
    state_passing_bwd,
)
from .triton_ssd_fwd import chunk_cb, chunk_scan, chunk_state, dt_cumsum, state_passing


def _chunk_layout(t: Tensor, T: int, acc: torch.dtype) -> Tensor:
    """(batch, L, H) -> (batch, H, nc, T) in `acc`, zero past the sequence end (dt_cumsum's)."""
    batch, L, H = t.shape
    t = torch.nn.functional.pad(t.to(acc), (0, 0, 0, -L % T))
    return t.view(batch, -1, T, H).permute(0, 3, 1, 2).contiguous()


def _decay_states(
    x: Tensor, dt: Tensor, log_decay: Tensor, B: Tensor, C: Tensor,
    initial_state: Tensor | None, T: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_incoming_states` for a decay given per step: its within-chunk cumulative sums (in
    float64, like the torch path) take the place of dt_cumsum's dt * A."""
    acc = compute_dtype(x)
    dt_proc = _chunk_layout(dt, T, acc)
    dA_cs = _chunk_layout(log_decay, T, acc).cumsum(-1, dtype=torch.float64).to(acc)
    cb = chunk_cb(C, B, T, acc)
    own = chunk_state(x, B, dt_proc, dA_cs, from_end=True, acc=acc)
    states, final = state_passing(own, dA_cs, initial_state)
    return dt_proc, dA_cs, cb, states, final


def _incoming_states(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    dt_bias: Tensor | None,
    initial_state: Tensor | None,
    softplus: bool,
    T: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Stages 1-4: dt and its cumulative decays (batch, H, nc, T), C B^T (batch, nc, G, T, T),
    the state entering each chunk (batch, nc, H, P, N) and the final state (batch, H, P, N)."""
    acc = compute_dtype(x)
    dt_proc, dA_cs = dt_cumsum(dt, A, dt_bias, softplus, T, acc)
    cb = chunk_cb(C, B, T, acc)
    own = chunk_state(x, B, dt_proc, dA_cs, from_end=True, acc=acc)
    states, final = state_passing(own, dA_cs, initial_state)
    return dt_proc, dA_cs, cb, states, final


class _SSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        dt_bias: Tensor | None,
        initial_state: Tensor | None,
        chunk_size: int,
        dt_softplus: bool,
    ) -> tuple[Tensor, Tensor]:
        T = min(chunk_size, x.shape[1])
        with on_device(x.device):
            dt_proc, dA_cs, cb, states, final = _incoming_states(
                x, dt, A, B, C, dt_bias, initial_state, dt_softplus, T
            )
            # only dz needs y before the gate
            store_pre = ctx.needs_input_grad[6]
            y, y_pre = chunk_scan(x, C, cb, dt_proc, dA_cs, states, D, z, store_pre=store_pre)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, y_pre)
        ctx.T = T
        ctx.dt_softplus = dt_softplus
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy: Tensor | None, dfinal: Tensor | None) -> tuple[Tensor | None, ...]:
        x, dt, A, B, C, D, z, dt_bias, initial_state, y_pre = ctx.saved_tensors
        acc = compute_dtype(x)
        if dy is None:
            dy = torch.zeros(x.shape, dtype=acc, device=x.device)
        with on_device(x.device):
            dt_proc, dA_cs, cb, states, _ = _incoming_states(
                x, dt, A, B, C, dt_bias, initial_state, ctx.dt_softplus, ctx.T
            )
            dz = None
            if z is None:
                gy = dy
            else:
                # y = y_pre * z * sigmoid(z); silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
                dy, zc = dy.to(acc), z.to(acc)
                sig = torch.sigmoid(zc)
                gy = dy * zc * sig
                if y_pre is not None:
                    dz = (dy * y_pre * sig * (1 + zc * (1 - sig))).to(z.dtype)
            dstates = chunk_state(gy, C, dt_proc, dA_cs, from_end=False, acc=acc)
            dS, dinit, dend = state_passing_bwd(dstates, states, dA_cs, dfinal)
            dx, ddt_u, dw, dD = chunk_scan_bwd_dx(x, gy, B, cb, dt_proc, dA_cs, dS, D)
            dC, dinter = chunk_scan_bwd_dc(x, gy, C, B, dt_proc, dA_cs, states)
            dB = chunk_scan_bwd_db(x, gy, C, dt_proc, dA_cs, dS)
            dda = chunk_scan_bwd_dda(x, gy, cb, dt_proc, dA_cs)
            ddt, dA, dbias = dt_bwd(dt, A, dt_bias, ctx.dt_softplus, ddt_u, dda, dinter, dw, dend)
        if D is not None:
            dD = (dD.sum(-1) if D.dim() == 1 else dD).to(D.dtype)
        return (
            dx.to(x.dtype),
            ddt.to(dt.dtype),
            dA.to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD,
            dz,
            dbias.to(dt_bias.dtype) if dt_bias is not None else None,
            dinit.to(initial_state.dtype) if initial_state is not None else None,
            None,
            None,
        )


class _SSDDecayFunction(torch.autograd.Function):
    """h_t = exp(log_decay_t) h_{t-1} + dt_t x_t ⊗ B_t, y_t = h_t · C_t, through the same stage
    kernels; the decay's gradient is summed from the stages' per-step weights in torch, as
    `_dt_bwd_kernel` sums them for dt * A."""

    @staticmethod
    def forward(ctx, x, dt, log_decay, B, C, initial_state, chunk_size):  # type: ignore[override]
        T = min(chunk_size, x.shape[1])
        with on_device(x.device):
            dt_proc, dA_cs, cb, states, final = _decay_states(
                x, dt, log_decay, B, C, initial_state, T
            )
            y, _ = chunk_scan(x, C, cb, dt_proc, dA_cs, states, None, None, store_pre=False)
        ctx.save_for_backward(x, dt, log_decay, B, C, initial_state)
        ctx.T = T
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):  # type: ignore[override]
        x, dt, log_decay, B, C, initial_state = ctx.saved_tensors
        acc = compute_dtype(x)
        batch, L, H = dt.shape
        gy = torch.zeros(x.shape, dtype=acc, device=x.device) if dy is None else dy
        with on_device(x.device):
            dt_proc, dA_cs, cb, states, _ = _decay_states(
                x, dt, log_decay, B, C, initial_state, ctx.T
            )
            dstates = chunk_state(gy, C, dt_proc, dA_cs, from_end=False, acc=acc)
            dS, dinit, dend = state_passing_bwd(dstates, states, dA_cs, dfinal)
            dx, ddt_u, dw, _ = chunk_scan_bwd_dx(x, gy, B, cb, dt_proc, dA_cs, dS, None)
            dC, dinter = chunk_scan_bwd_dc(x, gy, C, B, dt_proc, dA_cs, states)
            dB = chunk_scan_bwd_db(x, gy, C, dt_proc, dA_cs, dS)
            dda = chunk_scan_bwd_dda(x, gy, cb, dt_proc, dA_cs)
        # a_k sits in exp(s_l) for l >= k, in exp(s_end - s_l) for l < k, and in exp(s_end)
        d_log = (dda + dinter.flip(-1).cumsum(-1).flip(-1) + (dw.cumsum(-1) - dw)
                 + dend[..., None])  # (batch, H, nc, T)
        d_log = d_log.permute(0, 2, 3, 1).reshape(batch, -1, H)[:, :L]
        ddt = ddt_u.permute(0, 2, 3, 1).reshape(batch, -1, H)[:, :L]
        return (
            dx.to(x.dtype), ddt.to(dt.dtype), d_log.to(log_decay.dtype), dB.to(B.dtype),
            dC.to(C.dtype), dinit.to(initial_state.dtype) if initial_state is not None else None,
            None,
        )


def ssd_triton_decay(
    x: Tensor,
    dt: Tensor,
    log_decay: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`chunked.ssd_chunked_decay` in Triton: same arguments and results."""
    return _SSDDecayFunction.apply(x, dt, log_decay, B, C, initial_state, chunk_size)


def ssd_triton(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 SSD, chunked, in Triton; same arguments and results as `ssd` (which checks shapes).

    x: (batch, L, H, P); dt: (batch, L, H); A: (H,); B, C: (batch, L, G, N) with H % G == 0;
    D: (H,) or (H, P); z: (batch, L, H, P); dt_bias: (H,); initial_state: (batch, H, P, N).
    Inputs may be strided (e.g. x, B, C sliced from one projection). Chunks hold
    min(chunk_size, L) steps. Returns y (batch, L, H, P) in x.dtype, plus the final state
    (batch, H, P, N) in the compute dtype (float32, or float64 for float64 inputs) if
    `return_final_state`. Differentiable in every tensor argument.
    """
    y, final = _SSDFunction.apply(
        x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size, dt_softplus
    )
    return (y, final) if return_final_state else y
