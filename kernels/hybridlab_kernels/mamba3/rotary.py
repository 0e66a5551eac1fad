"""Mamba-3's data-dependent rotations and the per-step coefficients of its trapezoidal rule.

Mamba-3 (Lahoti et al., 2026) realises a complex-valued diagonal state as rotations of B and C:
head h turns pair j of every B_t and C_t by the cumulative angle
    theta_t = theta_{t-1} + pi * tanh(angles_t[j]) * dt_t[h]
(angles are shared by the heads, dt is not), so that C_t . B_s sees the relative rotation
theta_t - theta_s, RoPE with data-dependent frequencies. As in mamba_ssm, single-input (SISO)
heads pair adjacent channels (2j, 2j + 1) and MIMO heads pair (j, j + N/2); pairs j >= S (the
number of angles) are not turned.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def angle_increment(angles: Tensor, dt: Tensor) -> Tensor:
    """pi * tanh(angles) * dt: angles (..., S) shared by heads, dt (..., H) -> (..., H, S)."""
    return torch.tanh(angles)[..., None, :] * dt[..., :, None] * math.pi


def rotate(t: Tensor, theta: Tensor, *, pairwise: bool) -> Tensor:
    """Turn the first S pairs of t's last dimension by theta.

    t: (..., R, H, N); theta: (..., H, S) with 2 S <= N. Pairs are (2j, 2j + 1) if `pairwise`
    (SISO) else (j, j + N/2) (MIMO).
    """
    S = theta.shape[-1]
    cos, sin = torch.cos(theta)[..., None, :, :], torch.sin(theta)[..., None, :, :]
    N = t.shape[-1]
    if pairwise:
        head, tail = t[..., : 2 * S], t[..., 2 * S :]
        a, b = head.unflatten(-1, (S, 2)).unbind(-1)
        turned = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((turned, tail), dim=-1)
    half = N // 2
    a, b = t[..., :half], t[..., half:]
    a_rot, a_pass = a[..., :S], a[..., S:]
    b_rot, b_pass = b[..., :S], b[..., S:]
    return torch.cat(
        (a_rot * cos - b_rot * sin, a_pass, a_rot * sin + b_rot * cos, b_pass), dim=-1
    )


def trapezoid(trap: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """The weights of the exponential-trapezoidal rule: (gamma, delta) = (lam dt, (1 - lam) dt).

    With lam = sigmoid(trap), a step is h_t = a_t h_{t-1} + a_t delta_t u_{t-1} + gamma_t u_t,
    u_t = x_t ⊗ B_t: the input of step t enters now with weight lam and, decayed once, with the
    rest at step t + 1 (lam = 1 is Mamba-2's exponential-Euler rule).
    """
    lam = torch.sigmoid(trap)
    return lam * dt, (1 - lam) * dt
