"""Seeded weight initialisation helpers: every draw takes an explicit generator.

The scales are width-aware: every matrix is drawn N(0, 1/fan_in) (LeCun normal), the tied
embedding table as the output head it also is (fan-in d_model, so the initial logits have unit
variance), and the projections that write into the residual stream are shrunk further by
sqrt(2 * n_layers) (GPT-2). GPT-2's fixed 0.02 is the same rule at a width of 2,500; at the
64-wide proxies a search trains, it starts every projection 6x too small: a Mamba-2 / attention
hybrid on the quickstart's MQAR reaches 0.11-0.19 accuracy in 600 steps where this init reaches
0.98-0.99 (benchmarks/bench_init.py; RESULTS.md, "Initialisation at proxy width").
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def normal_(weight: torch.Tensor, std: float, generator: torch.Generator) -> None:
    weight.normal_(0.0, std, generator=generator)


def fan_in_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """A projection stored (..., out, in): std ``1 / sqrt(in)``."""
    normal_(weight, weight.shape[-1] ** -0.5, generator)


def residual_(weight: torch.Tensor, generator: torch.Generator, *, n_layers: int) -> None:
    """A projection that writes into the residual stream: fan-in std shrunk with depth."""
    normal_(weight, weight.shape[-1] ** -0.5 / math.sqrt(2 * n_layers), generator)


@torch.no_grad()
def conv_default_(conv: nn.Conv1d, generator: torch.Generator) -> None:
    # PyTorch's Conv1d default (kaiming-uniform, a=sqrt(5)) reduces to U(+-1/sqrt(fan_in)).
    fan_in = conv.weight.shape[1] * conv.weight.shape[2]
    bound = 1.0 / math.sqrt(fan_in)
    conv.weight.uniform_(-bound, bound, generator=generator)
    if conv.bias is not None:
        conv.bias.uniform_(-bound, bound, generator=generator)


# Mamba's dt init range and floor; exporters write them where a format's config has them.
DT_MIN = 1e-3
DT_MAX = 0.1
DT_FLOOR = 1e-4


@torch.no_grad()
def dt_bias_(
    bias: torch.Tensor,
    generator: torch.Generator,
    *,
    dt_min: float = DT_MIN,
    dt_max: float = DT_MAX,
    dt_floor: float = DT_FLOOR,
) -> None:
    """Mamba's dt init: softplus(bias) is log-uniform in [dt_min, dt_max]."""
    u = torch.rand(bias.shape, generator=generator, dtype=torch.float64)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    # Inverse of softplus: x = dt + log(1 - exp(-dt)).
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))
