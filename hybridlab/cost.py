"""Cost model of a hybrid: parameters, FLOPs per token and inference-state bytes at context L.

Computed from the config alone (no model is built), so a search can price a candidate before
training it. Conventions:

- FLOPs count 2 per multiply-add of every matmul and convolution, plus the SSM recurrences:
  Mamba-1 at 9 * d_inner * d_state per token (the Mamba paper's count for the selective scan) and
  Mamba-2 at 6 * d_inner * d_state (decay, dt-scaled x outer B, add, and C contraction, per state
  element). Attention scores and the weighted sum cost 4 * n_heads * head_dim per attended key.
  Norms, activations and the embedding lookup are ignored (they are O(d_model) per token).
- ``flops_per_token(config, L)`` is the forward cost averaged over the positions of a sequence of
  length L (a token at position t attends to min(t, window) keys); ``decode=True`` gives the cost
  of decoding one token after L tokens of context. Training costs about 3x the forward.
- Inference state: attention keeps K and V for min(L, window) tokens in the cache dtype; Mamba
  layers keep a conv window in the cache dtype and an fp32 SSM state, independent of L.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hybridlab.config import (
    ArchConfig,
    AttentionSpec,
    LayerSpec,
    Mamba1Spec,
    Mamba2Spec,
    MLPSpec,
)

SSM_STATE_BYTES = 4  # the SSM state is always float32
MAMBA1_SCAN_FLOPS = 9
MAMBA2_SCAN_FLOPS = 6


@dataclass(frozen=True)
class LayerCost:
    index: int
    type: str
    params: int
    flops_per_token: float
    state_bytes: int


@dataclass(frozen=True)
class ModelCost:
    context: int
    params: int
    flops_per_token: float
    state_bytes: int
    layers: tuple[LayerCost, ...]


def layer_params(spec: LayerSpec, d_model: int) -> int:
    """Parameters of one block: its mixer plus the block's pre-norm weight."""
    return _mixer_params(spec, d_model) + d_model


def _mixer_params(spec: LayerSpec, d: int) -> int:
    if isinstance(spec, Mamba1Spec):
        di, n, r, k = spec.d_inner(d), spec.d_state, spec.resolved_dt_rank(d), spec.d_conv
        in_proj, conv = d * 2 * di, di * k + di
        x_proj, dt_proj = di * (r + 2 * n), r * di + di
        return in_proj + conv + x_proj + dt_proj + di * n + di + di * d
    if isinstance(spec, Mamba2Spec):
        di, h, cd = spec.d_inner(d), spec.nheads(d), spec.conv_dim(d)
        in_proj, conv = d * (di + cd + h), cd * spec.d_conv + cd
        return in_proj + conv + 3 * h + di + di * d
    if isinstance(spec, AttentionSpec):
        hd, h, kv = spec.resolved_head_dim(d), spec.n_heads, spec.kv_heads()
        return d * hd * (h + 2 * kv) + h * hd * d
    if isinstance(spec, MLPSpec):
        return 3 * d * spec.d_hidden(d)
    raise TypeError(f"unknown layer spec {spec!r}")


def param_count(config: ArchConfig) -> int:
    d, v = config.d_model, config.vocab_size
    head = 0 if config.tie_embeddings else v * d
    return v * d + sum(layer_params(s, d) for s in config.layers) + d + head


def attended_keys(context: int, window: int | None, *, decode: bool = False) -> float:
    """Keys a token attends to: averaged over positions 1..context, or at position context+1."""
    if decode:
        return float(min(context + 1, window or context + 1))
    if window is None or window >= context:
        return (context + 1) / 2
    # Positions 1..W attend to t keys, positions W+1..L to W keys.
    return (window * (window + 1) / 2 + (context - window) * window) / context


