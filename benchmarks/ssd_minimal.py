"""Paper-style minimal chunked SSD: the baseline `bench_scan.py` measures Mamba-2 against.

A re-derivation of the `ssd_minimal_discrete` listing of the Mamba-2 paper (Dao & Gu, 2024,
"Transformers are SSMs", Listing 1): segment sums by differencing one cumulative sum, masked to
-inf above the diagonal and exponentiated; four einsums; B and C broadcast to every head; the
chunk-to-chunk recurrence as a (chunks + 1)^2 decay matrix; autograd does the backward. Kept out
of the package on purpose: it is a yardstick, not a code path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def segsum(x: Tensor) -> Tensor:
    """out[..., t, s] = cumsum(x)_t - cumsum(x)_s for s <= t, -inf above the diagonal.

    x: (..., T) -> (..., T, T).
    """
    T = x.shape[-1]
    x_cumsum = torch.cumsum(x, dim=-1)
    out = x_cumsum[..., :, None] - x_cumsum[..., None, :]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return out.masked_fill(~mask, float("-inf"))


def ssd_minimal_discrete(
    X: Tensor, A: Tensor, B: Tensor, C: Tensor, block_len: int, initial_states: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The listing, with the einops rearranges spelled as reshape/permute.

    X: (batch, L, H, P), already multiplied by dt; A: (batch, L, H), already dt * A;
    B, C: (batch, L, H, N), one copy per head; initial_states: (batch, H, P, N).
    L must be a multiple of `block_len`. Returns Y (batch, L, H, P), final state (batch, H, P, N).
    """
    batch, L, H, P = X.shape
    nc = L // block_len
    X, A, B, C = (t.reshape(batch, nc, block_len, *t.shape[2:]) for t in (X, A, B, C))
    A = A.permute(0, 3, 1, 2)  # (batch, H, nc, T)
    A_cumsum = torch.cumsum(A, dim=-1)

    # 1. intra-chunk output (diagonal blocks)
    L_mat = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L_mat, X)

    # 2. each chunk's final state from its own inputs
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)

    # 3. chunk-to-chunk recurrence as one matrix over chunk boundaries
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states[:, None]
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. incoming state to output, per chunk
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)

    Y = (Y_diag + Y_off).reshape(batch, L, H, P)
    return Y, final_state


def ssd_paper(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 64,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The listing behind the `ssd` op's interface (float32/64 inputs, L % chunk_size == 0).

    x: (batch, L, H, P); dt: (batch, L, H); A: (H,); B, C: (batch, L, G, N); D: (H,);
    dt_bias: (H,); initial_state: (batch, H, P, N). Returns y like `ssd`.
    """
    H = x.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.repeat_interleave(H // B.shape[2], dim=2)
    C = C.repeat_interleave(H // C.shape[2], dim=2)
    y, final_state = ssd_minimal_discrete(
        x * dt[..., None], A * dt, B, C, chunk_size, initial_state
    )
    if D is not None:
        y = y + D[:, None] * x
    return (y, final_state) if return_final_state else y
