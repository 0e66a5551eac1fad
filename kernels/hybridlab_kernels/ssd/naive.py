"""Sequential reference for Mamba-2 SSD: one Python step per time step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import compute_dtype, no_autocast


def ssd_ref(
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
    """Mamba-2 SSD, computed step by step (`chunk_size` is accepted and ignored).

    x: (batch, L, H, P); dt: (batch, L, H); A: (H,); B, C: (batch, L, G, N);
    D: (H,) or (H, P); z: (batch, L, H, P); dt_bias: (H,); initial_state: (batch, H, P, N).
    Returns y (batch, L, H, P) in x.dtype, plus the final state (batch, H, P, N) in the compute
    dtype (float32, or float64 for float64 inputs) if `return_final_state`.
    """
    out_dtype = x.dtype
    dtype = compute_dtype(x)
    with no_autocast(x.device):
        x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
        batch, _, H, P = x.shape
        if dt_bias is not None:
            dt = dt + dt_bias.to(dtype)
        if dt_softplus:
            dt = F.softplus(dt)
        # (batch, L, G, N) -> (batch, L, H, N): head h reads group h // (H // G)
        B = B.repeat_interleave(H // B.shape[2], dim=2)
        C = C.repeat_interleave(H // C.shape[2], dim=2)

        if initial_state is None:
            h = x.new_zeros(batch, H, P, B.shape[-1])
        else:
            h = initial_state.to(dtype)
        ys = []
        # unbind rather than index: its backward is one stack, not L full-size zero tensors
        for x_t, dt_t, B_t, C_t in zip(
            x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1), strict=True
        ):
            decay = torch.exp(dt_t * A)[:, :, None, None]  # (batch, H, 1, 1)
            dBx = (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]  # (batch, H, P, N)
            h = decay * h + dBx
            ys.append((h * C_t[:, :, None, :]).sum(-1))  # (batch, H, P)
        y = torch.stack(ys, dim=1)  # (batch, L, H, P)

        if D is not None:
            D = D.to(dtype)
            y = y + (D[:, None] if D.dim() == 1 else D) * x
        if z is not None:
            y = y * F.silu(z.to(dtype))
    y = y.to(out_dtype)
    return (y, h) if return_final_state else y
