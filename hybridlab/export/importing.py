"""Read a published hybrid's config into an ``ArchConfig``: the way back from every export format.

Sources: a Hugging Face ``config.json`` (NemotronH, Bamba, GraniteMoeHybrid, Jamba), a mamba_ssm
``config.json``, Megatron-LM's hybrid-model arguments (the ``megatron_args.json`` an export
writes, a JSON mapping of flags, or a command line / ``MODEL_ARGS=(...)`` shell file), a
hybridlab arch file, an export folder (its ``export.json`` names the format) or the name of a
shipped layout (``hybridlab.published``). The format is read from the file (``model_type``, the
keys) unless given.

Every setting is read the way the source defines it (transformers' configuration and modeling
files, Megatron's argument parser and validation, mamba_ssm's ``MambaLMHeadModel``), defaults
included, so the ArchConfig computes what the source computes. What hybridlab cannot build is a
:class:`Change` naming the source field; the import is refused with all of them
(:class:`ImportRefused`), or with ``lossy`` the closest dense architecture is returned with the
changes listed. The changes, per family:

- MLPs hybridlab has only as SwiGLU: an ungated MLP (NemotronH's ``relu2`` MLP, Megatron without
  ``--swiglu``) becomes a SwiGLU MLP of 2/3 its width, which has the same parameters.
- Mixture-of-experts layers (``moe`` / ``E``, ``num_experts > 1``) become one dense SwiGLU MLP
  as wide as the experts a token uses (``top_k`` experts plus the shared ones): the same
  parameters and FLOPs per token as the active experts.
- Position encodings other than none or full rotate-half RoPE (Bamba's RoPE on half of each
  head, Megatron's learned absolute embeddings), biases, LayerNorm, Jamba's RMSNorms on the
  Mamba dt/B/C projections, dt limits, muP multipliers, windows, MTP heads: dropped or replaced
  by hybridlab's closest setting, each as one Change.

Falcon-H1 runs attention and the SSM in parallel in every layer: no sequence of hybridlab layers
computes that, so it is refused even with ``lossy``. Weights are not imported.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hybridlab.config import (
    ArchConfig,
    AttentionSpec,
    ConfigError,
    LayerSpec,
    Mamba1Spec,
    Mamba2Spec,
    MLPSpec,
    load_yaml_with_lines,
    read_text_file,
)
from hybridlab.export.common import MANIFEST_FILE, Change, ExportError, mlp_spec_of_width
from hybridlab.export.mamba_ssm import from_mamba_ssm, padded_width

FORMATS = ("hybridlab", "mamba_ssm", "megatron", "nemotron_h", "bamba", "granitemoehybrid",
           "jamba")
# --format hf: one of the transformers families, told apart by model_type.
HF_FAMILIES = ("nemotron_h", "bamba", "granitemoehybrid", "jamba")
ARCH_FILE = "arch.yaml"
CONFIG_FILE = "config.json"
MEGATRON_FILE = "megatron_args.json"
# Megatron's MambaMixer: d_conv and chunk_size have no argument; its gated norm fixes eps 1e-5.
MEGATRON_D_CONV = 4
MEGATRON_CHUNK = 128
MEGATRON_GATED_EPS = 1e-5
NO_LIMIT = (0.0, math.inf)


class ImportRefused(ExportError):
    """A source config hybridlab cannot build faithfully; names the file, each field and why."""

    def __init__(self, source: str, fmt: str, changes: Sequence[Change] = (), *,
                 reason: str | None = None) -> None:
        self.source = source
        self.format = fmt
        self.changes = tuple(changes)
        if reason is not None:
            super().__init__(f"{source}: {fmt}: {reason}")
            return
        lines = [f"{source}: this {fmt} config cannot be imported faithfully:"]
        lines += [f"  - {change.refusal()}" for change in self.changes]
        lines.append("--lossy imports the closest architecture hybridlab builds and lists "
                     "these changes")
        super().__init__("\n".join(lines))


@dataclass(frozen=True, kw_only=True)
class Imported:
    """An imported architecture, where it came from, and what (if anything) had to change."""

    arch: ArchConfig
    source: str
    format: str
    changes: tuple[Change, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def faithful(self) -> bool:
        return not self.changes


@dataclass
class _Reader:
    """Typed reads of a foreign config's fields (defaults as the source defines them) and the
    record of every change and note; errors name the source and the field."""

    data: Mapping[str, Any]
    source: str
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    read: set[str] = field(default_factory=set)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(key, message, source=self.source)

    def get(self, key: str, default: Any = None, *, aliases: Sequence[str] = ()) -> Any:
        for name in (key, *aliases):
            self.read.add(name)
            if name in self.data and self.data[name] is not None:
                return self.data[name]
        return default

    def integer(self, key: str, default: Any = None, *, aliases: Sequence[str] = ()) -> int:
        value = self.get(key, default, aliases=aliases)
        if value is None:
            raise self.error(key, "missing required field")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        return value

    def number(self, key: str, default: Any = None) -> float:
        value = self.get(key, default)
        if isinstance(value, str):
            # A command-line value; one that is not a number is refused just below.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def change(self, where: str, was: Any, now: str, reason: str) -> None:
        self.changes.append(Change(where=where, was=str(was), now=now, reason=reason))

    def expect(self, key: str, want: Any, have: Any, now: str, reason: str) -> None:
        """A Change when the source's ``have`` for ``key`` is not the ``want`` hybridlab builds."""
        if have != want:
            self.change(key, have, now, reason)


