"""Blocked Mamba-1 selective scan in plain PyTorch, with a hand-written backward.

Mamba-1's decay exp(dt * A) differs per (channel, state) pair, so there is no matmul form: the
cost is memory traffic over (batch, dim, N, L)-sized tensors, N times the size of the inputs.
This path never materialises one of those. It walks time in blocks of T steps whose
(T, batch, G, N, R) working tensors stay in cache; per block it computes the decays and the
inputs dt * u * B, the states (one in-place multiply-add per step over (batch, dim, N)), reads y
out by C with one batched mat-vec, applies D and the gate, and keeps only the state entering the
block as a checkpoint.

The backward runs the same blocks in reverse. Each block recomputes its states from its
checkpoint, then runs the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} (a_t = exp(dt_t A),
carried across blocks as a_{t+1} g_{t+1}) and reduces g, the states and
q_t = g_t a_t h_{t-1} = d loss / d(dt_t A) into the input gradients. Memory is O(batch dim L) plus
one (batch, dim, N) checkpoint per block; every exponent is dt * A <= 0.

Layout: time-major, so that a block is one contiguous slice, with the state index N before the
R = dim / G channels of a group, so that y_t = C_t . h_t and d(dt u)_t = B_t . g_t are
row-vector x matrix products, which batched BLAS does fast, unlike the matrix x column-vector
form of a (..., R, N) layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._common import compute_dtype, no_autocast

# Time steps per block. A block holds T * batch * dim * N elements per working tensor (2 MiB at
# T = 32, batch 4, dim 256, N 16, float32). Fwd + bwd at L = 1024 on a 2-core CPU (best of 11):
# T = 8, 16, 32, 64 took 72, 64, 53, 54 ms with 2 threads and 84, 74, 72, 89 ms with 1; fewer,
# larger blocks also mean fewer parallel regions to wait on when other processes share the cores.
CHUNK_SIZE = 32


def selective_scan_chunked(
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
    """Mamba-1 selective scan, blocked; same arguments and results as `selective_scan`.

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D: (dim,); z: (batch, dim, L); delta_bias: (dim,); initial_state: (batch, dim, N).
    `chunk_size` is the number of time steps per block (speed only, not results).
    Returns y (batch, dim, L) in u.dtype, plus the final state (batch, dim, N) in the compute
    dtype (float32, or float64 for float64 inputs) if `return_final_state`.
    """
    if chunk_size < 1:
        raise ValueError(f"selective_scan_chunked: chunk_size must be >= 1, got {chunk_size}")
    out_dtype = u.dtype
    dtype = compute_dtype(u)
    with no_autocast(u.device):
        u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
        D, z, delta_bias, initial_state = (
            None if t is None else t.to(dtype) for t in (D, z, delta_bias, initial_state)
        )
        if B.dim() == 3:
            B = B.unsqueeze(1)
        if C.dim() == 3:
            C = C.unsqueeze(1)
        y, final_state = _SelectiveScan.apply(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size
        )
    y = y.to(out_dtype)
    return (y, final_state) if return_final_state else y


class _SelectiveScan(torch.autograd.Function):
    """The whole op (dt prologue, scan, D skip, z gate) with its backward written out.

    Every (batch, dim, L) tensor is transposed once to time-major and back once; the prologue
    and epilogue arithmetic runs block by block inside the scan loops, on slices still in cache,
    instead of as separate passes over memory.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
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
        batch, dim, _ = u.shape
        G, N = B.shape[1], B.shape[2]
        R = dim // G

        tm = _TimeMajor(
            u=_to_time_major(u, G),
            pre=_to_time_major(delta, G),
            A=A.reshape(G, R, N).transpose(1, 2).contiguous(),
            B=_to_time_major(B, G).unsqueeze(-1),
            C=_to_time_major(C, G).unsqueeze(-1),
            D=_skip_view(D, G, R),
            z=None if z is None else _to_time_major(z, G),
        )
        if delta_bias is not None:
            tm.pre += delta_bias.view(G, 1, R)
        tm.dt = F.softplus(tm.pre) if softplus else tm.pre
        h0 = None if initial_state is None else _state_to_nr(initial_state, G)

        y_tm, h_last, checkpoints = _scan_forward(tm, h0, chunk_size)

        ctx.save_for_backward(tm.u, tm.pre, tm.dt, tm.A, tm.B, tm.C, D, tm.z, checkpoints)
        ctx.softplus = softplus
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return _from_time_major(y_tm, batch, dim), _state_from_nr(h_last)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, dy: Tensor | None, d_state: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        u, pre, dt, A, B, C, D, z, checkpoints = ctx.saved_tensors
        L, batch, G, _, R = u.shape
        N = A.shape[1]
        dim = G * R
        needs = ctx.needs_input_grad
        tm = _TimeMajor(u=u, pre=pre, dt=dt, A=A, B=B, C=C, D=_skip_view(D, G, R), z=z)

        dy_tm = torch.zeros_like(u) if dy is None else _to_time_major(dy, G)
        dh_last = None if d_state is None else _state_to_nr(d_state, G)
        g = _scan_backward(dy_tm, dh_last, tm, checkpoints, ctx.softplus, ctx.chunk_size)

        dB = _from_time_major(g.B, batch, G * N).view(batch, G, N, L)
        dC = _from_time_major(g.C, batch, G * N).view(batch, G, N, L)
        return (
            _from_time_major(g.u, batch, dim),
            _from_time_major(g.pre, batch, dim),
            g.A.transpose(1, 2).reshape(dim, N),
            dB,
            dC,
            None if g.D is None or not needs[5] else g.D.view(dim),
            None if g.z is None or not needs[6] else _from_time_major(g.z, batch, dim),
            g.bias.view(dim) if needs[7] else None,
            _state_from_nr(g.h0) if needs[8] else None,
            None,
            None,
        )


