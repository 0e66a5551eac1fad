"""Causal attention with grouped KV heads, RoPE, optional sliding window and a KV cache.

Names follow mamba_ssm's ``MHA`` (one fused ``in_proj`` for q, k, v; ``out_proj``), without biases.
The attention kernel is chosen by :func:`attention_backend`: FlashAttention (``flash_attn``) on
CUDA with half precision when it is installed, torch SDPA otherwise; ``HYBRIDLAB_ATTENTION`` forces
one, and forcing an unavailable one is an error, not a fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.cache import AttentionCache
from hybridlab.errors import ConfigError
from hybridlab.layers.init import fan_in_, residual_
from hybridlab.layers.registry import LayerType, register
from hybridlab.layers.spec import LayerSpec


@dataclass(frozen=True, kw_only=True)
class AttentionSpec(LayerSpec):
    """Causal multi-head attention with grouped KV heads, RoPE and an optional sliding window."""

    type: ClassVar[str] = "attention"
    symbol: ClassVar[str] = "*"
    n_heads: int = 4
    # None means n_heads (plain multi-head attention).
    n_kv_heads: int | None = None
    # None means d_model // n_heads.
    head_dim: int | None = None
    rope: bool = True
    rope_theta: float = 10000.0
    sliding_window: int | None = None

    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def resolved_head_dim(self, d_model: int) -> int:
        return d_model // self.n_heads if self.head_dim is None else self.head_dim

    def check_sizes(self, d_model: int, where: str) -> None:
        if self.n_heads % self.kv_heads():
            raise ConfigError(
                f"{where}.n_kv_heads",
                f"n_heads = {self.n_heads} must be divisible by n_kv_heads = {self.kv_heads()}",
            )
        if self.head_dim is None and d_model % self.n_heads:
            raise ConfigError(
                f"{where}.n_heads",
                f"d_model = {d_model} must be divisible by n_heads = {self.n_heads} "
                "when head_dim is not given",
            )
        if self.rope and self.resolved_head_dim(d_model) % 2:
            raise ConfigError(
                f"{where}.head_dim",
                f"RoPE needs an even head_dim, got {self.resolved_head_dim(d_model)}",
            )

    def params(self, d_model: int) -> int:
        hd, h, kv = self.resolved_head_dim(d_model), self.n_heads, self.kv_heads()
        return d_model * hd * (h + 2 * kv) + h * hd * d_model

    def flops(self, d_model: int, context: int, *, decode: bool = False) -> float:
        hd, h = self.resolved_head_dim(d_model), self.n_heads
        keys = attended_keys(context, self.sliding_window, decode=decode)
        # Scores and the weighted sum: 4 * n_heads * head_dim per attended key.
        return 2 * self.params(d_model) + 4 * h * hd * keys

    def state_bytes(self, d_model: int, context: int, *, cache_bytes: int) -> int:
        tokens = min(context, self.sliding_window or context)
        return 2 * tokens * self.kv_heads() * self.resolved_head_dim(d_model) * cache_bytes

    def semantics(self, d_model: int) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "n_heads": self.n_heads, "n_kv_heads": self.kv_heads(),
            "head_dim": self.resolved_head_dim(d_model), "rope": self.rope,
        }
        if self.rope:
            settings["rope_theta"] = self.rope_theta
        settings["sliding_window"] = self.sliding_window
        return settings

    def width(self, d_model: int) -> int:
        return self.n_heads * self.resolved_head_dim(d_model)

    def width_step(self, d_model: int) -> int:
        # kv * d_new / d must be whole; then n_heads = GQA ratio * kv is too.
        return d_model // math.gcd(d_model, self.kv_heads())

    def stretched(self, *, d_from: int, d_to: int, scale_d_state: bool) -> AttentionSpec:
        kv = self.kv_heads() * d_to // d_from
        group = self.n_heads // self.kv_heads()
        return dataclasses.replace(self, n_heads=kv * group,
                                   n_kv_heads=None if self.n_kv_heads is None else kv)


def attended_keys(context: int, window: int | None, *, decode: bool = False) -> float:
    """Keys a token attends to: averaged over positions 1..context, or at position context+1."""
    if decode:
        return float(min(context + 1, window or context + 1))
    if window is None or window >= context:
        return (context + 1) / 2
    # Positions 1..W attend to t keys, positions W+1..L to W keys.
    return (window * (window + 1) / 2 + (context - window) * window) / context

AttentionBackend = Literal["sdpa", "flash"]
_log = logging.getLogger("hybridlab.attention")


@functools.cache
def _flash_attn_func():
    """flash_attn's ``flash_attn_func``, or None when the package is not installed (CPU hosts)."""
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except ImportError:
        return None


@functools.cache
def _announce(device_type: str, dtype: torch.dtype, backend: str) -> None:
    _log.info("attention backend on %s/%s: %s", device_type, dtype, backend)