def _canonical(arch: ArchConfig) -> ArchConfig:
    """Write each setting the short way when it equals the default it resolves to (plain MHA,
    d_model // n_heads head_dim, 'auto' dt_rank), so an imported and a hand-written config of
    the same architecture hash equal."""
    d = arch.d_model
    layers: list[LayerSpec] = []
    for spec in arch.layers:
        if isinstance(spec, AttentionSpec):
            if spec.n_kv_heads == spec.n_heads:
                spec = replace(spec, n_kv_heads=None)
            if spec.head_dim is not None and d % spec.n_heads == 0 and \
                    spec.head_dim == d // spec.n_heads:
                spec = replace(spec, head_dim=None)
        elif isinstance(spec, Mamba1Spec) and spec.dt_rank == math.ceil(d / 16):
            spec = replace(spec, dt_rank="auto")
        layers.append(spec)
    return replace(arch, layers=tuple(layers))


def _build(r: _Reader, key: str, build: Callable[[], ArchConfig]) -> ArchConfig:
    """An ArchConfig from the read settings; a hybridlab validation error names the source."""
    try:
        return _canonical(build())
    except ConfigError as err:
        raise r.error(key, f"gives no valid hybridlab architecture: {err}") from None


def _swiglu_width(width: int) -> int:
    """The SwiGLU width with the parameters of an ungated MLP of ``width`` (3w = 2 * width)."""
    return max(1, round(2 * width / 3))


def _ungated(r: _Reader, where: str, act: str, width: int) -> int:
    """Record the ungated MLP -> SwiGLU change; the SwiGLU width to build."""
    gated = _swiglu_width(width)
    r.change(where, f"ungated {act} MLP of width {width}", f"SwiGLU MLP of width {gated}",
             "hybridlab's MLP is SwiGLU (silu(gate) * value); 2/3 the width keeps the "
             "parameter count")
    return gated


def _mamba2(r: _Reader, d_model: int, *, heads: int, headdim: int, d_state: int, ngroups: int,
            d_conv: int, chunk: int, where: str) -> Mamba2Spec:
    """hybridlab's Mamba-2 for ``heads`` x ``headdim`` inner channels: its expand is an integer."""
    inner = heads * headdim
    if inner % d_model:
        raise r.error(where, f"the Mamba inner width {heads} x {headdim} = {inner} is not a "
                      f"multiple of the hidden size {d_model}; hybridlab's Mamba-2 width is "
                      "expand * d_model with an integer expand")
    return Mamba2Spec(d_state=d_state, headdim=headdim, expand=inner // d_model, ngroups=ngroups,
                      d_conv=d_conv, chunk_size=chunk)


def _dt_limit(r: _Reader, key: str, *, aliases: Sequence[str] = ()) -> None:
    limit = r.get(key, NO_LIMIT, aliases=aliases)
    if tuple(float(v) for v in limit) != NO_LIMIT:
        r.change(key, list(limit), "[0.0, inf]",
                 "the Mamba dt is clamped to this range there; hybridlab does not clamp dt")


def _moe_width(r: _Reader, where: str, *, experts: int, top_k: int, width: int,
               shared: int = 0, gated: bool = True) -> int:
    """Record the MoE -> dense change; the SwiGLU width whose parameters are those of the
    experts one token uses (2/3 of their width when the experts are ungated)."""
    active = top_k * width + shared
    dense = active if gated else _swiglu_width(active)
    kind = "SwiGLU" if gated else "ungated"
    r.change(where, f"mixture of {experts} {kind} experts (top {top_k}, width {width}"
             + (f", shared width {shared}" if shared else "") + ")",
             f"dense SwiGLU MLP of width {dense}",
             "hybridlab has no mixture-of-experts layer; the dense MLP has the parameters of "
             "the experts a token uses")
    return dense


def _attention_spec(r: _Reader, d_model: int, *, kv_default: int | None, rope: bool,
                    theta: float = AttentionSpec.rope_theta,
                    head_dim: int | None = None) -> AttentionSpec:
    """Attention from transformers' field names; every family here defaults to 32 query heads
    and ``kv_default`` KV heads (None: as many as the query heads)."""
    heads = r.integer("num_attention_heads", 32)
    kv = r.get("num_key_value_heads", kv_default)
    kv = heads if kv is None else r.integer("num_key_value_heads", kv_default)
    if head_dim is None:
        head_dim = r.integer("head_dim", d_model // heads)
    return AttentionSpec(n_heads=heads, n_kv_heads=kv, head_dim=head_dim, rope=rope,
                         rope_theta=float(theta))


def _silu(r: _Reader, key: str, *, default: str = "silu") -> None:
    r.expect(key, "silu", r.get(key, default), "silu",
             "hybridlab's Mamba gate and convolution activation (and SwiGLU) use silu")


# NemotronH: transformers/models/nemotron_h (configuration + modeling), transformers 5.x.
NEMOTRON_KINDS = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp",
                  "moe": "moe", "mamba": "mamba", "attention": "attention"}
