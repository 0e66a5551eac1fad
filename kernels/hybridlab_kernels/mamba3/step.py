"""One decoding step of the Mamba-3 recurrence; the sequential reference loops over it."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import compute_dtype, no_autocast
from ..dispatch import kernel_backend
from .inputs import Mamba3Inputs
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


def read_out(y_r: Tensor, x_r: Tensor, inputs: Mamba3Inputs) -> Tensor:
    """Per-rank outputs (..., R, H, P) -> (..., H, P): + D x_r, then * silu(z mimo_z_r), then
    summed over r weighted by mimo_o_r (inputs in y_r's dtype)."""
    if inputs.D is not None:
        y_r = y_r + inputs.D[:, None] * x_r
    if inputs.z is not None:
        y_r = y_r * F.silu(per_rank(inputs.z, inputs.mimo_z))
    if inputs.mimo_o is None:
        return y_r.squeeze(-3)
    return (y_r * inputs.mimo_o.transpose(0, 1)).sum(-3)


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

    The tensors of `mamba3_scan` without the time axis: q, k (batch, R, G, N); v, z (batch, H,
    P); adt, dt, trap (batch, H); angles (batch, S); the rest as there. Returns y (batch, H, P)
    in v.dtype. `backend` ("ref" | "torch" | "triton") overrides $HYBRIDLAB_KERNELS; "ref" and
    "torch" run the torch code, "triton" a kernel for the state update and read-out (inference
    only) with the per-token work around it in torch.
    """
    token = Mamba3Inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_x, mimo_z,
                         mimo_o)
    triton = kernel_backend(v.device, backend, op=_OP) == "triton"
    with no_autocast(v.device):
        terms = prepare(state, token)
        if triton:
            # Imported on demand: triton is an optional, GPU-host dependency.
            from .triton_step import state_update_triton

            y_r, new_ssm = state_update_triton(state.ssm, terms)
        else:
            new_ssm = advance(state.ssm, terms)
            y_r = torch.einsum("bhpn,brhn->brhp", new_ssm, terms.q)
        y = read_out(y_r, terms.x, token.cast(terms.x.dtype))
        for old, value in zip(state, terms.next_state(new_ssm, v), strict=True):
            old.copy_(value)
    return y.to(v.dtype)


class StepTerms(NamedTuple):
    """One token's terms of the recurrence, in the compute dtype: rotated, biased q and k
    (batch, R, H, N), x and the previous x per rank (batch, R, H, P), the previous k, the
    weights (batch, H) of the state, the previous input and the current input, and the new
    cumulative angles."""

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


def prepare(state: Mamba3State, token: Mamba3Inputs) -> StepTerms:
    """Angles, rotations, biases and the trapezoid's weights for one token."""
    t = token.cast(compute_dtype(token.v))
    H = t.v.shape[1]
    pairwise = t.q.shape[1] == 1
    theta = state.angle.to(t.v.dtype) + angle_increment(t.angles, t.dt)  # (batch, H, S)
    q = rotate(heads_of(t.q, H) + t.q_bias.transpose(0, 1), theta, pairwise=pairwise)
    k = rotate(heads_of(t.k, H) + t.k_bias.transpose(0, 1), theta, pairwise=pairwise)
    gamma, delta = trapezoid(t.trap, t.dt)
    alpha = torch.exp(t.adt)
    return StepTerms(
        q, k, per_rank(t.v, t.mimo_x), per_rank(state.v.to(t.v.dtype), t.mimo_x),
        state.k.to(t.v.dtype), alpha, alpha * delta, gamma, theta,
    )


def advance(ssm: Tensor, s: StepTerms) -> Tensor:
    """The next state (batch, H, P, N) from the previous one and one token's terms."""
    return (
        s.alpha[..., None, None] * ssm.to(s.x.dtype)
        + torch.einsum("brhp,brhn->bhpn", s.x_prev, s.k_prev) * s.beta[..., None, None]
        + torch.einsum("brhp,brhn->bhpn", s.x, s.k) * s.gamma[..., None, None]
    )


def step(state: Mamba3State, token: Mamba3Inputs) -> tuple[Tensor, Mamba3State]:
    """One step, functional (autograd records it): (y in the compute dtype, the next state)."""
    terms = prepare(state, token)
    new = advance(state.ssm, terms)
    y_r = torch.einsum("bhpn,brhn->brhp", new, terms.q)
    y = read_out(y_r, terms.x, token.cast(terms.x.dtype))
    return y, terms.next_state(new, token.v.to(terms.x.dtype))
