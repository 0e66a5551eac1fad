"""Chunked Mamba-2 SSD in plain PyTorch (autograd does the backward).

The state-space-duality algorithm of Mamba-2 (Dao & Gu, 2024, the `ssd_minimal` listing), with
groups and ragged lengths. Since the decay is one scalar per head and step, the sequence splits
into chunks of T steps and everything but a short loop over chunks is a matmul:

1. within a chunk, y = (C B^T * exp(segsum(dt * A))) (dt * x), causal T x T "attention";
2. each chunk's final state from its own inputs;
3. states passed from chunk to chunk (a loop of L / T steps on (batch, H, P, N) tensors: O(L / T)
   memory, where the segsum-over-chunks form would need (L / T)^2 states);
4. each chunk's incoming state, decayed to every position, read out by C.

Every exponent is a segment sum of dt * A <= 0, so nothing overflows however strong the decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import compute_dtype, no_autocast, prepare_dt, skip_and_gate


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
        dt = prepare_dt(dt, dt_bias, dt_softplus, (-1,))
        if initial_state is not None:
            initial_state = initial_state.to(dtype)
        y, final_state = chunked_ssd(x, dt, A, B, C, initial_state, chunk_size)
        if D is not None and D.dim() == 1:
            D = D[:, None]
        y = skip_and_gate(y, x, D, z)
    y = y.to(out_dtype)
    return (y, final_state) if return_final_state else y


def segsum(x: Tensor) -> Tensor:
    """out[..., t, s] = x[..., s+1] + ... + x[..., t] for s <= t, -inf above the diagonal.

    x: (..., T) -> (..., T, T). Summing the masked terms directly, rather than differencing one
    cumulative sum, avoids cancellation when the cumulative sum is large.
    """
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)  # (..., T, T), [k, s] = x_k
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    out = x.masked_fill(~strictly_lower, 0).cumsum(dim=-2)  # [t, s] = sum_{s < k <= t} x_k
    lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def chunked_ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """y_t = h_t C_t with h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, over chunks of `chunk_size`.

    x: (batch, L, H, P); dt: (batch, L, H), already biased and softplus'd; A: (H,);
    B, C: (batch, L, G, N); initial_state: (batch, H, P, N).
    Returns y (batch, L, H, P) and the final state (batch, H, P, N).
    """
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    T = min(chunk_size, L)
    pad = -L % T
    if pad:
        # dt = 0 turns a padded step into the identity (decay 1, input 0), so the state after the
        # last padded step is the state after step L - 1.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (L + pad) // T

    # Heads split as (G, R): B and C stay per group and broadcast over the R heads sharing them.
    xdt = (x * dt[..., None]).reshape(batch, nc, T, G, R, P)
    xdt = xdt.permute(0, 3, 4, 1, 2, 5)  # (batch, G, R, nc, T, P)
    dA = (dt * A).reshape(batch, nc, T, G, R).permute(0, 3, 4, 1, 2)  # (batch, G, R, nc, T)
    dA_cs = dA.cumsum(dim=-1)  # (batch, G, R, nc, T)
    B = B.reshape(batch, nc, T, G, N).permute(0, 3, 1, 2, 4)[:, :, None]  # (batch, G, 1, nc, T, N)
    C = C.reshape(batch, nc, T, G, N).permute(0, 3, 1, 2, 4)[:, :, None]  # (batch, G, 1, nc, T, N)

    # 1. intra-chunk: causal, decay-weighted C_t . B_s scores applied to dt * x
    scores = (C @ B.transpose(-1, -2)) * torch.exp(segsum(dA))  # (batch, G, R, nc, T, T)
    y = scores @ xdt  # (batch, G, R, nc, T, P)

    # 2. each chunk's final state from its own inputs, decayed to the chunk end
    decay_to_end = torch.exp(dA_cs[..., -1:] - dA_cs)  # (batch, G, R, nc, T)
    states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B  # (batch, G, R, nc, P, N)

    # 3. state entering chunk c+1 = decay over chunk c * state entering c + chunk c's own state
    if initial_state is None:
        carry = x.new_zeros(batch, G, R, P, N)
    else:
        carry = initial_state.reshape(batch, G, R, P, N)
    incoming = []
    for chunk_decay, chunk_state in zip(
        torch.exp(dA_cs[..., -1]).unbind(-1), states.unbind(3), strict=True
    ):
        incoming.append(carry)
        carry = torch.addcmul(chunk_state, chunk_decay[..., None, None], carry)
    h_in = torch.stack(incoming, dim=3)  # (batch, G, R, nc, P, N)

    # 4. incoming state decayed to each position and read out by C
    y = y + (C @ h_in.transpose(-1, -2)) * torch.exp(dA_cs)[..., None]  # (batch, G, R, nc, T, P)

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(batch, nc * T, H, P)
    return y[:, :L], carry.reshape(batch, H, P, N)