@dataclass
class _TimeMajor:
    """The op's tensors in the scan's layout (or their gradients, under the same names).

    u, pre (delta + bias), dt (softplus(pre) or pre), z: (L, batch, G, 1, R);
    A: (G, N, R); B, C: (L, batch, G, N, 1); D: (G, 1, R); h0: (batch, G, N, R);
    bias: (G, 1, R).
    """

    u: Tensor
    pre: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None = None
    z: Tensor | None = None
    dt: Tensor | None = None
    h0: Tensor | None = None
    bias: Tensor | None = None


def _skip_view(D: Tensor | None, G: int, R: int) -> Tensor | None:
    """D (dim,) -> (G, 1, R), broadcastable against (..., G, 1, R)."""
    return None if D is None else D.view(G, 1, R)


def _to_time_major(t: Tensor, G: int) -> Tensor:
    """(batch, X, L) or (batch, G, N, L) -> a new (L, batch, G, 1, X / G) or (L, batch, G, N).

    One 2-D transpose of (batch * X, L): torch's blocked transpose copy, ~8x faster on CPU than
    the equivalent 3-D permute().contiguous().
    """
    batch, L = t.shape[0], t.shape[-1]
    out = t.new_empty(L, t.numel() // L)
    out.copy_(t.reshape(-1, L).t())
    return out.view(L, batch, G, 1, -1) if t.dim() == 3 else out.view(L, batch, G, -1)


def _from_time_major(t: Tensor, batch: int, X: int) -> Tensor:
    """(L, batch, ...) with batch * X elements per step -> a new (batch, X, L), not a view."""
    steps = t.reshape(-1, batch * X)
    out = t.new_empty(batch, X, steps.shape[0])
    out.view(batch * X, -1).copy_(steps.t())
    return out


def _state_to_nr(state: Tensor, G: int) -> Tensor:
    """(batch, dim, N) -> contiguous (batch, G, N, dim / G)."""
    batch, dim, N = state.shape
    return state.reshape(batch, G, dim // G, N).transpose(-1, -2).contiguous()


def _state_from_nr(state: Tensor) -> Tensor:
    """(batch, G, N, R) -> (batch, G * R, N)."""
    batch, G, N, R = state.shape
    return state.transpose(-1, -2).reshape(batch, G * R, N)


def _scan_forward(tm: _TimeMajor, h0: Tensor | None, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """y_t = (C_t . h_t + D u_t) silu(z_t), h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, blockwise.

    tm: the inputs, with dt; h0: (batch, G, N, R) or None; `block` steps per block.
    Returns y (L, batch, G, 1, R), the final state (batch, G, N, R) and the state entering each
    block (n_blocks, batch, G, N, R).
    """
    dt, A = tm.dt, tm.A
    L, batch, G, _, R = dt.shape
    N = A.shape[1]
    T = min(block, L)
    y = torch.empty_like(dt)
    checkpoints = dt.new_empty((L + T - 1) // T, batch, G, N, R)
    decay_buf = dt.new_empty(T, batch, G, N, R)
    state_buf = dt.new_empty(T, batch, G, N, R)
    # per-step views made once: at ~1 us each they would cost as much as the steps' arithmetic
    decay_rows, state_rows = decay_buf.unbind(0), state_buf.unbind(0)
    h = dt.new_zeros(batch, G, N, R) if h0 is None else h0
    for i, t0 in enumerate(range(0, L, T)):
        n = min(T, L - t0)
        blk = slice(t0, t0 + n)
        checkpoints[i] = h
        h = checkpoints[i]
        torch.mul(dt[blk], A, out=decay_buf[:n]).exp_()
        states = torch.mul(dt[blk] * tm.u[blk], tm.B[blk], out=state_buf[:n])
        for t in range(n):
            h = state_rows[t].addcmul_(decay_rows[t], h)
        k = n * batch * G
        out = y[blk]
        torch.bmm(tm.C[blk].view(k, 1, N), states.view(k, N, R), out=out.view(k, 1, R))
        if tm.D is not None:
            out.addcmul_(tm.u[blk], tm.D)
        if tm.z is not None:
            out.mul_(F.silu(tm.z[blk]))
    return y, h.clone(), checkpoints


def _scan_backward(
    dy: Tensor,
    dh_last: Tensor | None,
    tm: _TimeMajor,
    checkpoints: Tensor,
    softplus: bool,
    block: int,
) -> _TimeMajor:
    """Gradients of `_scan_forward`, blocks in reverse, under the names of their inputs.

    dy: (L, batch, G, 1, R); dh_last: (batch, G, N, R), the final state's gradient, or None;
    tm, checkpoints: as `_scan_forward` takes and returns them; `pre` receives the gradient of
    delta (through the softplus if `softplus`) and `bias` its sum over time and batch.
    """
    dt, A, u = tm.dt, tm.A, tm.u
    L, batch, G, _, R = dt.shape
    N = A.shape[1]
    T = min(block, L)
    g = _TimeMajor(
        u=torch.empty_like(u),
        pre=torch.empty_like(u),
        A=torch.zeros_like(A),
        B=torch.empty_like(tm.B),
        C=torch.empty_like(tm.C),
        D=None if tm.D is None else torch.zeros_like(tm.D),
        z=None if tm.z is None else torch.empty_like(u),
        h0=None,
        bias=u.new_zeros(G, 1, R),
    )
    decay_buf = dt.new_empty(T, batch, G, N, R)
    # state_buf[0] is the state entering the block, state_buf[1 + t] the state after step t
    state_buf = dt.new_empty(T + 1, batch, G, N, R)
    adj_buf = dt.new_empty(T, batch, G, N, R)
    work_buf = dt.new_empty(T, batch, G, N, R)
    decay_rows, state_rows, adj_rows = decay_buf.unbind(0), state_buf.unbind(0), adj_buf.unbind(0)
    # a_{t+1} g_{t+1} for the first step after the current block
    carry = dt.new_zeros(batch, G, N, R) if dh_last is None else dh_last
    for i in reversed(range(checkpoints.shape[0])):
        t0 = i * T
        n = min(T, L - t0)
        blk = slice(t0, t0 + n)
        k = n * batch * G
        dt_b, u_b = dt[blk], u[blk]
        x_b = dt_b * u_b

        decay = torch.mul(dt_b, A, out=decay_buf[:n]).exp_()
        state_buf[0] = checkpoints[i]
        states = torch.mul(x_b, tm.B[blk], out=state_buf[1 : n + 1])
        for t in range(n):
            state_rows[t + 1].addcmul_(decay_rows[t], state_rows[t])

        # epilogue: y = (C . h + D u) silu(z)
        dy_b = dy[blk]
        if tm.z is not None:
            z_b = tm.z[blk]
            y_pre = torch.bmm(tm.C[blk].view(k, 1, N), states.view(k, N, R)).view_as(u_b)
            if tm.D is not None:
                y_pre.addcmul_(u_b, tm.D)
            g.z[blk] = torch.ops.aten.silu_backward(dy_b * y_pre, z_b)
            dy_b = dy_b * F.silu(z_b)
        if tm.D is not None:
            g.D += (dy_b * u_b).sum((0, 1))

        adj = torch.mul(dy_b, tm.C[blk], out=adj_buf[:n])
        adj_rows[n - 1].add_(carry)
        for t in range(n - 2, -1, -1):
            adj_rows[t].addcmul_(decay_rows[t + 1], adj_rows[t + 1])

        dx_b = torch.bmm(tm.B[blk].view(k, 1, N), adj.view(k, N, R)).view_as(u_b)
        dB, dC = g.B[blk].view(k, 1, N), g.C[blk].view(k, 1, N)
        torch.bmm(x_b.view(k, 1, R), adj.view(k, N, R).transpose(1, 2), out=dB)
        torch.bmm(dy_b.view(k, 1, R), states.view(k, N, R).transpose(1, 2), out=dC)

        decayed_adj = decay.mul_(adj)  # a_t g_t
        carry = decayed_adj[0].clone()
        q = torch.mul(decayed_adj, state_buf[:n], out=work_buf[:n])  # d loss / d(dt_t A)
        g.A += torch.mul(q, dt_b, out=adj).sum((0, 1))
        ddt_b = q.mul_(A).sum(-2, keepdim=True)  # (n, batch, G, 1, R)

        # prologue: x = dt u, dt = softplus(pre), pre = delta + bias
        ddt_b.addcmul_(dx_b, u_b)
        torch.mul(dx_b, dt_b, out=g.u[blk])
        if tm.D is not None:
            g.u[blk].addcmul_(dy_b, tm.D)
        if softplus:
            # autograd's own softplus derivative, so that the threshold (linear above 20) matches
            ddt_b = torch.ops.aten.softplus_backward(ddt_b, tm.pre[blk], 1.0, 20.0)
        g.pre[blk] = ddt_b
        g.bias += ddt_b.sum((0, 1))
    g.h0 = carry
    return g
