"""Mixture-of-experts MLP (``moe``, Megatron's ``E``): top-k routed SwiGLU experts.

A bias-free router scores ``n_experts`` per token; the softmax (in at least float32) picks the
``top_k`` most probable experts and their probabilities, renormalised to sum to 1, weight their
outputs (Mixtral's routing; Megatron's default "top-k then softmax" is the same function).
``n_shared_experts`` experts of the same width, which every token passes through (DeepSeek- and
Qwen-MoE), are held as one ``GatedMLP`` ``shared_experts`` as wide as all of them together: the
hidden units of a SwiGLU are independent, so that is the sum of the separate experts.

Routing is dropless (no capacity, no token dropped): the (token, expert) assignments are sorted
by expert, each expert runs once on its contiguous slice of gathered token rows (Megatron's
SequentialMLP), and the weighted rows are scatter-added back. Expert weights are stacked,
``w1: (n_experts, 2 * hidden, d_model)`` ([value; gate], as ``GatedMLP.fc1``) and
``w2: (n_experts, d_model, hidden)``.

In training the forward leaves ``aux_loss`` on the module: the load-balancing loss (Switch
Transformer, Fedus et al. 2021, eq. 4, over the T * top_k assignments as in GShard / Megatron)
times ``balance_coef`` plus the router z-loss (ST-MoE, Zoph et al. 2022) times ``z_loss_coef``,
for the trainer to add to its loss; ``None`` in eval. ``load`` (detached, (n_experts,)) is the
fraction of the assignments each expert got in the last forward, in train and eval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.errors import ConfigError
from hybridlab.layers.init import fan_in_, normal_, residual_
from hybridlab.layers.mlp import GatedMLP, MLPSpec
from hybridlab.layers.registry import LayerType, register
from hybridlab.layers.spec import LayerSpec

ROUTER_INIT_SCALE = 0.1


@dataclass(frozen=True, kw_only=True)
class MoESpec(LayerSpec):
    """Top-k routed SwiGLU experts; each expert's hidden width is ``expert_multiplier *
    d_model`` rounded up to ``multiple_of``; shared experts have the same width."""

    type: ClassVar[str] = "moe"
    symbol: ClassVar[str] = "E"
    may_be_zero: ClassVar[tuple[str, ...]] = ("n_shared_experts", "balance_coef", "z_loss_coef")
    n_experts: int = 8
    top_k: int = 2
    expert_multiplier: float = 1.0
    multiple_of: int = 16
    n_shared_experts: int = 0
    balance_coef: float = 0.01
    z_loss_coef: float = 0.001

    def d_expert(self, d_model: int) -> int:
        width = math.ceil(self.expert_multiplier * d_model)
        return -(-width // self.multiple_of) * self.multiple_of

    def expert_params(self, d_model: int) -> int:
        return 3 * d_model * self.d_expert(d_model)

    def router_params(self, d_model: int) -> int:
        return d_model * self.n_experts

    def check_sizes(self, d_model: int, where: str) -> None:
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"{where}.top_k",
                f"top_k = {self.top_k} must be at most n_experts = {self.n_experts}",
            )

    def params(self, d_model: int) -> int:
        experts = self.n_experts + self.n_shared_experts
        return self.router_params(d_model) + experts * self.expert_params(d_model)

    def active_params(self, d_model: int) -> int:
        experts = self.top_k + self.n_shared_experts
        return self.router_params(d_model) + experts * self.expert_params(d_model)

    def flops(self, d_model: int, context: int, *, decode: bool = False) -> float:
        return 2 * self.active_params(d_model)

    def state_bytes(self, d_model: int, context: int, *, cache_bytes: int) -> int:
        return 0

    def semantics(self, d_model: int) -> dict[str, Any]:
        # The loss coefficients shape training only, not the function the layer computes.
        return {"n_experts": self.n_experts, "top_k": self.top_k,
                "expert_width": self.d_expert(d_model),
                "n_shared_experts": self.n_shared_experts}

    def width(self, d_model: int) -> int:
        return self.d_expert(d_model) * self.top_k


class MoE(nn.Module):
    def __init__(self, d_model: int, spec: MoESpec) -> None:
        super().__init__()
        self.n_experts = spec.n_experts
        self.top_k = spec.top_k
        self.d_hidden = spec.d_expert(d_model)
        self.balance_coef = spec.balance_coef
        self.z_loss_coef = spec.z_loss_coef
        self.router = nn.Linear(d_model, spec.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(spec.n_experts, 2 * self.d_hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(spec.n_experts, d_model, self.d_hidden))
        self.shared_experts: GatedMLP | None = None
        if spec.n_shared_experts:
            shared = spec.n_shared_experts * self.d_hidden
            # 0 < ceil(multiplier * d_model) <= d_hidden <= shared, so rounding up to a multiple
            # of ``shared`` gives exactly ``shared``.
            self.shared_experts = GatedMLP(d_model, MLPSpec(
                multiplier=spec.expert_multiplier, multiple_of=shared))
            assert self.shared_experts.d_hidden == shared
        self.aux_loss: torch.Tensor | None = None
        self.load: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, *, n_layers: int) -> None:
        # Near-uniform routing at the start (Switch Transformer scales its router init by 0.1):
        # every expert gets tokens, and so gradients, before the router commits.
        normal_(self.router.weight, ROUTER_INIT_SCALE * self.router.in_features ** -0.5,
                generator)
        fan_in_(self.w1, generator)
        residual_(self.w2, generator, n_layers=n_layers)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(generator, n_layers=n_layers)

    def allocate_cache(self, batch_size: int, max_seqlen: int, **_: object) -> None:
        return None

    def route(
        self, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (T, d_model) -> (logits (T, E) in float32 or wider, probabilities (T, E), the
        chosen experts (T, top_k) and their renormalised weights (T, top_k))."""
        logits = self.router(tokens)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = torch.softmax(logits, dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return logits, probs, experts, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, *, cache: None = None) -> torch.Tensor:
        """x: (B, L, d_model) -> (B, L, d_model); sets ``load`` and, training, ``aux_loss``."""
        tokens = x.reshape(-1, x.shape[-1])  # (T, d)
        n_tokens = tokens.shape[0]
        logits, probs, experts, weights = self.route(tokens)
        flat = experts.reshape(-1)  # (T * k,): assignment j is token j // k
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)  # (E,)
        token_of = order // self.top_k
        rows = tokens[token_of]  # (T * k, d), grouped by expert
        outputs = []
        # unbind: one backward node stacks the experts' gradients, where indexing w1[e] per
        # expert would accumulate a full-size zero-padded gradient per expert.
        w1, w2 = self.w1.unbind(0), self.w2.unbind(0)
        for e, part in enumerate(rows.split(counts.tolist())):
            if part.shape[0] == 0:
                continue
            value, gate = F.linear(part, w1[e]).chunk(2, dim=-1)
            outputs.append(F.linear(value * F.silu(gate), w2[e]))
        if outputs:
            routed = torch.cat(outputs)
            routed = routed * weights.reshape(-1)[order, None].to(routed.dtype)
            out = routed.new_zeros(n_tokens, tokens.shape[1]).index_add_(0, token_of, routed)
        else:  # no token at all
            out = torch.zeros_like(tokens)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)

        load = counts.to(probs.dtype) / max(flat.numel(), 1)
        self.load = load.detach()
        self.aux_loss = None
        if self.training and n_tokens:
            balance = self.n_experts * (load * probs.mean(dim=0)).sum()
            z_loss = torch.logsumexp(logits, dim=-1).square().mean()
            self.aux_loss = self.balance_coef * balance + self.z_loss_coef * z_loss
        return out.reshape(x.shape)

    def step(self, x: torch.Tensor, cache: None = None) -> torch.Tensor:
        return self.forward(x[:, None])[:, 0]


register(LayerType(
    spec=MoESpec, build=lambda spec, d_model, eps: MoE(d_model, spec), label="MoE",
    colour="#a855f7", mixes_sequence=False,
    refused={
        "mamba_ssm": "mamba_ssm's MambaLMHeadModel has no mixture-of-experts MLP",
        "hf": "no HF flavour for MoE yet (NemotronH's MoE routes by sigmoid with grouped top-k "
              "and a score-correction bias, not this softmax top-k; GraniteMoeHybrid puts an MoE "
              "in every block)",
        "megatron": "not written yet: Megatron's E layers take --num-experts, the router and "
                    "expert-width settings of its TransformerConfig and grouped expert weights, "
                    "which hybridlab does not write or map",
    },
))
