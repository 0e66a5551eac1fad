"""HybridLM: embedding -> [pre-norm block + residual] x N -> final norm -> LM head.

Module names mirror mamba_ssm's ``MambaLMHeadModel`` (``backbone.embedding``,
``backbone.layers.{i}.norm`` / ``.mixer``, ``backbone.norm_f``, ``lm_head``) so weights can move
between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.cache import InferenceCache
from hybridlab.config import ArchConfig
from hybridlab.layers import RMSNorm, build_layer
from hybridlab.layers.init import fan_in_


class Block(nn.Module):
    """Owns the residual and the pre-norm: x + mixer(norm(x))."""

    def __init__(self, mixer: nn.Module, d_model: int, *, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps=eps)
        self.mixer = mixer

    def forward(self, x: torch.Tensor, *, cache=None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), cache=cache)

    def step(self, x: torch.Tensor, cache) -> torch.Tensor:
        return x + self.mixer.step(self.norm(x), cache)


class Backbone(nn.Module):
    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        eps = config.norm_eps
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(build_layer(spec, config.d_model, eps=eps), config.d_model, eps=eps)
            for spec in config.layers
        )
        self.norm_f = RMSNorm(config.d_model, eps=eps)


class HybridLM(nn.Module):
    def __init__(self, config: ArchConfig, *, seed: int = 0, device: str | torch.device = "cpu"):
        """Build and initialise from ``seed``; the same config and seed give the same weights."""
        super().__init__()
        self.config = config
        # Built on the meta device, then initialised from one explicit generator, so no draw
        # touches (or depends on) the global RNG.
        with torch.device("meta"):
            self.backbone = Backbone(config)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.to_empty(device="cpu")
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.reset_parameters(torch.Generator().manual_seed(seed))
        self.to(device)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        fan_in_(self.backbone.embedding.weight, generator)
        for block in self.backbone.layers:
            block.norm.reset_parameters()
            block.mixer.reset_parameters(generator, n_layers=self.config.n_layers)
        self.backbone.norm_f.reset_parameters()
        if not self.config.tie_embeddings:
            fan_in_(self.lm_head.weight, generator)

    @property
    def device(self) -> torch.device:
        return self.backbone.embedding.weight.device

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, *, dtype: torch.dtype | None = None
    ) -> InferenceCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seqlen`` tokens."""
        dtype = dtype or self.backbone.embedding.weight.dtype
        entries = [
            block.mixer.allocate_cache(batch_size, max_seqlen, device=self.device, dtype=dtype)
            for block in self.backbone.layers
        ]
        return InferenceCache(layers=entries, max_seqlen=max_seqlen)

    def forward(
        self, input_ids: torch.Tensor, *, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        """input_ids: (B, L) -> logits (B, L, vocab).

        With an empty ``cache`` the sequence is processed in parallel and the cache filled
        (prefill); with a non-empty one the tokens are fed one by one through ``step``.
        """
        if cache is not None and cache.seqlen:
            return torch.stack([self.step(input_ids[:, t], cache) for t in
                                range(input_ids.shape[1])], dim=1)
        return self.lm_head(self.hidden_states(input_ids, cache=cache))

    def hidden_states(
        self, input_ids: torch.Tensor, *, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        """input_ids: (B, L) -> final-norm hidden states (B, L, d_model), before the LM head.

        Training on tasks scored at a few positions applies ``lm_head`` to those rows only.
        """
        hidden = self.backbone.embedding(input_ids)  # (B, L, d_model)
        for i, block in enumerate(self.backbone.layers):
            hidden = block(hidden, cache=None if cache is None else cache.layers[i])
        if cache is not None:
            cache.seqlen = input_ids.shape[1]
        return self.backbone.norm_f(hidden)

    def step(self, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One decoding step: input_ids (B,) -> logits (B, vocab); advances ``cache``."""
        if cache.seqlen >= cache.max_seqlen:
            raise ValueError(f"cache holds at most {cache.max_seqlen} tokens")
        hidden = self.backbone.embedding(input_ids)  # (B, d_model)
        for block, entry in zip(self.backbone.layers, cache.layers, strict=True):
            hidden = block.step(hidden, entry)
        cache.seqlen += 1
        return self.lm_head(self.backbone.norm_f(hidden))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue ``input_ids`` (B, L) by ``max_new_tokens``; greedy when temperature is 0.

        Sampling draws from a generator seeded with ``seed``. Without the cache every step reruns
        the full sequence (slow; it exists as the reference that cached decoding must match).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens = input_ids
        if max_new_tokens == 0:
            return tokens
        cache = None
        if use_cache:
            cache = self.allocate_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens)
            logits = self.forward(tokens, cache=cache)[:, -1]
        else:
            logits = self.forward(tokens)[:, -1]
        for i in range(max_new_tokens):
            next_token = _pick(logits.float(), temperature, top_k, generator)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if i == max_new_tokens - 1:
                break
            if cache is not None:
                logits = self.step(next_token, cache)
            else:
                logits = self.forward(tokens)[:, -1]
        return tokens


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