NEMOTRON_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def _nemotron_h(r: _Reader) -> ArchConfig:
    d = r.integer("hidden_size", 4096)
    blocks = r.get("layers_block_type")
    pattern = r.get("hybrid_override_pattern")
    if blocks is not None:
        where = "layers_block_type"
        unknown = [b for b in blocks if b not in NEMOTRON_KINDS]
        kinds = [NEMOTRON_KINDS.get(b, "") for b in blocks]
    elif pattern is not None:
        where = "hybrid_override_pattern"
        unknown = [s for s in pattern if s not in NEMOTRON_SYMBOLS]
        kinds = [NEMOTRON_SYMBOLS.get(s, "") for s in pattern]
    else:
        raise r.error("layers_block_type", "missing (nor is hybrid_override_pattern given)")
    if unknown:
        raise r.error(where, f"unknown layer kinds {sorted(set(unknown))}")
    layers: list[LayerSpec] = []
    if "mamba" in kinds:
        _silu(r, "mamba_hidden_act")
        r.expect("use_conv_bias", True, r.get("use_conv_bias", True, aliases=["mamba_conv_bias"]),
                 "True", "hybridlab's Mamba convolution has a bias")
        _dt_limit(r, "time_step_limit", aliases=["mamba_dt_limit"])
        mamba = _mamba2(r, d, heads=r.integer("mamba_num_heads", 128),
                        headdim=r.integer("mamba_head_dim", 64),
                        d_state=r.integer("ssm_state_size", 128),
                        ngroups=r.integer("n_groups", 8, aliases=["mamba_n_groups"]),
                        d_conv=r.integer("conv_kernel", 4, aliases=["mamba_d_conv"]),
                        chunk=r.integer("chunk_size", 128, aliases=["mamba_chunk_size"]),
                        where="mamba_num_heads")
        r.expect("use_bias", False, r.flag("use_bias", False), "False",
                 "hybridlab's Mamba projections have no bias")
    if "attention" in kinds:
        if r.get("head_dim") is None and r.get("attention_head_dim") is not None:
            head_dim = r.integer("attention_head_dim")
        else:
            head_dim = r.integer("head_dim", 128)
        attention = _attention_spec(r, d, kv_default=8, rope=False, head_dim=head_dim)
        if r.get("sliding_window") is not None:
            r.notes.append("sliding_window is set but transformers' NemotronH attention ignores "
                           "it (full causal); imported as full causal")
    act = r.get("mlp_hidden_act", "relu2")
    if "mlp" in kinds or "moe" in kinds:
        r.expect("mlp_bias", False, r.flag("mlp_bias", False), "False",
                 "hybridlab's MLP has no bias")
    mlp_width = 0
    if "mlp" in kinds:
        mlp_width = _ungated(r, "mlp_hidden_act", act, r.integer("intermediate_size", 21504))
    if "moe" in kinds:
        # NemotronH's experts and shared expert are ungated MLPs too.
        expert = r.integer("moe_intermediate_size", 7688)
        shared = r.integer("n_shared_experts", 1) * r.integer(
            "moe_shared_expert_intermediate_size", 7688)
        top_k = r.integer("num_experts_per_tok", 2)
        moe_width = _moe_width(r, "layers_block_type (moe)",
                               experts=r.integer("n_routed_experts", 8), top_k=top_k,
                               width=expert, shared=shared, gated=False)
        if r.get("moe_latent_size") is not None:
            r.change("moe_latent_size", r.get("moe_latent_size"), "none",
                     "hybridlab's MLP has no latent projection")
    for kind in kinds:
        if kind == "mamba":
            layers.append(mamba)
        elif kind == "attention":
            layers.append(attention)
        else:
            width = mlp_width if kind == "mlp" else moe_width
            layers.append(mlp_spec_of_width(width, d))
    mtp = r.integer("num_nextn_predict_layers", 0)
    if mtp:
        r.change("num_nextn_predict_layers", mtp, "0",
                 "hybridlab has no multi-token-prediction layers")
    if r.flag("tie_word_embeddings", False):
        r.notes.append("tie_word_embeddings is true, but transformers' NemotronH never ties "
                       "its head (no tied weight keys): imported untied, as it computes")
    if r.get("residual_in_fp32", False):
        r.notes.append("residual_in_fp32 only changes the residual's precision in half "
                       "precision runs; hybridlab keeps the residual in the model's dtype")
    eps = r.number("layer_norm_epsilon", 1e-5)
    return _build(r, where, lambda: ArchConfig(
        d_model=d, vocab_size=r.integer("vocab_size", 131072), layers=tuple(layers),
        tie_embeddings=False, norm_eps=eps))


def _block_stack(d: int, mixers: Sequence[LayerSpec], mlps: Sequence[MLPSpec]) -> list[LayerSpec]:
    """Bamba / Granite / Jamba layers: each one a mixer, then its MLP."""
    layers: list[LayerSpec] = []
    for mixer, mlp in zip(mixers, mlps, strict=True):
        layers += [mixer, mlp]
    return layers


def _rope_theta(r: _Reader) -> float:
    """rope_theta from rope_parameters (or a legacy top-level rope_theta, transformers' default
    10000); a Change for a RoPE type with frequency scaling."""
    params = r.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", r.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        r.change("rope_parameters.rope_type", kind, "default",
                 "hybridlab's RoPE has no frequency scaling")
    return theta


