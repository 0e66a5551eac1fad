"""Causal depthwise conv1d shared by both Mamba mixers: full sequence and one decoding step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_conv1d(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """x: (B, C, L) -> (B, C, L); output t sees inputs t-d_conv+1 .. t only."""
    width = conv.weight.shape[-1]
    return F.conv1d(F.pad(x, (width - 1, 0)), conv.weight, conv.bias, groups=conv.groups)


def last_inputs(x: torch.Tensor, width: int) -> torch.Tensor:
    """The conv state after a prefill: the last ``width`` inputs, zero-padded on the left."""
    seqlen = x.shape[-1]
    if seqlen >= width:
        return x[..., -width:]
    return F.pad(x, (width - seqlen, 0))


def conv_step(conv: nn.Conv1d, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shift ``x`` (B, C) into ``state`` (B, C, d_conv) in place; return the conv output (B, C)."""
    state.copy_(torch.roll(state, shifts=-1, dims=-1))
    state[:, :, -1] = x.to(state.dtype)
    out = (state.to(conv.weight.dtype) * conv.weight[:, 0, :]).sum(-1)
    return out if conv.bias is None else out + conv.bias
