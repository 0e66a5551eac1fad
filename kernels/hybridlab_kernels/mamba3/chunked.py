"""The Mamba-3 scan on CPU: an SSD with data-dependent decay, through the chunked Mamba-2 path.

Unrolling the trapezoidal step h_t = a_t h_{t-1} + a_t delta_t u_{t-1} + gamma_t u_t (see
`rotary.trapezoid`) gives h_t = sum_{s<=t} exp(cs_t - cs_s) w_ts u_s with w_ts = gamma_s +
delta_{s+1} for s < t and w_tt = gamma_t: the a_{s+1} of the second term is exactly the decay
from s to s + 1. So the scan is Mamba-2's SSD with input weight c_s = gamma_s + delta_{s+1}
(delta_{L+1} = 0), log-decay adt and B, C the rotated (per-head) k and q, minus the one
diagonal term delta_{t+1} (q_t . k_t) x_t it over-counts; an initial (state, k, v) enters as
the state h_0 + delta_1 v ⊗ k. The SSD runs `ssd_chunked_decay`, with its hand-written backward
(the Triton path, `triton_mamba3`, runs the Triton SSD's instead); everything around it is
elementwise and left to autograd.

MIMO (rank R) heads write sum_r x_r ⊗ k_r into one state and read it with each q_r; by
linearity that is R x R single-rank SSDs, (writer r', reader r), run as one SSD over H R R
heads, whose states sum over the writers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import compute_dtype, no_autocast
from ..ssd.chunked import ssd_chunked_decay
from .inputs import Mamba3Inputs
from .rotary import angle_increment, rotate, trapezoid
from .step import Mamba3State, heads_of, per_rank, read_out


def mamba3_chunked(
    inputs: Mamba3Inputs,
    *,
    chunk_size: int = 64,
    initial_state: Mamba3State | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Mamba3State]:
    """`mamba3_scan`, chunked; same arguments and results."""
    return mamba3_via(ssd_chunked_decay, inputs, chunk_size=chunk_size,
                      initial_state=initial_state, return_final_state=return_final_state)


# ssd_decay(x, dt, log_decay, B, C, *, chunk_size, initial_state) -> (y, final state)
SSDDecay = Callable[..., tuple[Tensor, Tensor]]


def mamba3_via(
    ssd_decay: SSDDecay,
    inputs: Mamba3Inputs,
    *,
    chunk_size: int,
    initial_state: Mamba3State | None,
    return_final_state: bool,
) -> Tensor | tuple[Tensor, Mamba3State]:
    """The Mamba-3 scan with its SSD run by `ssd_decay` (the torch or the Triton one)."""
    with no_autocast(inputs.v.device):
        y, final = _scan(ssd_decay, inputs.cast(compute_dtype(inputs.v)), chunk_size,
                         initial_state)
    y = y.to(inputs.v.dtype)
    return (y, final) if return_final_state else y


def _scan(
    ssd_decay: SSDDecay, t: Mamba3Inputs, chunk_size: int, initial_state: Mamba3State | None
) -> tuple[Tensor, Mamba3State]:
    H, R = t.v.shape[2], t.q.shape[2]
    pairwise = R == 1
    # cumulative angles, summed in float64 so that thousands of steps keep their digits
    theta = angle_increment(t.angles, t.dt).cumsum(1, dtype=torch.float64).to(t.v.dtype)
    if initial_state is not None:
        theta = theta + initial_state.angle.to(t.v.dtype)[:, None]
    q = rotate(heads_of(t.q, H) + t.q_bias.transpose(0, 1), theta, pairwise=pairwise)
    k = rotate(heads_of(t.k, H) + t.k_bias.transpose(0, 1), theta, pairwise=pairwise)
    gamma, delta = trapezoid(t.trap, t.dt)
    delta_next = F.pad(delta[:, 1:], (0, 0, 0, 1))  # delta_{t+1}, 0 after the last step
    weight = gamma + delta_next
    x_r = per_rank(t.v, t.mimo_x)  # (batch, L, R, H, P)

    h0 = None
    if initial_state is not None:
        x_prev = per_rank(initial_state.v.to(t.v.dtype), t.mimo_x)  # (batch, R, H, P)
        carried = torch.einsum("brhp,brhn->bhpn", x_prev, initial_state.k.to(t.v.dtype))
        h0 = initial_state.ssm.to(t.v.dtype) + delta[:, 0, :, None, None] * carried

    if R == 1:
        y_r, h_end = ssd_decay(
            x_r[:, :, 0], weight, t.adt, k[:, :, 0], q[:, :, 0], chunk_size=chunk_size,
            initial_state=h0,
        )
        y_r = y_r.unsqueeze(2)
    else:
        y_r, h_end = _mimo_ssd(ssd_decay, x_r, weight, t.adt, k, q, h0, chunk_size)
    # the diagonal term counted with delta_{t+1} that only enters at step t + 1
    qk = torch.einsum("blrhn,blshn->blrsh", q, k)  # (batch, L, R reader, R writer, H)
    over = torch.einsum("blrsh,blshp->blrhp", qk, x_r)
    y_r = y_r - delta_next[:, :, None, :, None] * over
    y = read_out(y_r, x_r, t)
    final = Mamba3State(torch.remainder(theta[:, -1], 2 * math.pi), h_end, k[:, -1], t.v[:, -1])
    return y, final


def _mimo_ssd(ssd_decay, x_r, weight, adt, k, q, h0, chunk_size):
    """R x R single-rank SSDs as one, heads ordered (h, writer, reader)."""
    batch, L, R, H, P = x_r.shape
    N = k.shape[-1]

    def heads(t: Tensor, writer: bool) -> Tensor:
        # (batch, L, R, H, F) -> (batch, L, H * R * R, F), indexed by (h, writer, reader)
        t = t.permute(0, 1, 3, 2, 4)  # (batch, L, H, R, F)
        t = t[:, :, :, :, None] if writer else t[:, :, :, None]
        return t.expand(batch, L, H, R, R, t.shape[-1]).reshape(batch, L, H * R * R, -1)

    def scalars(t: Tensor) -> Tensor:
        return t[..., None].expand(batch, L, H, R * R).reshape(batch, L, H * R * R)

    init = None
    if h0 is not None:
        # the carried state enters once per reader: in the writer-0 copy
        init = h0.new_zeros(batch, H, R, R, P, N)
        init[:, :, 0] = h0[:, :, None]
        init = init.view(batch, H * R * R, P, N)
    y, h = ssd_decay(
        heads(x_r, True), scalars(weight), scalars(adt), heads(k, True), heads(q, False),
        chunk_size=chunk_size, initial_state=init,
    )
    y = y.view(batch, L, H, R, R, P).sum(3).permute(0, 1, 3, 2, 4)  # (batch, L, R, H, P)
    h_end = h.view(batch, H, R, R, P, N)[:, :, :, 0].sum(2)
    return y, h_end