def layer_flops(spec: LayerSpec, d: int, context: int, *, decode: bool = False) -> float:
    if isinstance(spec, Mamba1Spec):
        di, n, r = spec.d_inner(d), spec.d_state, spec.resolved_dt_rank(d)
        matmuls = d * 2 * di + di * (r + 2 * n) + r * di + di * d
        return 2 * matmuls + 2 * di * spec.d_conv + MAMBA1_SCAN_FLOPS * di * n
    if isinstance(spec, Mamba2Spec):
        di, h, cd = spec.d_inner(d), spec.nheads(d), spec.conv_dim(d)
        matmuls = d * (di + cd + h) + di * d
        return 2 * matmuls + 2 * cd * spec.d_conv + MAMBA2_SCAN_FLOPS * di * spec.d_state
    if isinstance(spec, AttentionSpec):
        hd, h, kv = spec.resolved_head_dim(d), spec.n_heads, spec.kv_heads()
        projections = 2 * (d * hd * (h + 2 * kv) + h * hd * d)
        keys = attended_keys(context, spec.sliding_window, decode=decode)
        return projections + 4 * h * hd * keys
    if isinstance(spec, MLPSpec):
        return 2 * 3 * d * spec.d_hidden(d)
    raise TypeError(f"unknown layer spec {spec!r}")


def flops_per_token(config: ArchConfig, context: int, *, decode: bool = False) -> float:
    """Forward FLOPs per token at context length ``context`` (see the module docstring)."""
    _check_context(context)
    layers = sum(layer_flops(s, config.d_model, context, decode=decode) for s in config.layers)
    return layers + 2 * config.d_model * config.vocab_size


def layer_state_bytes(spec: LayerSpec, d: int, context: int, *, cache_bytes: int) -> int:
    """Decoding state of one layer after ``context`` tokens, for one sequence."""
    if isinstance(spec, Mamba1Spec):
        di = spec.d_inner(d)
        return di * spec.d_conv * cache_bytes + di * spec.d_state * SSM_STATE_BYTES
    if isinstance(spec, Mamba2Spec):
        ssm = spec.nheads(d) * spec.headdim * spec.d_state
        return spec.conv_dim(d) * spec.d_conv * cache_bytes + ssm * SSM_STATE_BYTES
    if isinstance(spec, AttentionSpec):
        tokens = min(context, spec.sliding_window or context)
        return 2 * tokens * spec.kv_heads() * spec.resolved_head_dim(d) * cache_bytes
    if isinstance(spec, MLPSpec):
        return 0
    raise TypeError(f"unknown layer spec {spec!r}")


def inference_state_bytes(
    config: ArchConfig, context: int, *, dtype: torch.dtype = torch.bfloat16, batch_size: int = 1
) -> int:
    _check_context(context)
    size = dtype.itemsize
    return batch_size * sum(
        layer_state_bytes(s, config.d_model, context, cache_bytes=size) for s in config.layers
    )


def cost_report(
    config: ArchConfig, context: int, *, dtype: torch.dtype = torch.bfloat16
) -> ModelCost:
    """Per-layer and total cost at ``context`` tokens, state in ``dtype`` (SSM state fp32)."""
    _check_context(context)
    d = config.d_model
    layers = tuple(
        LayerCost(
            index=i,
            type=spec.type,
            params=layer_params(spec, d),
            flops_per_token=layer_flops(spec, d, context),
            state_bytes=layer_state_bytes(spec, d, context, cache_bytes=dtype.itemsize),
        )
        for i, spec in enumerate(config.layers)
    )
    return ModelCost(
        context=context,
        params=param_count(config),
        flops_per_token=flops_per_token(config, context),
        state_bytes=sum(layer.state_bytes for layer in layers),
        layers=layers,
    )


@torch.no_grad()
def measure_tokens_per_second(
    model: torch.nn.Module,
    *,
    batch_size: int,
    seqlen: int,
    repeats: int = 3,
    seed: int = 0,
) -> float:
    """Median forward throughput (tokens/s) of ``model`` on random tokens, after one warm-up."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    tokens = torch.randint(vocab, (batch_size, seqlen), generator=generator).to(model.device)
    model(tokens)
    timings = []
    for _ in range(repeats):
        if tokens.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(tokens)
        if tokens.is_cuda:
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    timings.sort()
    return batch_size * seqlen / timings[len(timings) // 2]


def _check_context(context: int) -> None:
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive integer, got {context!r}")