def _mamba2_hf(r: _Reader, d: int) -> Mamba2Spec:
    """Bamba's and GraniteMoeHybrid's spelling of the Mamba-2 settings."""
    _silu(r, "hidden_act")
    r.expect("mamba_conv_bias", True, r.flag("mamba_conv_bias", True), "True",
             "hybridlab's Mamba convolution has a bias")
    r.expect("mamba_proj_bias", False, r.flag("mamba_proj_bias", False), "False",
             "hybridlab's Mamba projections have no bias")
    _dt_limit(r, "time_step_limit")
    heads = r.integer("mamba_n_heads", 128)
    expand = r.integer("mamba_expand", 2)
    head = r.get("mamba_d_head", "auto")
    headdim = expand * d // heads if head == "auto" else r.integer("mamba_d_head")
    groups = r.integer("mamba_n_groups", 1)
    if groups > 1:
        r.notes.append(f"mamba_n_groups {groups}: transformers 5.25 normalises the gated norm "
                       "per group, as hybridlab does (transformers 5.16 normalised over the "
                       "whole inner width)")
    return _mamba2(r, d, heads=heads, headdim=headdim, d_state=r.integer("mamba_d_state", 256),
                   ngroups=groups, d_conv=r.integer("mamba_d_conv", 4),
                   chunk=r.integer("mamba_chunk_size", 256), where="mamba_n_heads")


def _bamba(r: _Reader) -> ArchConfig:
    d = r.integer("hidden_size", 4096)
    n = r.integer("num_hidden_layers", 32)
    attn = set(r.get("attn_layer_indices") or [])
    if any(not isinstance(i, int) or not 0 <= i < n for i in attn):
        raise r.error("attn_layer_indices", f"must be layer indices below {n}, got "
                      f"{sorted(attn, key=str)}")
    mamba = _mamba2_hf(r, d) if len(attn) < n else None
    attention = None
    if attn:
        theta = _rope_theta(r)
        attention = _attention_spec(r, d, kv_default=8, rope=True, theta=theta)
        r.change("rope_parameters.partial_rotary_factor", 0.5, "1.0 (RoPE over all of head_dim)",
                 "BambaConfig hard-codes RoPE on half of each head; hybridlab rotates the "
                 "whole head")
        r.expect("attention_bias", False, r.flag("attention_bias", False), "False",
                 "hybridlab's attention has no bias")
    r.expect("mlp_bias", False, r.flag("mlp_bias", False), "False", "hybridlab's MLP has no bias")
    if mamba is None:
        _silu(r, "hidden_act")
    mlp = mlp_spec_of_width(r.integer("intermediate_size", 14336), d)
    if r.get("pad_token_id", 0) is not None:
        r.notes.append(f"pad_token_id {r.get('pad_token_id', 0)}: Bamba's embedding never "
                       "trains that row (nn.Embedding padding_idx); hybridlab's does")
    mixers = [attention if i in attn else mamba for i in range(n)]
    eps = r.number("rms_norm_eps", 1e-5)
    return _build(r, "num_hidden_layers", lambda: ArchConfig(
        d_model=d, vocab_size=r.integer("vocab_size", 128000),
        layers=tuple(_block_stack(d, mixers, [mlp] * n)),  # type: ignore[arg-type]
        tie_embeddings=r.flag("tie_word_embeddings", False), norm_eps=eps))


GRANITE_KINDS = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention",
                 "attention": "attention"}


def _granite(r: _Reader) -> ArchConfig:
    d = r.integer("hidden_size", 4096)
    n = r.integer("num_hidden_layers", 32)
    types = r.get("layer_types", ["linear_attention"] * n, aliases=["layers_block_type"])
    if len(types) != n or any(t not in GRANITE_KINDS for t in types):
        raise r.error("layer_types", f"must be {n} entries of {sorted(GRANITE_KINDS)}, got "
                      f"{types!r}")
    kinds = [GRANITE_KINDS[t] for t in types]
    mamba = _mamba2_hf(r, d) if "mamba" in kinds else None
    attention = None
    if "attention" in kinds:
        position = r.get("position_embedding_type")
        if position not in (None, "rope"):
            raise r.error("position_embedding_type", f"must be null or 'rope', got {position!r}")
        theta = _rope_theta(r)
        attention = _attention_spec(r, d, kv_default=None, rope=position == "rope",
                                    theta=theta)
        scale = attention.resolved_head_dim(d) ** -0.5
        multiplier = r.number("attention_multiplier", 1.0)
        if not math.isclose(multiplier, scale, rel_tol=1e-9):
            r.change("attention_multiplier", multiplier, f"{scale:.6g} (1/sqrt(head_dim))",
                     "hybridlab's attention scales scores by 1/sqrt(head_dim)")
        r.expect("attention_bias", False, r.flag("attention_bias", False), "False",
                 "hybridlab's attention has no bias")
    if mamba is None:
        _silu(r, "hidden_act")
    for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        value = r.number(key, 1.0)
        if value != 1.0:
            r.change(key, value, "1.0", "hybridlab has no embedding, residual or logit "
                     "multipliers (muP); the weights could absorb some, a config cannot")
    width = r.integer("shared_intermediate_size", 1024)
    experts = r.integer("num_local_experts", 8)
    if experts > 0:
        width = _moe_width(r, "num_local_experts", experts=experts,
                           top_k=r.integer("num_experts_per_tok", 2),
                           width=r.integer("intermediate_size", 11008), shared=width)
    mlp = mlp_spec_of_width(width, d)
    mixers = [attention if k == "attention" else mamba for k in kinds]
    eps = r.number("rms_norm_eps", 1e-6)
    return _build(r, "layer_types", lambda: ArchConfig(
        d_model=d, vocab_size=r.integer("vocab_size", 32000),
        layers=tuple(_block_stack(d, mixers, [mlp] * n)),  # type: ignore[arg-type]
        tie_embeddings=r.flag("tie_word_embeddings", False), norm_eps=eps))