def attention_backend(device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """Pick the attention kernel for tensors on ``device`` of ``dtype``."""
    forced = os.environ.get("HYBRIDLAB_ATTENTION")
    flash_ok = (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and _flash_attn_func() is not None
    )
    if forced is not None:
        if forced not in ("sdpa", "flash"):
            raise ValueError(f"HYBRIDLAB_ATTENTION={forced!r}: expected 'sdpa' or 'flash'")
        if forced == "flash" and not flash_ok:
            raise RuntimeError(
                "HYBRIDLAB_ATTENTION=flash needs a CUDA device, fp16/bf16 tensors and the "
                f"flash_attn package (device={device.type}, dtype={dtype}, "
                f"flash_attn installed={_flash_attn_func() is not None})"
            )
        backend: AttentionBackend = forced  # type: ignore[assignment]
    else:
        backend = "flash" if flash_ok else "sdpa"
    _announce(device.type, dtype, backend)
    return backend


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE (GPT-NeoX style). x: (B, L, H, hd), positions: (L,)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(0, half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (L, hd/2)
    cos = angles.cos()[None, :, None, :]
    sin = angles.sin()[None, :, None, :]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d_model: int, spec: AttentionSpec) -> None:
        super().__init__()
        self.n_heads = spec.n_heads
        self.n_kv_heads = spec.kv_heads()
        self.head_dim = spec.resolved_head_dim(d_model)
        self.rope = spec.rope
        self.rope_theta = spec.rope_theta
        self.window = spec.sliding_window
        qkv_dim = self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        self.in_proj = nn.Linear(d_model, qkv_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)

    def reset_parameters(self, generator: torch.Generator, *, n_layers: int) -> None:
        fan_in_(self.in_proj.weight, generator)
        residual_(self.out_proj.weight, generator, n_layers=n_layers)

    def cache_slots(self, max_seqlen: int) -> int:
        return max_seqlen if self.window is None else min(max_seqlen, self.window)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, *, device: torch.device, dtype: torch.dtype
    ) -> AttentionCache:
        shape = (batch_size, self.cache_slots(max_seqlen), self.n_kv_heads, self.head_dim)
        return AttentionCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
        )

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        batch, seqlen, _ = x.shape
        q, k, v = self.in_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
             self.n_kv_heads * self.head_dim], dim=-1,
        )
        q = q.view(batch, seqlen, self.n_heads, self.head_dim)
        k = k.view(batch, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seqlen, self.n_kv_heads, self.head_dim)
        if self.rope:
            q = rotary(q, positions, self.rope_theta)
            k = rotary(k, positions, self.rope_theta)
        return q, k, v

    def forward(self, x: torch.Tensor, *, cache: AttentionCache | None = None) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        if cache is not None and cache.seqlen:
            raise ValueError("forward(cache=...) prefills an empty cache; use step() to continue")
        q, k, v = self._qkv(x, torch.arange(seqlen, device=x.device))
        if cache is not None:
            self._prefill(cache, k, v)
        if attention_backend(x.device, q.dtype) == "flash":
            window = (-1, -1) if self.window is None else (self.window - 1, 0)
            out = _flash_attn_func()(q, k, v, causal=True, window_size=window)
        else:
            out = self._sdpa(q, k, v, self._mask(seqlen, x.device))
        return self.out_proj(out.reshape(batch, seqlen, -1))

    def _prefill(self, cache: AttentionCache, k: torch.Tensor, v: torch.Tensor) -> None:
        seqlen = k.shape[1]
        if self.window is None and seqlen > cache.slots:
            raise ValueError(f"prompt of {seqlen} tokens exceeds the cache's {cache.slots} slots")
        keep = min(seqlen, cache.slots)
        positions = torch.arange(seqlen - keep, seqlen, device=k.device)
        # Slot = position mod slots: a ring buffer; order is irrelevant since RoPE is already in k.
        cache.k[:, positions % cache.slots] = k[:, -keep:].to(cache.k.dtype)
        cache.v[:, positions % cache.slots] = v[:, -keep:].to(cache.v.dtype)
        cache.seqlen = seqlen

    def _mask(self, seqlen: int, device: torch.device) -> torch.Tensor | None:
        if self.window is None:
            return None
        i = torch.arange(seqlen, device=device)
        distance = i[:, None] - i[None, :]
        return (distance >= 0) & (distance < self.window)  # (L, L), True = attend

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
        *, causal: bool = True,
    ) -> torch.Tensor:
        """q: (B, Lq, H, hd), k/v: (B, Lk, Hkv, hd) -> (B, Lq, H, hd)."""
        repeat = self.n_heads // self.n_kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2)

    def step(self, x: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        """x: (B, d_model) -> (B, d_model), attending to the cache plus this token."""
        position = cache.seqlen
        if self.window is None and position >= cache.slots:
            raise ValueError(f"KV cache is full ({cache.slots} tokens); allocate a longer cache")
        q, k, v = self._qkv(x[:, None], torch.tensor([position], device=x.device))
        slot = position % cache.slots
        cache.k[:, slot] = k[:, 0].to(cache.k.dtype)
        cache.v[:, slot] = v[:, 0].to(cache.v.dtype)
        cache.seqlen = position + 1
        filled = min(position + 1, cache.slots)
        keys = cache.k[:, :filled].to(q.dtype)
        values = cache.v[:, :filled].to(q.dtype)
        out = self._sdpa(q, keys, values, None, causal=False)  # every cached slot is visible
        return self.out_proj(out.reshape(x.shape[0], -1))


register(LayerType(
    spec=AttentionSpec, build=lambda spec, d_model, eps: Attention(d_model, spec),
    label="attention", colour="#f97316", mixes_sequence=True,
))
