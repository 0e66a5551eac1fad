"""Parallel hybrid block (``parallel``, ``P``): attention and SSM heads side by side in one layer.

Both branches read the same pre-normed input and their outputs are combined before the block's
single residual, in one of the two published ways:

- ``combine: sum`` (Falcon-H1, arXiv 2507.22448): ``attention_scale * attn(x) + ssm_scale *
  ssm(x)``, fixed multipliers (Falcon-H1's ``attention_out_multiplier`` / ``ssm_out_multiplier``).
- ``combine: mean`` (Hymba, arXiv 2411.13676): ``(norm_a(attn(x)) + norm_s(ssm(x))) / 2`` with an
  RMSNorm per branch whose weight is the learnable per-channel scale (Hymba's beta_1, beta_2).
  Hymba normalises before one shared output projection; here each branch keeps its own
  projection (the branch modules are the stack's Attention and Mamba layers, unchanged), and the
  norms act on the projected outputs.

Each branch keeps its own sizes: the spec's attention fields (``n_heads`` ...) make an
``AttentionSpec``, its SSM fields (``ssm`` picks Mamba-2 or Mamba-1) a ``Mamba2Spec`` or
``Mamba1Spec``; fields of the other SSM (``headdim``, ``ngroups``, ``chunk_size`` for Mamba-2,
``dt_rank`` for Mamba-1) are ignored. Cost and inference state are those of the two branches,
plus the mean's two norm weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from hybridlab.layers.attention import Attention, AttentionSpec
from hybridlab.layers.mamba1 import Mamba1, Mamba1Spec
from hybridlab.layers.mamba2 import Mamba2, Mamba2Spec
from hybridlab.layers.norm import RMSNorm
from hybridlab.layers.registry import LayerType, register
from hybridlab.layers.spec import LayerSpec


@dataclass(frozen=True, kw_only=True)
class ParallelSpec(LayerSpec):
    """Attention heads and Mamba heads on the same input, combined, one residual."""

    type: ClassVar[str] = "parallel"
    symbol: ClassVar[str] = "P"
    words: ClassVar[dict[str, tuple[str, ...]]] = {
        "ssm": ("mamba2", "mamba1"), "combine": ("sum", "mean")}
    ssm: str = "mamba2"
    combine: str = "sum"
    attention_scale: float = 1.0
    ssm_scale: float = 1.0
    # The attention branch (AttentionSpec's fields).
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    rope: bool = True
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    # The SSM branch (Mamba2Spec's or Mamba1Spec's fields).
    d_state: int = 64
    expand: int = 2
    d_conv: int = 4
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64
    dt_rank: int | Literal["auto"] = "auto"

    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec(
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            rope=self.rope, rope_theta=self.rope_theta, sliding_window=self.sliding_window)

    def ssm_spec(self) -> Mamba2Spec | Mamba1Spec:
        if self.ssm == "mamba1":
            return Mamba1Spec(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                              dt_rank=self.dt_rank)
        return Mamba2Spec(d_state=self.d_state, headdim=self.headdim, expand=self.expand,
                          ngroups=self.ngroups, d_conv=self.d_conv, chunk_size=self.chunk_size)

    def branches(self) -> tuple[AttentionSpec, Mamba2Spec | Mamba1Spec]:
        return self.attention_spec(), self.ssm_spec()

    def check_sizes(self, d_model: int, where: str) -> None:
        # Words first: ssm_spec() reads ``ssm``.
        for spec in self.branches():
            spec.check(d_model, where)

    def combine_params(self, d_model: int) -> int:
        return 2 * d_model if self.combine == "mean" else 0

    def params(self, d_model: int) -> int:
        return sum(s.params(d_model) for s in self.branches()) + self.combine_params(d_model)

    def flops(self, d_model: int, context: int, *, decode: bool = False) -> float:
        # The combination is elementwise (O(d_model)), which the cost model does not count.
        return sum(s.flops(d_model, context, decode=decode) for s in self.branches())

    def state_bytes(self, d_model: int, context: int, *, cache_bytes: int) -> int:
        return sum(s.state_bytes(d_model, context, cache_bytes=cache_bytes)
                   for s in self.branches())

    def semantics(self, d_model: int) -> dict[str, Any]:
        attention, ssm = self.branches()
        settings: dict[str, Any] = {
            "combine": self.combine, "attention": attention.semantics(d_model),
            "ssm": {"type": ssm.type, **ssm.semantics(d_model)}}
        if self.combine == "sum":
            settings["scales"] = (self.attention_scale, self.ssm_scale)
        return settings

    def width(self, d_model: int) -> int:
        return sum(s.width(d_model) for s in self.branches())

    def width_step(self, d_model: int) -> int:
        return math.lcm(*(s.width_step(d_model) for s in self.branches()))

    def stretched(self, *, d_from: int, d_to: int, scale_d_state: bool) -> ParallelSpec:
        attention, ssm = (s.stretched(d_from=d_from, d_to=d_to, scale_d_state=scale_d_state)
                          for s in self.branches())
        return dataclasses.replace(
            self, n_heads=attention.n_heads, n_kv_heads=attention.n_kv_heads,
            d_state=ssm.d_state, dt_rank=getattr(ssm, "dt_rank", self.dt_rank))


@dataclass
class ParallelCache:
    attention: Any  # AttentionCache
    ssm: Any  # MambaCache

    def tensors(self) -> list[torch.Tensor]:
        return [*self.attention.tensors(), *self.ssm.tensors()]


class Parallel(nn.Module):
    def __init__(self, d_model: int, spec: ParallelSpec, *, eps: float = 1e-5) -> None:
        super().__init__()
        attention, ssm = spec.branches()
        self.combine = spec.combine
        self.attention_scale = spec.attention_scale
        self.ssm_scale = spec.ssm_scale
        self.attention = Attention(d_model, attention)
        self.ssm = (Mamba2(d_model, ssm, eps=eps) if isinstance(ssm, Mamba2Spec)
                    else Mamba1(d_model, ssm))
        self.attention_norm: RMSNorm | None = None
        self.ssm_norm: RMSNorm | None = None
        if spec.combine == "mean":
            self.attention_norm = RMSNorm(d_model, eps=eps)
            self.ssm_norm = RMSNorm(d_model, eps=eps)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, *, n_layers: int) -> None:
        self.attention.reset_parameters(generator, n_layers=n_layers)
        self.ssm.reset_parameters(generator, n_layers=n_layers)
        for norm in (self.attention_norm, self.ssm_norm):
            if norm is not None:
                norm.reset_parameters()

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, *, device: torch.device, dtype: torch.dtype
    ) -> ParallelCache:
        return ParallelCache(
            attention=self.attention.allocate_cache(batch_size, max_seqlen, device=device,
                                                    dtype=dtype),
            ssm=self.ssm.allocate_cache(batch_size, max_seqlen, device=device, dtype=dtype))

    def _combine(self, attended: torch.Tensor, scanned: torch.Tensor) -> torch.Tensor:
        if self.attention_norm is not None and self.ssm_norm is not None:
            return (self.attention_norm(attended) + self.ssm_norm(scanned)) / 2
        return self.attention_scale * attended + self.ssm_scale * scanned

    def forward(self, x: torch.Tensor, *, cache: ParallelCache | None = None) -> torch.Tensor:
        """x: (B, L, d_model) -> (B, L, d_model); fills ``cache`` when given."""
        attended = self.attention(x, cache=None if cache is None else cache.attention)
        scanned = self.ssm(x, cache=None if cache is None else cache.ssm)
        return self._combine(attended, scanned)

    def step(self, x: torch.Tensor, cache: ParallelCache) -> torch.Tensor:
        """x: (B, d_model) -> (B, d_model); advances both branches' caches by one token."""
        return self._combine(self.attention.step(x, cache.attention),
                             self.ssm.step(x, cache.ssm))


register(LayerType(
    spec=ParallelSpec, build=lambda spec, d_model, eps: Parallel(d_model, spec, eps=eps),
    label="parallel attn+SSM", colour="#16a34a", mixes_sequence=True,
    refused={
        "mamba_ssm": "mamba_ssm's MambaLMHeadModel runs one mixer per block, not attention and "
                     "SSM heads side by side",
        "megatron": "Megatron's hybrid layer pattern has no layer with attention and Mamba "
                    "heads in parallel",
        "hf": "no HF flavour for parallel blocks yet (FalconH1 writes every layer as one, with "
              "an MLP inside the same block)",
    },
))