def _jamba(r: _Reader) -> ArchConfig:
    d = r.integer("hidden_size", 4096)
    n = r.integer("num_hidden_layers", 32)
    period, offset = r.integer("attn_layer_period", 8), r.integer("attn_layer_offset", 4)
    e_period, e_offset = r.integer("expert_layer_period", 2), r.integer("expert_layer_offset", 1)
    experts = r.integer("num_experts", 16)
    _silu(r, "hidden_act")
    attention_at = [i % period == offset for i in range(n)]
    mamba = attention = None
    if not all(attention_at):
        r.expect("mamba_conv_bias", True, r.flag("mamba_conv_bias", True), "True",
                 "hybridlab's Mamba convolution has a bias")
        r.expect("mamba_proj_bias", False, r.flag("mamba_proj_bias", False), "False",
                 "hybridlab's Mamba projections have no bias")
        rank = r.get("mamba_dt_rank", "auto")
        mamba = Mamba1Spec(d_state=r.integer("mamba_d_state", 16),
                           d_conv=r.integer("mamba_d_conv", 4),
                           expand=r.integer("mamba_expand", 2),
                           dt_rank="auto" if rank == "auto" else r.integer("mamba_dt_rank"))
        r.change("mamba (every Mamba layer)", "RMSNorm on dt, B and C (dt_layernorm, "
                 "b_layernorm, c_layernorm)", "no norm",
                 "Jamba's Mamba layers normalise the dt, B and C projections; hybridlab's "
                 "Mamba-1 does not")
    if any(attention_at):
        attention = _attention_spec(r, d, kv_default=8, rope=False)
    width = r.integer("intermediate_size", 14336)
    dense = mlp_spec_of_width(width, d)
    moe_at = [experts > 1 and i % e_period == e_offset for i in range(n)]
    mlps = [dense] * n
    if any(moe_at):
        moe = mlp_spec_of_width(_moe_width(r, "num_experts", experts=experts,
                                            top_k=r.integer("num_experts_per_tok", 2),
                                            width=width), d)
        mlps = [moe if at else dense for at in moe_at]
    mixers = [attention if at else mamba for at in attention_at]
    eps = r.number("rms_norm_eps", 1e-6)
    return _build(r, "num_hidden_layers", lambda: ArchConfig(
        d_model=d, vocab_size=r.integer("vocab_size", 65536),
        layers=tuple(_block_stack(d, mixers, mlps)),  # type: ignore[arg-type]
        tie_embeddings=r.flag("tie_word_embeddings", False), norm_eps=eps))


