"""Sequential reference for the Mamba-1 selective scan: one Python step per time step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import compute_dtype, no_autocast


def selective_scan_ref(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan, computed step by step.

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D: (dim,); z: (batch, dim, L); delta_bias: (dim,); initial_state: (batch, dim, N).
    Returns y (batch, dim, L) in u.dtype, plus the final state (batch, dim, N) in the compute
    dtype (float32, or float64 for float64 inputs) if `return_final_state`.
    """
    out_dtype = u.dtype
    dtype = compute_dtype(u)
    with no_autocast(u.device):
        u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
        batch, dim, _ = u.shape
        if delta_bias is not None:
            delta = delta + delta_bias.to(dtype)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        if B.dim() == 3:
            B = B.unsqueeze(1)
        if C.dim() == 3:
            C = C.unsqueeze(1)
        # (batch, G, N, L) -> (batch, dim, N, L): channel d reads group d // (dim // G)
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        C = C.repeat_interleave(dim // C.shape[1], dim=1)

        if initial_state is None:
            h = u.new_zeros(batch, dim, A.shape[1])
        else:
            h = initial_state.to(dtype)
        ys = []
        # unbind rather than index: its backward is one stack, not L full-size zero tensors
        for u_t, dt_t, B_t, C_t in zip(
            u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True
        ):
            dt_t = dt_t[:, :, None]  # (batch, dim, 1)
            h = torch.exp(dt_t * A) * h + dt_t * B_t * u_t[:, :, None]  # (batch, dim, N)
            ys.append((h * C_t).sum(-1))  # (batch, dim)
        y = torch.stack(ys, dim=-1)  # (batch, dim, L)

        if D is not None:
            y = y + D.to(dtype)[:, None] * u
        if z is not None:
            y = y * F.silu(z.to(dtype))
    y = y.to(out_dtype)
    return (y, h) if return_final_state else y
