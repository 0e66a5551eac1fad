"""One decoding step of the Mamba-3 recurrence; the sequential reference loops over it."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import compute_dtype, no_autocast
from ..dispatch import kernel_backend
from .rotary import angle_increment, rotate, trapezoid

_OP = "mamba3_state_update"


class Mamba3State(NamedTuple):
    """What a Mamba-3 head carries from one token to the next (mamba_ssm's cache layout).

    angle: (batch, H, S), the cumulative rotation mod 2 pi; ssm: (batch, H, P, N);
    k: (batch, R, H, N), the last token's rotated B (with its bias); v: (batch, H, P), its x.
    The last token's input (v ⊗ k) enters the state again at the next step (trapezoidal rule).
    """

    angle: Tensor
    ssm: Tensor
    k: Tensor
    v: Tensor


def zero_state(
    batch: int, H: int, P: int, N: int, R: int, S: int, *, device: torch.device,
    dtype: torch.dtype,
) -> Mamba3State:
    return Mamba3State(
        torch.zeros(batch, H, S, device=device, dtype=torch.float32),
        torch.zeros(batch, H, P, N, device=device, dtype=torch.float32),
        torch.zeros(batch, R, H, N, device=device, dtype=dtype),
        torch.zeros(batch, H, P, device=device, dtype=dtype),
    )


def heads_of(t: Tensor, H: int) -> Tensor:
    """(..., R, G, N) -> (..., R, H, N): head h reads group h // (H // G)."""
    return t.repeat_interleave(H // t.shape[-2], dim=-2)


def per_rank(t: Tensor, proj: Tensor | None) -> Tensor:
    """(..., H, P) -> (..., R, H, P): x (or z) times each rank's projection (H, R, P); R = 1 if
    there is none (SISO)."""
    if proj is None:
        return t.unsqueeze(-3)
    return t.unsqueeze(-3) * proj.transpose(0, 1)


def read_out(
    y_r: Tensor, x_r: Tensor, D: Tensor | None, z: Tensor | None, mimo_z: Tensor | None,
    mimo_o: Tensor | None,
) -> Tensor:
    """Per-rank outputs (..., R, H, P) -> (..., H, P).

    + D x_r, then * silu(z mimo_z_r), then summed over r weighted by mimo_o_r.
    """
    if D is not None:
        y_r = y_r + D[:, None] * x_r
    if z is not None:
        y_r = y_r * F.silu(per_rank(z, mimo_z))
    if mimo_o is None:
        return y_r.squeeze(-3)
    return (y_r * mimo_o.transpose(0, 1)).sum(-3)


def mamba3_state_update(
    state: Mamba3State,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor,
    q_bias: Tensor,
    k_bias: Tensor,
    angles: Tensor,
    *,
    D: Tensor | None = None,
    z: Tensor | None = None,
    mimo_x: Tensor | None = None,
    mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Advance `state` by one token in place and return that token's output.

    q, k: (batch, R, G, N); v, z: (batch, H, P); adt, dt, trap: (batch, H); q_bias, k_bias:
    (H, R, N); angles: (batch, S); D: (H,); mimo_*: (H, R, P) (MIMO only). See `mamba3_scan`.
    Returns y (batch, H, P) in v.dtype. `backend` ("ref" | "torch" | "triton") overrides
    $HYBRIDLAB_KERNELS; "ref" and "torch" run the torch code, the Triton kernel (the state
    update and read-out; inference only) the rest around it in torch.
    """
    triton = kernel_backend(v.device, backend, op=_OP) == "triton"
    with no_autocast(v.device):
        inputs = prepare(state, q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x)
        if triton:
            # Imported on demand: triton is an optional, GPU-host dependency.
            from .triton_step import state_update_triton

            y_r, new_ssm = state_update_triton(state.ssm, inputs)
        else:
            new_ssm = advance(state.ssm, inputs)
            y_r = torch.einsum("bhpn,brhn->brhp", new_ssm, inputs.q)
        y = read_out(y_r, inputs.x, *_dtyped(inputs.x.dtype, D, z, mimo_z, mimo_o))
        for old, value in zip(state, inputs.next_state(new_ssm, v), strict=True):
            old.copy_(value)
    return y.to(v.dtype)


class StepInputs(NamedTuple):
    """One token's terms of the recurrence, in the compute dtype: rotated, biased q and k
    (batch, R, H, N), x and the previous x per rank (batch, R, H, P), the previous k, and the
    weights (batch, H) of the state, the previous input and the current input."""

    q: Tensor
    k: Tensor
    x: Tensor
    x_prev: Tensor
    k_prev: Tensor
    alpha: Tensor
    beta: Tensor
    gamma: Tensor
    theta: Tensor

    def next_state(self, ssm: Tensor, v: Tensor) -> Mamba3State:
        return Mamba3State(torch.remainder(self.theta, 2 * math.pi), ssm, self.k, v)


def _dtyped(dtype: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.to(dtype) for t in tensors]


def prepare(
    state: Mamba3State, q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor,
    q_bias: Tensor, k_bias: Tensor, angles: Tensor, mimo_x: Tensor | None,
) -> StepInputs:
    """Angles, rotations, biases and the trapezoid's weights for one token."""
    dtype = compute_dtype(v)
    H = v.shape[1]
    q, k, v, adt, dt, trap, q_bias, k_bias, angles = (
        t.to(dtype) for t in (q, k, v, adt, dt, trap, q_bias, k_bias, angles)
    )
    (mimo_x,) = _dtyped(dtype, mimo_x)
    pairwise = q.shape[1] == 1
    theta = state.angle.to(dtype) + angle_increment(angles, dt)  # (batch, H, S)
    q = rotate(heads_of(q, H) + q_bias.transpose(0, 1), theta, pairwise=pairwise)
    k = rotate(heads_of(k, H) + k_bias.transpose(0, 1), theta, pairwise=pairwise)
    gamma, delta = trapezoid(trap, dt)
    alpha = torch.exp(adt)
    return StepInputs(
        q, k, per_rank(v, mimo_x), per_rank(state.v.to(dtype), mimo_x), state.k.to(dtype),
        alpha, alpha * delta, gamma, theta,
    )


def advance(ssm: Tensor, s: StepInputs) -> Tensor:
    """The next state (batch, H, P, N) from the previous one and one token's terms."""
    return (
        s.alpha[..., None, None] * ssm.to(s.x.dtype)
        + torch.einsum("brhp,brhn->bhpn", s.x_prev, s.k_prev) * s.beta[..., None, None]
        + torch.einsum("brhp,brhn->bhpn", s.x, s.k) * s.gamma[..., None, None]
    )


def step(
    state: Mamba3State,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor,
    q_bias: Tensor,
    k_bias: Tensor,
    angles: Tensor,
    *,
    D: Tensor | None,
    z: Tensor | None,
    mimo_x: Tensor | None,
    mimo_z: Tensor | None,
    mimo_o: Tensor | None,
) -> tuple[Tensor, Mamba3State]:
    """One step, functional (autograd records it): (y in the compute dtype, the next state)."""
    inputs = prepare(state, q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x)
    new = advance(state.ssm, inputs)
    y_r = torch.einsum("bhpn,brhn->brhp", new, inputs.q)
    y = read_out(y_r, inputs.x, *_dtyped(inputs.x.dtype, D, z, mimo_z, mimo_o))
    return y, inputs.next_state(new, v.to(inputs.x.dtype))
