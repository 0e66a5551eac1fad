"""Chunked Mamba-2 SSD in plain PyTorch, with a hand-written backward.

The state-space-duality algorithm of Mamba-2 (Dao & Gu, 2024), with groups and ragged lengths.
The decay is one scalar per head and step, so the sequence splits into chunks of T steps and all
but a short loop over chunks is a matmul. With cs the cumulative sum of dt * A inside a chunk:

1. within a chunk, y = (C B^T * exp(cs_t - cs_s) [s <= t]) (dt x), a causal T x T "attention";
   C B^T is computed once per group and shared by the R = H / G heads that read it;
2. each chunk's own final state B^T (dt x exp(cs_last - cs)), one matmul per group with its R
   heads side by side;
3. the state leaving chunk c is exp(cs_last) * (state entering c) + chunk c's own state, a loop
   over chunks on (G, N, R, P) tensors;
4. the entering state read out by C and decayed by exp(cs_t), again one matmul per group.

Chunks of all batch rows are numbered batch-major, (batch * chunks), which for one group and
L % T == 0 makes x, z, y and their gradients plain views of the (batch, L, H, P) tensors. They
are processed in blocks of consecutive chunks so that every elementwise pass, over the
(block, G, R, T, T) scores as over the block's slice of x, runs in cache, and so that memory
stays O(L) plus one block.

The backward walks the blocks in reverse, recomputes the scores and reverses the chunk loop. It
never forms the gradient of the decay matrix: summing the chain rule over every decay factor
that contains cs_t (exp(cs_t - cs_s), exp(cs_s - cs_t), exp(cs_t), exp(cs_last - cs_t),
exp(cs_last)), each of which scales one term linearly, leaves
    d loss / d cs_t = sum_p (dy * y - dt x * d(dt x))_t  [+ <h_end, d h_end> at t = T - 1],
with y the scan's output before D and the gate, and h_end the state leaving the chunk.

Every exponent is a difference cs_t - cs_s, t >= s, of cumulative sums of dt * A <= 0, never a
positive sum; the cumulative sums are taken in float64 so that the differences keep their digits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._common import compute_dtype, no_autocast

# Chunks per block: as many as keep the (block, G, R, T, T) scores near this many elements
# (1 MiB in float32), so the passes over them run in cache.
BLOCK_ELEMENTS = 1 << 18


def ssd_chunked(
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
    """Mamba-2 SSD, chunked; same arguments and results as `ssd`.

    x: (batch, L, H, P); dt: (batch, L, H); A: (H,); B, C: (batch, L, G, N);
    D: (H,) or (H, P); z: (batch, L, H, P); dt_bias: (H,); initial_state: (batch, H, P, N).
    Returns y (batch, L, H, P) in x.dtype, plus the final state (batch, H, P, N) in the compute
    dtype (float32, or float64 for float64 inputs) if `return_final_state`.
    """
    out_dtype = x.dtype
    dtype = compute_dtype(x)
    with no_autocast(x.device):
        x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
        D, z, dt_bias, initial_state = (
            None if t is None else t.to(dtype) for t in (D, z, dt_bias, initial_state)
        )
        y, final_state = _SSD.apply(
            x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, chunk_size, None
        )
    y = y.to(out_dtype)
    return (y, final_state) if return_final_state else y


def ssd_chunked_decay(
    x: Tensor,
    dt: Tensor,
    log_decay: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SSD whose decay is given per step and head, not as dt * A with A fixed per head.

    h_t = exp(log_decay_t) * h_{t-1} + dt_t * x_t ⊗ B_t, y_t = h_t · C_t: Mamba-3's scan, whose
    A is data-dependent. x: (batch, L, H, P); dt, log_decay: (batch, L, H), log_decay <= 0;
    B, C: (batch, L, G, N); initial_state: (batch, H, P, N). Inputs already in the compute
    dtype, autocast off (the caller's job). Returns y (batch, L, H, P) and the final state.
    Gradients reach every input, log_decay included, through the same hand-written backward.
    """
    return _SSD.apply(
        x, dt, None, B, C, None, None, None, initial_state, False, chunk_size, log_decay
    )


