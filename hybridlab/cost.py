"""Cost model of a hybrid: parameters, FLOPs per token and inference-state bytes at context L.

Computed from the config alone (no model is built), so a search can price a candidate before
training it; each layer type prices itself (its spec's ``params``, ``flops``, ``state_bytes``, in
its module), and this module adds the embedding and head. Conventions:

- FLOPs count 2 per multiply-add of every matmul and convolution, plus the SSM recurrences:
  Mamba-1 at 9 * d_inner * d_state per token (the Mamba paper's count for the selective scan) and
  Mamba-2 at 6 * d_inner * d_state (decay, dt-scaled x outer B, add, and C contraction, per state
  element). Attention scores and the weighted sum cost 4 * n_heads * head_dim per attended key.
  Routed layers (mixture of experts) count the experts a token passes through. Norms,
  activations and the embedding lookup are ignored (they are O(d_model) per token).
- ``flops_per_token(config, L)`` is the forward cost averaged over the positions of a sequence of
  length L (a token at position t attends to min(t, window) keys); ``decode=True`` gives the cost
  of decoding one token after L tokens of context. Training costs about 3x the forward.
- Parameters: ``param_count`` is every parameter, ``active_param_count`` those one token passes
  through (equal unless the model routes).
- Inference state: attention keeps K and V for min(L, window) tokens in the cache dtype; Mamba
  layers keep a conv window in the cache dtype and an fp32 SSM state, independent of L.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hybridlab.config import ArchConfig, LayerSpec


@dataclass(frozen=True)
class LayerCost:
    index: int
    type: str
    params: int
    active_params: int
    flops_per_token: float
    state_bytes: int


@dataclass(frozen=True)
class ModelCost:
    context: int
    params: int
    active_params: int
    flops_per_token: float
    state_bytes: int
    layers: tuple[LayerCost, ...]


def layer_params(spec: LayerSpec, d_model: int) -> int:
    """Parameters of one block: its layer plus the block's pre-norm weight."""
    return spec.params(d_model) + d_model


def _embedding_params(config: ArchConfig) -> int:
    d, v = config.d_model, config.vocab_size
    return v * d + d + (0 if config.tie_embeddings else v * d)


def param_count(config: ArchConfig) -> int:
    return _embedding_params(config) + sum(layer_params(s, config.d_model) for s in config.layers)


def active_param_count(config: ArchConfig) -> int:
    """Parameters one token passes through: the experts it is routed to, not all of them."""
    d = config.d_model
    return _embedding_params(config) + sum(s.active_params(d) + d for s in config.layers)


def flops_per_token(config: ArchConfig, context: int, *, decode: bool = False) -> float:
    """Forward FLOPs per token at context length ``context`` (see the module docstring)."""
    _check_context(context)
    layers = sum(s.flops(config.d_model, context, decode=decode) for s in config.layers)
    return layers + 2 * config.d_model * config.vocab_size


def inference_state_bytes(
    config: ArchConfig, context: int, *, dtype: torch.dtype = torch.bfloat16, batch_size: int = 1
) -> int:
    _check_context(context)
    size = dtype.itemsize
    return batch_size * sum(
        s.state_bytes(config.d_model, context, cache_bytes=size) for s in config.layers
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
            active_params=spec.active_params(d) + d,
            flops_per_token=spec.flops(d, context),
            state_bytes=spec.state_bytes(d, context, cache_bytes=dtype.itemsize),
        )
        for i, spec in enumerate(config.layers)
    )
    return ModelCost(
        context=context,
        params=param_count(config),
        active_params=active_param_count(config),
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