def _mamba_ssm(r: _Reader) -> ArchConfig:
    """mamba_ssm's config.json through ``from_mamba_ssm`` (the weights' converter, so both paths
    read the config alike), given shape-only tensors for the two sizes it reads from weights."""
    d = r.integer("d_model")
    vocab = r.integer("vocab_size")
    multiple = r.integer("pad_vocab_size_multiple", 8)
    # MambaLMHeadModel pads the vocabulary up to this multiple: the model has the padded rows.
    padded = -(-vocab // multiple) * multiple
    if padded != vocab:
        r.notes.append(f"vocab_size {vocab} padded to {padded} (pad_vocab_size_multiple "
                       f"{multiple}), as MambaLMHeadModel builds it")
    blocks = r.integer("n_layer")
    state = {"backbone.embedding.weight": torch.empty(padded, d, device="meta"),
             "backbone.norm_f.weight": torch.empty(d, device="meta")}
    d_intermediate = r.integer("d_intermediate", 0)
    if d_intermediate > 0:
        # The converter reads the MLP width from the first block's fc2 and moves every block's
        # norm2 and MLP weights (their shapes do not matter here).
        width = padded_width(d_intermediate)
        for b in range(blocks):
            for name, shape in (("norm2.weight", (d,)), ("mlp.fc1.weight", (2 * width, d)),
                                ("mlp.fc2.weight", (d, width))):
                state[f"backbone.layers.{b}.{name}"] = torch.empty(shape, device="meta")
    if not r.get("fused_add_norm", True):
        r.notes.append("fused_add_norm is false: the unfused Block path of some mamba_ssm "
                       "versions feeds the MLP the mixer output instead of norm2(residual)")
    try:
        arch, _ = from_mamba_ssm({**r.data, "rms_norm": True}, state)
    except ExportError as err:
        raise ImportRefused(r.source, "mamba_ssm", reason=str(err).removeprefix(
            "mamba_ssm: ")) from None
    except (TypeError, ValueError, KeyError) as err:
        raise r.error("<config>", f"not a valid mamba_ssm config: {err}") from None
    if not r.flag("rms_norm", True):
        r.change("rms_norm", False, "True (RMSNorm)", "hybridlab's norms are RMSNorm")
    return _build(r, "n_layer", lambda: arch)


def _hybridlab(r: _Reader) -> ArchConfig:
    return ArchConfig.from_dict(r.data, source=r.source)


READERS: dict[str, Callable[[_Reader], ArchConfig]] = {
    "nemotron_h": _nemotron_h, "bamba": _bamba, "granitemoehybrid": _granite, "jamba": _jamba,
    "mamba_ssm": _mamba_ssm, "hybridlab": _hybridlab,
}


def parse_megatron_args(tokens: Sequence[str], *, source: str) -> dict[str, Any]:
    """Megatron command-line tokens as {flag: True | value | [values]} (shell comments, the
    ``MODEL_ARGS=(`` wrapper and anything before the first flag, like the script, dropped)."""
    args: dict[str, Any] = {}
    flag: str | None = None
    for token in tokens:
        if token.startswith("--"):
            flag, _, inline = token.partition("=")
            if flag in args:
                raise ConfigError(flag, "given twice", source=source)
            args[flag] = [inline] if inline else []
        elif flag is not None and token not in (")", "("):
            args[flag].append(token)
    return {k: True if not v else v[0] if len(v) == 1 else v for k, v in args.items()}


def _megatron_text(text: str, *, source: str) -> dict[str, Any]:
    # Backslash-newline continues a shell line; shlex would keep the newline inside a token.
    text = text.replace("\\\n", " ")
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as err:
        raise ConfigError("<document>", f"cannot split into arguments: {err}",
                          source=source) from None
    # "MODEL_ARGS=(" opens the array the export's shell file writes; ")" closes it.
    tokens = [t.split("=(", 1)[-1] for t in tokens]
    return parse_megatron_args([t for t in tokens if t], source=source)


def _megatron_json(data: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The flags of a ``megatron_args.json`` (its ``arguments`` or ``argv``) or of a JSON
    mapping of flags."""
    if isinstance(data.get("arguments"), Mapping):
        data = data["arguments"]
    elif isinstance(data.get("argv"), list):
        return parse_megatron_args([str(t) for t in data["argv"]], source=source)
    flags = {k: v for k, v in data.items() if k.startswith("--")}
    if not flags:
        raise ConfigError("<document>", "no Megatron flags (--...) in this JSON", source=source)
    return flags


def megatron_pattern(layers: int, attention_ratio: float, mlp_ratio: float) -> str:
    """The pattern Megatron allocates from ``--hybrid-attention-ratio`` / ``--hybrid-mlp-ratio``
    (megatron/core/ssm/mamba_hybrid_layer_allocation.py): attention evenly spaced between Mamba
    runs that start and end the stack, then MLPs spread over the Mamba slots."""
    attention = round(layers * attention_ratio)
    mamba = layers - attention
    kinds = ["M"] * layers
    section = mamba / (attention + 1)
    # Each layer spends one unit of the running section length; below half a layer left, the
    # section is over and the layer is attention.
    left = section
    for i in range(layers):
        if left < 0.5:
            kinds[i] = "*"
            left += section
        else:
            left -= 1
    mlps = round(layers * mlp_ratio)
    if mlps:
        spacing = (mamba - mlps) / mlps
        left = spacing
        for i in range(layers):
            if kinds[i] != "M":
                continue
            if left < 0.5:
                kinds[i] = "-"
                left += spacing
            else:
                left -= 1
    return "".join(kinds)


# Megatron flags that change the model and that hybridlab has no equivalent for.
MEGATRON_UNSUPPORTED = {
    "--qk-layernorm": "hybridlab's attention has no query/key norm",
    "--add-qkv-bias": "hybridlab's attention has no bias",
    "--multi-latent-attention": "hybridlab's attention is not multi-latent",
    "--rotary-interleaved": "hybridlab's RoPE is rotate-half, not interleaved",
    "--use-rope-scaling": "hybridlab's RoPE has no frequency scaling",
    "--rotary-seq-len-interpolation-factor": "hybridlab's RoPE has no interpolation",
    "--no-rope-freq": "hybridlab applies RoPE on every attention layer or none",
    "--window-size": "hybridlab maps no Megatron attention window",
    "--window-attn-skip-freq": "hybridlab maps no Megatron attention window",
    "--apply-residual-connection-post-layernorm": "hybridlab's blocks are pre-norm",
    "--mtp-num-layers": "hybridlab has no multi-token-prediction layers",
    "--heterogeneous-layers-config-path": "hybridlab reads no heterogeneous layer config",
    "--heterogeneous-layers-config-encoded-json": "hybridlab reads no heterogeneous layer "
                                                  "config",
    "--glu-linear-offset": "hybridlab's SwiGLU has no offset",
    "--activation-func-clamp-value": "hybridlab's MLP does not clamp",
}
# Flags read as part of the architecture (every other flag is listed in a note as not read).
MEGATRON_PATTERN_FLAGS = ("--hybrid-layer-pattern", "--hybrid-override-pattern")


def _megatron(r: _Reader) -> ArchConfig:
    """Megatron's hybrid model (pretrain_mamba.py / hybrid_stack_spec): defaults and derived
    values as megatron/training/arguments.py defines them."""
    given = {flag: r.data[flag] for flag in MEGATRON_PATTERN_FLAGS if flag in r.data}
    if len(set(map(str, given.values()))) > 1:
        raise r.error(MEGATRON_PATTERN_FLAGS[0], f"and {MEGATRON_PATTERN_FLAGS[1]} disagree: "
                      f"{given}")
    flag = next(iter(given), None)
    pattern = r.get(MEGATRON_PATTERN_FLAGS[0], aliases=[MEGATRON_PATTERN_FLAGS[1]])
    n_layers = r.get("--num-layers")
    if pattern is None:
        ratios = (r.number("--hybrid-attention-ratio", 0.0), r.number("--hybrid-mlp-ratio", 0.0))
        if not any(ratios):
            raise r.error("--hybrid-layer-pattern", "missing (nor are --hybrid-attention-ratio "
                          "or --hybrid-mlp-ratio given): not a hybrid model's arguments")
        flag = "--hybrid-attention-ratio"
        pattern = megatron_pattern(r.integer("--num-layers"), *ratios)
    if not isinstance(pattern, str) or not pattern:
        raise r.error(flag or "--hybrid-layer-pattern", f"must be a pattern string, got "
                      f"{pattern!r}")
    main, _, mtp = pattern.partition("/")
    if mtp:
        r.change(flag, f"MTP layers {'/' + mtp!r}", "none",
                 "hybridlab has no multi-token-prediction layers")
    if n_layers is not None and r.integer("--num-layers") != len(main):
        raise r.error("--num-layers", f"{n_layers} does not match the {len(main)} layers of "
                      f"{flag} {main!r}")
    unknown = sorted(set(main) - set("M*-EGD"))
    if unknown:
        raise r.error(flag, f"unknown layer symbols {unknown}; Megatron's are M * - E (G, D)")
    for symbol, now, what in (("G", "M (Mamba-2)", "gated delta net"),
                              ("D", "* (full attention)", "sparse attention")):
        if symbol in main:
            r.change(flag, f"{what} layers ({symbol})", now, f"hybridlab has no {what} layer")
            main = main.replace(symbol, now[0])
    d = r.integer("--hidden-size")
    norm = r.get("--normalization", "LayerNorm")
    r.expect("--normalization", "RMSNorm", norm, "RMSNorm", "hybridlab's norms are RMSNorm")
    eps = r.number("--norm-epsilon", 1e-5)
    if "M" in main and eps != MEGATRON_GATED_EPS:
        r.change("--norm-epsilon", f"{eps} (block norms), 1e-05 (Mamba gated norms)",
                 f"{eps} everywhere", "Megatron's Mamba mixer fixes its gated norm's eps at "
                 "1e-5; hybridlab has one eps for every norm")
    if not r.get("--disable-bias-linear", False):
        r.change("--disable-bias-linear", "absent (every linear layer has a bias)", "no biases",
                 "hybridlab's linear layers have no bias")
    if r.get("--apply-layernorm-1p", False):
        r.notes.append("--apply-layernorm-1p stores norm weights minus one: the same function, "
                       "hybridlab stores the weights themselves")
    for key, reason in MEGATRON_UNSUPPORTED.items():
        if r.get(key) not in (None, False):
            r.change(key, r.get(key), "absent", reason)
    position = r.get("--position-embedding-type", "learned_absolute")
    if r.get("--use-rotary-position-embeddings", False):
        position = "rope"
    if r.get("--no-position-embedding", False):
        position = "none"
    if position not in ("rope", "none"):
        r.change("--position-embedding-type", position, "none",
                 "hybridlab has no learned or relative position embeddings")
    rope = position == "rope" and "*" in main
    if rope:
        percent = r.number("--rotary-percent", 1.0)
        r.expect("--rotary-percent", 1.0, percent, "1.0", "hybridlab rotates all of head_dim")
    if r.get("--softmax-type", "vanilla") != "vanilla":
        r.change("--softmax-type", r.get("--softmax-type"), "vanilla",
                 "hybridlab's attention softmax has no offset")
    layers: dict[str, LayerSpec] = {}
    if "M" in main:
        headdim = r.integer("--mamba-head-dim", 64)
        heads = r.get("--mamba-num-heads")
        # Unset, Megatron's MambaMixer takes expand 2: heads = 2 * hidden // headdim.
        heads = 2 * d // headdim if heads is None else r.integer("--mamba-num-heads")
        layers["M"] = _mamba2(r, d, heads=heads, headdim=headdim,
                              d_state=r.integer("--mamba-state-dim", 128),
                              ngroups=r.integer("--mamba-num-groups", 8), d_conv=MEGATRON_D_CONV,
                              chunk=MEGATRON_CHUNK, where="--mamba-num-heads")
    if "*" in main:
        heads = r.integer("--num-attention-heads")
        groups = r.integer("--num-query-groups", 1) if r.get("--group-query-attention") else heads
        layers["*"] = AttentionSpec(
            n_heads=heads, n_kv_heads=groups, head_dim=r.integer("--kv-channels", d // heads),
            rope=rope, rope_theta=r.number("--rotary-base", 10000) if rope else 10000.0)
    swiglu = bool(r.get("--swiglu", False))
    if "-" in main or "E" in main:
        # validate_args: an unset width is 4 * hidden, or 2/3 of it to a multiple of 64 with
        # --swiglu (same parameters across its two input projections).
        default = int((4 * d * 2 / 3) / 64) * 64 if swiglu else 4 * d
        width = r.integer("--ffn-hidden-size", default)
        act = ("squared relu" if r.get("--squared-relu") else
               "quick-gelu GLU" if r.get("--quick-geglu") else "gelu")
        if r.get("--quick-geglu"):
            r.change("--quick-geglu", True, "SwiGLU", "hybridlab's gated MLP uses silu")
        elif not swiglu:
            width = _ungated(r, "--swiglu", act, width)
        layers["-"] = mlp_spec_of_width(width, d)
        if "E" in main:
            expert = r.integer("--moe-ffn-hidden-size", r.integer("--ffn-hidden-size", default))
            shared = r.get("--moe-shared-expert-intermediate-size")
            dense = _moe_width(r, flag, experts=r.integer("--num-experts", 1),
                               top_k=r.integer("--moe-router-topk", 2), width=expert,
                               shared=0 if shared is None else r.integer(
                                   "--moe-shared-expert-intermediate-size"), gated=swiglu)
            layers["E"] = mlp_spec_of_width(dense, d)
    vocab = r.get("--vocab-size")
    if vocab is None:
        raise r.error("--vocab-size", "missing: Megatron takes the vocabulary from the "
                      "tokenizer; add --vocab-size")
    vocab = r.integer("--vocab-size")
    multiple = (r.integer("--make-vocab-size-divisible-by", 128)
                * r.integer("--tensor-model-parallel-size", 1))
    padded = -(-vocab // multiple) * multiple
    if padded != vocab:
        r.notes.append(f"--vocab-size {vocab} padded to {padded} (--make-vocab-size-divisible-by "
                       f"x --tensor-model-parallel-size = {multiple}), as Megatron builds its "
                       "embedding; with NullTokenizer Megatron adds one EOD token before padding")
    tie = not r.get("--untie-embeddings-and-output-weights", False)
    unread = sorted(set(r.data) - r.read)
    if unread:
        r.notes.append("not read (options that do not change the layers hybridlab builds, or "
                       f"that it does not know): {' '.join(unread)}")
    return _build(r, flag, lambda: ArchConfig(
        d_model=d, vocab_size=padded, layers=tuple(layers[s] for s in main),
        tie_embeddings=tie, norm_eps=eps))


READERS["megatron"] = _megatron


def detect_format(data: Mapping[str, Any], *, source: str) -> str:
    """The format of a parsed config: transformers' ``model_type``, else its keys."""
    model_type = data.get("model_type")
    if model_type in HF_FAMILIES:
        return model_type
    if model_type == "falcon_h1":
        raise ImportRefused(source, "falcon_h1", reason=(
            "Falcon-H1 runs attention and a Mamba-2 mixer in parallel in every layer (their "
            "outputs summed); no sequence of hybridlab layers computes that, so even --lossy "
            "has no closest architecture to offer"))
    if model_type is not None:
        raise ConfigError("model_type", f"{model_type!r} is not a hybrid hybridlab reads; "
                          f"supported: {', '.join(HF_FAMILIES)}", source=source)
    if "arguments" in data or "argv" in data or any(str(k).startswith("--") for k in data):
        return "megatron"
    if "layers" in data and "d_model" in data:
        return "hybridlab"
    if "n_layer" in data and "d_model" in data:
        return "mamba_ssm"
    raise ConfigError("<document>", "cannot tell the format (no model_type, no Megatron flags, "
                      "no mamba_ssm or hybridlab keys); pass --format", source=source)


def import_dict(data: Mapping[str, Any], *, fmt: str | None = None, lossy: bool = False,
                source: str = "<config>") -> Imported:
    """Import a parsed config (a config.json's dict, Megatron flags, a hybridlab arch dict)."""
    if not isinstance(data, Mapping):
        raise ConfigError("<document>", f"must be a mapping, got {type(data).__name__}",
                          source=source)
    if fmt == "hf":
        fmt = detect_format(data, source=source)
        if fmt not in HF_FAMILIES:
            raise ConfigError("model_type", f"not a transformers config (format {fmt})",
                              source=source)
    elif fmt is None:
        fmt = detect_format(data, source=source)
    elif fmt not in FORMATS:
        raise ConfigError("--format", f"unknown format {fmt!r}; choose one of "
                          f"{', '.join((*FORMATS, 'hf'))}")
    elif data.get("model_type") not in (None, fmt):
        raise ConfigError("model_type", f"{data['model_type']!r}, but the format asked for is "
                          f"{fmt!r}", source=source)
    if fmt == "megatron":
        data = _megatron_json(data, source=source)
    reader = _Reader(data, source)
    arch = READERS[fmt](reader)
    if reader.changes and not lossy:
        raise ImportRefused(source, fmt, reader.changes)
    return Imported(arch=arch, source=source, format=fmt, changes=tuple(reader.changes),
                    notes=tuple(reader.notes))


def _folder_file(folder: Path, fmt: str | None) -> Path:
    """The file of an export (or model) folder that holds the config of ``fmt``."""
    files = {"hybridlab": ARCH_FILE, "megatron": MEGATRON_FILE}
    if fmt is None and (folder / MANIFEST_FILE).is_file():
        try:
            fmt = json.loads((folder / MANIFEST_FILE).read_text()).get("format")
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError("<file>", f"{MANIFEST_FILE} is not valid JSON",
                              source=str(folder)) from None
    if fmt is not None:
        return folder / files.get(fmt, CONFIG_FILE)
    for name in (CONFIG_FILE, MEGATRON_FILE, ARCH_FILE):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError("<file>", f"no {CONFIG_FILE}, {MEGATRON_FILE} or {ARCH_FILE} in this "
                      "folder", source=str(folder))


def import_config(source: str | Path, *, fmt: str | None = None,
                  lossy: bool = False) -> Imported:
    """Import a config file, an export or model folder, or a shipped layout's name.

    ``.json`` is read as JSON, ``.yaml``/``.yml`` as YAML, anything else as a Megatron command
    line; ``fmt`` overrides the detected format. Refused imports raise :class:`ImportRefused`
    unless ``lossy``; malformed ones raise ``ConfigError`` naming the file and field.
    """
    from hybridlab import published

    path = Path(source)
    if not path.exists() and str(source) in published.names():
        return Imported(arch=published.layout(str(source)), source=str(source),
                        format="hybridlab", notes=(published.describe(str(source)),))
    if path.is_dir():
        path = _folder_file(path, fmt)
    text = read_text_file(path)
    name = str(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError("<document>", f"invalid JSON: {err.msg}", source=name,
                              line=err.lineno) from None
    elif path.suffix in (".yaml", ".yml"):
        data, _ = load_yaml_with_lines(text, source=name)
    else:
        data = _megatron_text(text, source=name)
        fmt = fmt or "megatron"
    return import_dict(data, fmt=fmt, lossy=lossy, source=name)
