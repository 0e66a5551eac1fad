"""Inference cache: what each layer keeps between decoding steps.

Attention keeps keys and values (a ring buffer of ``sliding_window`` slots when windowed, so the
cache stops growing); Mamba layers keep a fixed-size convolution window and SSM state, whatever the
context length. The SSM state is float32 because it accumulates over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class AttentionCache:
    k: torch.Tensor  # (B, slots, n_kv_heads, head_dim); RoPE already applied
    v: torch.Tensor  # (B, slots, n_kv_heads, head_dim)
    seqlen: int = 0  # tokens seen so far; the next token's position

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]


@dataclass
class MambaCache:
    conv_state: torch.Tensor  # (B, conv channels, d_conv): the last d_conv conv inputs
    ssm_state: torch.Tensor  # mamba1: (B, d_inner, d_state); mamba2: (B, nheads, headdim, d_state)

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv_state, self.ssm_state]


class LayerCache(Protocol):
    """What a layer keeps between decoding steps (a layer without state keeps None)."""

    def tensors(self) -> list[torch.Tensor]: ...


@dataclass
class InferenceCache:
    """One entry per layer (None for layers without state, such as MLPs)."""

    layers: list[LayerCache | None]
    max_seqlen: int
    seqlen: int = 0
    tensors: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.tensors = [t for entry in self.layers if entry is not None for t in entry.tensors()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