class _SSD(torch.autograd.Function):
    """The whole op (dt prologue, chunked scan, D skip, z gate) with its backward written out.

    The decay of a step is exp(dt * A), or exp(log_decay) when A is None and log_decay is given.

    Inside, x-like tensors are (batch * nc, G, T, R, P), B and C (batch * nc, G, T, N), per-step
    scalars (batch * nc, G, T, R) and states (batch * (nc + 1), G, N, R, P): row by row, the
    state entering each chunk, then the final one.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        dt_bias: Tensor | None,
        initial_state: Tensor | None,
        softplus: bool,
        chunk_size: int,
        log_decay: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        batch, L, H, P = x.shape
        G = B.shape[2]
        R = H // G
        T = min(chunk_size, L)

        pre = dt if dt_bias is None else dt + dt_bias
        dt = F.softplus(pre) if softplus else pre
        dt_c = _to_chunks(dt.view(batch, L, G, R), T).contiguous()
        B_c, C_c = _to_chunks(B, T).contiguous(), _to_chunks(C, T).contiguous()
        if A is None:
            dA_c = _to_chunks(log_decay.view(batch, L, G, R), T)
        else:
            dA_c = dt_c * A.view(G, 1, R)
        cs = _chunk_cumsum(dA_c)  # (batch * nc, G, T, R)
        h0 = None if initial_state is None else _state_to_nrp(initial_state, G)

        # y and the scan's own output (y before D and the gate, y itself without them) are
        # allocated, padded, in their final layout and written through chunk views
        y = x.new_empty(batch, dt_c.shape[0] // batch * T, H, P)
        y_ssm = y if D is None and z is None else torch.empty_like(y)
        states = _ssd_forward(
            _x_chunks(x, G, T),
            dt_c,
            cs,
            B_c,
            C_c,
            _skip_view(D, G, R),
            None if z is None else _x_chunks(z, G, T),
            h0,
            batch,
            _x_chunks(y, G, T),
            _x_chunks(y_ssm, G, T),
        )

        # whole tensors only: views made in here would trip autograd's checks; rebuilt later
        ctx.save_for_backward(x, pre, dt_c, A, B_c, C_c, cs, y_ssm, states, D, z)
        ctx.softplus = softplus
        ctx.set_materialize_grads(False)
        final = states.view(batch, -1, *states.shape[1:])[:, -1]
        return y if y.shape[1] == L else y[:, :L].contiguous(), _state_from_nrp(final)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, dy: Tensor | None, d_state: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, pre, dt_c, A, B_c, C_c, cs, y_ssm, states, D, z = ctx.saved_tensors
        batch, L, H = pre.shape
        G, T, R = dt_c.shape[1:]
        needs = ctx.needs_input_grad

        dy_c = None if dy is None else _x_chunks(dy, G, T)
        dh_end = None if d_state is None else _state_to_nrp(d_state, G)
        grads = _ssd_backward(
            dy_c,
            dh_end,
            _x_chunks(x, G, T),
            dt_c,
            cs,
            B_c,
            C_c,
            _x_chunks(y_ssm, G, T),
            states,
            _skip_view(D, G, R),
            None if z is None else _x_chunks(z, G, T),
            batch,
        )
        dx_c, d_cs, ddt_c, dB_c, dC_c, dD, dz_c, dh0 = grads

        # cs is a cumulative sum over the chunk, so its inputs take reversed cumulative sums
        d_dA = _chunk_cumsum(d_cs.flip(2)).flip(2)  # (batch * nc, G, T, R)
        dA = d_log_decay = None
        if A is None:
            if needs[11]:
                d_log_decay = _from_chunks(d_dA, batch, L).reshape(batch, L, H)
        else:
            ddt_c.addcmul_(d_dA, A.view(G, 1, R))
            dA = (d_dA * dt_c).sum((0, 2)).view(H) if needs[2] else None
        ddt = _from_chunks(ddt_c, batch, L).reshape(batch, L, H)
        if ctx.softplus:
            # autograd's own softplus derivative, so that the threshold (linear above 20) matches
            ddt = torch.ops.aten.softplus_backward(ddt, pre, 1.0, 20.0)
        d_bias = ddt.sum((0, 1)) if needs[7] else None
        if dD is not None:
            dD = dD.reshape(H, -1).sum(-1) if D.dim() == 1 else dD.reshape(H, -1)
        return (
            _from_chunks(dx_c, batch, L).reshape(batch, L, H, -1),
            ddt,
            dA,
            _from_chunks(dB_c, batch, L),
            _from_chunks(dC_c, batch, L),
            dD if needs[5] else None,
            None if dz_c is None else _from_chunks(dz_c, batch, L).reshape(batch, L, H, -1),
            d_bias,
            _state_from_nrp(dh0) if needs[8] else None,
            None,
            None,
            d_log_decay,
        )


def _to_chunks(t: Tensor, T: int) -> Tensor:
    """(batch, L, G, ...) -> (batch * nc, G, T, ...), zero-padded to nc * T steps.

    A view where the layout allows (one group, L % T == 0), else a copy. Zero padding is exact:
    a padded step has dt = 0 (decay 1, no input) and nothing to read out.
    """
    L = t.shape[1]
    pad = -L % T
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.unflatten(1, (-1, T)).transpose(2, 3).flatten(0, 1)


def _x_chunks(t: Tensor, G: int, T: int) -> Tensor:
    """(batch, L, H, P) -> (batch * nc, G, T, H / G, P), see `_to_chunks`."""
    batch, L, H, P = t.shape
    return _to_chunks(t.view(batch, L, G, H // G, P), T)


def _from_chunks(t: Tensor, batch: int, L: int) -> Tensor:
    """(batch * nc, G, T, ...) -> (batch, L, G, ...), a view where the layout allows."""
    t = t.unflatten(0, (batch, -1)).transpose(2, 3).flatten(1, 2)
    return t if t.shape[1] == L else t[:, :L].contiguous()


def _skip_view(D: Tensor | None, G: int, R: int) -> Tensor | None:
    """D (H,) or (H, P) -> broadcastable against (..., G, T, R, P)."""
    return None if D is None else D.view(G, 1, R, -1)


def _chunk_cumsum(t: Tensor) -> Tensor:
    """Cumulative sum over dim 2 (time inside a chunk), accumulated in at least float64."""
    return t.cumsum(2, dtype=torch.promote_types(t.dtype, torch.float64)).to(t.dtype)


def _state_to_nrp(state: Tensor, G: int) -> Tensor:
    """(batch, H, P, N) -> contiguous (batch, G, N, R, P)."""
    batch, H, P, N = state.shape
    return state.view(batch, G, H // G, P, N).permute(0, 1, 4, 2, 3).contiguous()


def _state_from_nrp(state: Tensor) -> Tensor:
    """(batch, G, N, R, P) -> a new (batch, H, P, N)."""
    batch, G, N, R, P = state.shape
    out = state.permute(0, 1, 3, 4, 2).clone(memory_format=torch.contiguous_format)
    return out.view(batch, G * R, P, N)


def _exp_floor(dtype: torch.dtype) -> float:
    """A little above the log of the smallest normal number of `dtype`."""
    return math.log(torch.finfo(dtype).tiny) + 8.0


def _decay_matrix(cs: Tensor, out: Tensor) -> Tensor:
    """out[..., t, s] = exp(cs_t - cs_s) for s <= t; in (0, 1] but meaningless above the diagonal.

    cs: (..., T), non-increasing; out: (..., T, T). The callers multiply by a causal-masked C B^T,
    so the upper triangle only has to be finite: the exponent is clamped to <= 0 there. It is also
    clamped from below where exp would leave the normal range: a denormal or -inf argument makes
    exp ~10x slower on x86, and e^-80 (float32) already lies far below any term that counts.
    """
    torch.sub(cs[..., :, None], cs[..., None, :], out=out)
    return out.clamp_(min=_exp_floor(out.dtype), max=0.0).exp_()


class _Chunks:
    """Per-chunk decays and the bookkeeping of chunks numbered batch-major, shared by both passes.

    cs: (batch * nc, G, T, R), the cumulative dt * A inside each chunk.
    """

    def __init__(self, cs: Tensor, batch: int) -> None:
        self.n, G, T, R = cs.shape
        self.nc = self.n // batch
        self.cs_heads = cs.transpose(2, 3).contiguous()  # (batch * nc, G, R, T)
        gain = cs.exp()
        self.gain = gain[..., None]  # (batch * nc, G, T, R, 1): decay from chunk start to t
        self.to_end = (cs[:, :, -1:] - cs).exp_()[..., None]  # decay from t to the chunk end
        self.chunk_decay = gain[:, :, -1, None, :, None]  # (batch * nc, G, 1, R, 1)
        self.causal = torch.ones(T, T, dtype=torch.bool, device=cs.device).tril_()
        step = max(1, BLOCK_ELEMENTS // (G * R * T * T))
        self.blocks = [slice(c, min(c + step, self.n)) for c in range(0, self.n, step)]

    def state_index(self, chunk: int) -> int:
        """Row of the state entering `chunk` in the (batch * (nc + 1), ...) states tensor."""
        return chunk + chunk // self.nc

    def states_of(self, states: Tensor, blk: slice, *, leaving: bool) -> Tensor:
        """The states entering (or leaving) the chunks of `blk`, (k, G, N, R, P)."""
        first = self.state_index(blk.start) + leaving
        if blk.start // self.nc == (blk.stop - 1) // self.nc:
            return states[first : first + blk.stop - blk.start]
        index = [self.state_index(c) + leaving for c in range(blk.start, blk.stop)]
        return states[torch.tensor(index, device=states.device)]

    def scores(self, C: Tensor, B: Tensor, blk: slice, out: Tensor) -> tuple[Tensor, Tensor]:
        """The decay matrices (k, G, R, T, T) in `out` and the causal-masked C B^T (k, G, T, T)."""
        decay = _decay_matrix(self.cs_heads[blk], out)
        return decay, (C[blk] @ B[blk].transpose(-1, -2)).mul_(self.causal)


def _ssd_forward(
    x: Tensor,
    dt: Tensor,
    cs: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    h0: Tensor | None,
    batch: int,
    y: Tensor,
    y_ssm: Tensor,
) -> Tensor:
    """y for h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t (+ D x_t, * silu(z_t)).

    x, z: (batch * nc, G, T, R, P); dt, cs: (batch * nc, G, T, R); B, C: (batch * nc, G, T, N);
    D: broadcastable to x or None; h0: (batch, G, N, R, P) or None; y and y_ssm, the output
    and the scan's own output before D and the gate (the same tensor without D and z):
    (batch * nc, G, T, R, P), written. Returns the states (batch * (nc + 1), G, N, R, P).
    """
    _, G, T, R, P = x.shape
    N = B.shape[-1]
    ch = _Chunks(cs, batch)
    states = x.new_empty(batch, ch.nc + 1, G, N, R, P)
    if h0 is None:
        states[:, 0].zero_()
    else:
        states[:, 0] = h0
    states = states.view(-1, G, N, R, P)
    decay_buf = x.new_empty(ch.blocks[0].stop, G, R, T, T)
    for blk in ch.blocks:
        k = blk.stop - blk.start
        xdt = x[blk] * dt[blk, ..., None]  # (k, G, T, R, P)
        scores, CB = ch.scores(C, B, blk, decay_buf[:k])
        scores.mul_(CB.unsqueeze(2))
        y_diag = scores @ xdt.transpose(2, 3).contiguous()  # (k, G, R, T, P)

        # each chunk's own final state, the R heads of a group side by side: (k, G, N, R * P)
        own = B[blk].transpose(-1, -2) @ (xdt * ch.to_end[blk]).view(k, G, T, R * P)
        for c in range(blk.start, blk.stop):
            i = ch.state_index(c)
            own_c = own[c - blk.start].view(G, N, R, P)
            torch.addcmul(own_c, ch.chunk_decay[c], states[i], out=states[i + 1])
        entering = ch.states_of(states, blk, leaving=False).reshape(k, G, N, R * P)
        y_off = (C[blk] @ entering).view(k, G, T, R, P)
        torch.addcmul(y_diag.transpose(2, 3), y_off, ch.gain[blk], out=y_ssm[blk])
        if D is not None or z is not None:
            out = y[blk]
            if D is None:
                out.copy_(y_ssm[blk])
            else:
                torch.addcmul(y_ssm[blk], x[blk], D, out=out)
            if z is not None:
                out.mul_(F.silu(z[blk]))
    return states


def _ssd_backward(
    dy: Tensor | None,
    dh_end: Tensor | None,
    x: Tensor,
    dt: Tensor,
    cs: Tensor,
    B: Tensor,
    C: Tensor,
    y_ssm: Tensor,
    states: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    batch: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """Gradients of `_ssd_forward`, blocks in reverse.

    dy: (batch * nc, G, T, R, P) or None; dh_end: (batch, G, N, R, P), the final state's
    gradient, or None; the rest as `_ssd_forward` takes and returns them.
    Returns dx, d loss / d cs (batch * nc, G, T, R), ddt through dt * x only, dB, dC,
    dD (G, R, P) or None, dz or None, and dh0 (batch, G, N, R, P).
    """
    _, G, T, R, P = x.shape
    N = B.shape[-1]
    ch = _Chunks(cs, batch)
    dx = torch.empty_like(x)
    dz = None if z is None or dy is None else torch.empty_like(x)
    d_cs, ddt = torch.empty_like(cs), torch.empty_like(cs)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dD = None if D is None else x.new_zeros(G, R, P)
    dh0 = x.new_empty(batch, G, N, R, P)
    zero_state = x.new_zeros(G, N, R, P)
    decay_buf = x.new_empty(ch.blocks[0].stop, G, R, T, T)
    d_leaving_buf = x.new_empty(ch.blocks[0].stop, G, N, R, P)
    # gradient of the state entering the chunk after the current one, in the same batch row
    carry = zero_state
    for blk in reversed(ch.blocks):
        k = blk.stop - blk.start
        if dy is None:
            dyb = x.new_zeros(k, G, T, R, P)
        else:
            dyb = dy[blk]
            if z is not None:
                y_pre = y_ssm[blk] if D is None else torch.addcmul(y_ssm[blk], x[blk], D)
                dz[blk] = torch.ops.aten.silu_backward(dyb * y_pre, z[blk])
                dyb = dyb * F.silu(z[blk])
            if D is not None:
                dD += (dyb * x[blk]).sum((0, 2))
        xdt = x[blk] * dt[blk, ..., None]
        decay, CB = ch.scores(C, B, blk, decay_buf[:k])
        scores = decay * CB.unsqueeze(2)  # (k, G, R, T, T)

        # readout of the entering states: y_off = exp(cs_t) (C_t . h_in)
        dy_off = (dyb * ch.gain[blk]).view(k, G, T, R * P)
        entering = ch.states_of(states, blk, leaving=False).reshape(k, G, N, R * P)
        dC_blk = dy_off @ entering.transpose(-1, -2)  # (k, G, T, N)
        d_in = (C[blk].transpose(-1, -2) @ dy_off).view(k, G, N, R, P)

        # chunk loop reversed: d(leaving c) = d(entering c + 1), or d h_end after a row's last
        d_leaving = d_leaving_buf[:k]
        for c in reversed(range(blk.start, blk.stop)):
            row, pos = divmod(c, ch.nc)
            if pos == ch.nc - 1:
                carry = zero_state if dh_end is None else dh_end[row]
            d_leaving[c - blk.start] = carry
            carry = torch.addcmul(d_in[c - blk.start], ch.chunk_decay[c], carry)
            if pos == 0:
                dh0[row] = carry
        leaving = ch.states_of(states, blk, leaving=True)
        last = (d_leaving * leaving).sum((2, 4))  # (k, G, R), <h_end, d h_end>

        # each chunk's own state: own = B^T (xdt * to_end)
        d_own = d_leaving.view(k, G, N, R * P)
        dB_blk = (xdt * ch.to_end[blk]).view(k, G, T, R * P) @ d_own.transpose(-1, -2)
        d_xs = (B[blk] @ d_own).view(k, G, T, R, P)

        # intra-chunk: y_diag = scores @ xdt per head
        dy_h = dyb.transpose(2, 3).contiguous()  # (k, G, R, T, P)
        d_scores = dy_h @ xdt.transpose(2, 3).contiguous().transpose(-1, -2)  # (k, G, R, T, T)
        dxdt_diag = scores.transpose(-1, -2) @ dy_h  # (k, G, R, T, P)
        dCB = d_scores.mul_(decay).sum(2).mul_(ch.causal)  # (k, G, T, T)
        torch.add(dC_blk, dCB @ B[blk], out=dC[blk])
        torch.add(dB_blk, dCB.transpose(-1, -2) @ C[blk], out=dB[blk])
        dxdt = torch.addcmul(dxdt_diag.transpose(2, 3), d_xs, ch.to_end[blk])  # (k, G, T, R, P)

        d_cs[blk] = (dyb * y_ssm[blk]).sum(-1) - (xdt * dxdt).sum(-1)
        d_cs[blk, :, -1] += last
        ddt[blk] = (dxdt * x[blk]).sum(-1)
        out = torch.mul(dxdt, dt[blk, ..., None], out=dx[blk])
        if D is not None:
            out.addcmul_(dyb, D)
    return dx, d_cs, ddt, dB, dC, dD, dz, dh0
