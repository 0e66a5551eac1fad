"""Hugging Face transformers configs: NemotronH (``nemotron_h``) or Bamba (``bamba``).

Both are Mamba-2 hybrids with one setting per layer kind; they differ in structure:

- NemotronH stacks single-kind layers by ``hybrid_override_pattern`` (each with its own pre-norm,
  as hybridlab). Its attention (Jamba's) has no positional encoding, and its MLP is ungated
  (``up_proj -> act -> down_proj``), so it fits stacks of Mamba-2 and RoPE-free attention
  without MLP layers.
- Bamba builds every layer as mixer + SwiGLU MLP (``attn_layer_indices`` picks the attention
  layers), like a mamba_ssm block. Its attention always applies RoPE to half of each head
  (``partial_rotary_factor`` 0.5, hard-coded by ``BambaConfig``), and its gated norm (in
  transformers' torch path) normalises over the whole inner width, which equals hybridlab's
  grouped norm only with one group. It fits Mamba-2 + MLP stacks with ``ngroups`` 1 and no
  attention.

``--format hf`` picks the flavour that fits; when neither does it is refused with both lists of
reasons, or written (``--lossy``) as the flavour with fewer changes. Only ``config.json`` is in
transformers' terms: weights stay in hybridlab's names (the parameter maps were not checked
against a running transformers here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from hybridlab.config import ArchConfig, AttentionSpec, Mamba2Spec, MLPSpec
from hybridlab.export.common import (
    SSM_TYPES,
    Change,
    Fit,
    describe,
    pair_blocks,
    unify,
    unify_attention,
    unify_ssm_as_mamba2,
)

CONFIG_FILE = "config.json"
Flavour = Literal["nemotron_h", "bamba"]


@dataclass(frozen=True, kw_only=True)
class HFFit(Fit):
    flavour: Flavour
    config: dict[str, Any] = field(default_factory=dict)


def _common(arch: ArchConfig, seq_length: int) -> dict[str, Any]:
    return {"vocab_size": arch.vocab_size, "hidden_size": arch.d_model,
            "tie_word_embeddings": arch.tie_embeddings, "max_position_embeddings": seq_length,
            "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "float32"}


def _attention_fields(attention: AttentionSpec | None, d_model: int) -> dict[str, Any]:
    if attention is None:
        # Read by the config classes but unused: no layer attends.
        return {"num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": d_model}
    return {"num_attention_heads": attention.n_heads,
            "num_key_value_heads": attention.kv_heads(),
            "head_dim": attention.resolved_head_dim(d_model)}


def fit_nemotron_h(arch: ArchConfig, *, seq_length: int) -> HFFit:
    d = arch.d_model
    changes: list[Change] = []
    ssm = [i for i, s in enumerate(arch.layers) if s.type in SSM_TYPES]
    mamba, ssm_changes, notes = unify_ssm_as_mamba2(
        arch, ssm, fmt="NemotronH", reason="NemotronH has one Mamba setting for all layers")
    changes += ssm_changes

    attn_idx = [i for i, s in enumerate(arch.layers) if isinstance(s, AttentionSpec)]
    for i in attn_idx:
        spec = arch.layers[i]
        if spec.rope:  # type: ignore[union-attr]
            changes.append(Change(where=f"layers[{i}].rope", was="True", now="False",
                                  reason="NemotronH's attention has no positional encoding"))
    stripped = ArchConfig(
        d_model=d, vocab_size=arch.vocab_size, tie_embeddings=arch.tie_embeddings,
        norm_eps=arch.norm_eps,
        layers=tuple(replace(s, rope=False) if isinstance(s, AttentionSpec) else s
                     for s in arch.layers))
    attention, attn_changes = unify_attention(
        stripped, attn_idx,
        reason="NemotronH has one attention setting for all layers",
        window_reason="hybridlab maps no sliding window onto NemotronH")
    changes += attn_changes

    mlps = {i: s for i, s in enumerate(arch.layers) if isinstance(s, MLPSpec)}
    width = 0
    if mlps:
        mlp, mlp_changes = unify(mlps, d, reason="intermediate_size is one width for all MLPs")
        changes += mlp_changes
        width = mlp.d_hidden(d)  # type: ignore[union-attr]
        changes += [
            Change(where=f"layers[{i}]", was="SwiGLU MLP (silu(gate) * value)",
                   now="ungated MLP (silu(up_proj(x)))",
                   reason="NemotronH's MLP has no gate (up_proj -> act -> down_proj)")
            for i in mlps
        ]

    mamba_fields: dict[str, Any] = {}
    if mamba is not None:
        mamba_fields = {"ssm_state_size": mamba.d_state, "mamba_num_heads": mamba.nheads(d),
                        "mamba_head_dim": mamba.headdim, "n_groups": mamba.ngroups,
                        "conv_kernel": mamba.d_conv, "expand": mamba.expand,
                        "chunk_size": mamba.chunk_size}
    pattern = "".join("M" if s.type in SSM_TYPES else s.symbol for s in arch.layers)
    config = {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        **_common(arch, seq_length),
        "num_hidden_layers": arch.n_layers, "hybrid_override_pattern": pattern,
        **_attention_fields(attention, d),  # type: ignore[arg-type]
        "attention_bias": False, "sliding_window": None,
        "intermediate_size": width, "mlp_hidden_act": "silu", "mlp_bias": False,
        **mamba_fields, "mamba_hidden_act": "silu", "use_conv_bias": True,
        "mamba_proj_bias": False, "use_bias": False, "layer_norm_epsilon": arch.norm_eps,
        "residual_in_fp32": False, "hidden_dropout": 0.0, "rescale_prenorm_residual": True,
    }
    return HFFit(flavour="nemotron_h", config=config, changes=tuple(changes), notes=tuple(notes))


def fit_bamba(arch: ArchConfig, *, seq_length: int) -> HFFit:
    d = arch.d_model
    pairing = pair_blocks(arch)
    changes = [
        Change(where=f"layers[{i}]", was=describe(arch.layers[i], d), now="removed",
               reason="a Bamba layer is mixer + one MLP: each MLP must directly follow a mixer")
        for i in pairing.stray_mlps
    ]
    with_mlp = {mlp: arch.layers[mlp] for _, mlp in pairing.blocks if mlp is not None}
    if with_mlp:
        mlp, mlp_changes = unify(with_mlp, d, reason="intermediate_size is one width for all "
                                                     "layers")
        changes += mlp_changes
    else:
        mlp = MLPSpec()
    width = mlp.d_hidden(d)  # type: ignore[union-attr]
    changes += [
        Change(where=f"layers[{mixer}]", was=f"{arch.layers[mixer].type} without an MLP",
               now=f"{arch.layers[mixer].type} + SwiGLU MLP of width {width}",
               reason="every Bamba layer has an MLP")
        for mixer, after in pairing.blocks if after is None
    ]

    mixers = [mixer for mixer, _ in pairing.blocks]
    ssm = [i for i in mixers if arch.layers[i].type in SSM_TYPES]
    mamba, ssm_changes, notes = unify_ssm_as_mamba2(
        arch, ssm, fmt="Bamba", reason="Bamba has one Mamba setting for all layers")
    changes += ssm_changes
    if mamba is not None and mamba.ngroups != 1:
        changes += [
            Change(where=f"layers[{i}].ngroups", was=str(mamba.ngroups), now="1",
                   reason="Bamba's gated RMSNorm normalises over the whole inner width, which "
                          "equals hybridlab's per-group norm only with one group")
            for i in ssm
        ]
        mamba = replace(mamba, ngroups=1)

    attn_idx = [i for i in mixers if isinstance(arch.layers[i], AttentionSpec)]
    attention, attn_changes = unify_attention(
        arch, attn_idx, reason="Bamba has one attention setting for all layers",
        window_reason="hybridlab maps no sliding window onto Bamba")
    changes += attn_changes
    changes += [
        Change(where=f"layers[{i}].rope", was="full RoPE" if arch.layers[i].rope else "no RoPE",  # type: ignore[union-attr]
               now="RoPE on half of each head",
               reason="BambaConfig hard-codes partial_rotary_factor 0.5")
        for i in attn_idx
    ]

    mamba = mamba or Mamba2Spec()
    theta = attention.rope_theta if attention is not None else AttentionSpec().rope_theta
    config = {
        "architectures": ["BambaForCausalLM"], "model_type": "bamba",
        **_common(arch, seq_length),
        "num_hidden_layers": len(mixers),
        "attn_layer_indices": [b for b, i in enumerate(mixers) if i in attn_idx],
        **_attention_fields(attention, d),
        "intermediate_size": width, "hidden_act": "silu", "rms_norm_eps": arch.norm_eps,
        "mamba_n_heads": mamba.nheads(d), "mamba_d_head": mamba.headdim,
        "mamba_n_groups": mamba.ngroups, "mamba_d_state": mamba.d_state,
        "mamba_d_conv": mamba.d_conv, "mamba_expand": mamba.expand,
        "mamba_chunk_size": mamba.chunk_size, "mamba_conv_bias": True, "mamba_proj_bias": False,
        # Older transformers read rope_theta, newer ones rope_parameters.
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
    }
    return HFFit(flavour="bamba", config=config, changes=tuple(changes), notes=tuple(notes))


def fits(arch: ArchConfig, *, seq_length: int) -> dict[Flavour, HFFit]:
    return {"nemotron_h": fit_nemotron_h(arch, seq_length=seq_length),
            "bamba": fit_bamba(arch, seq_length=seq_length)}


def choose(candidates: dict[Flavour, HFFit]) -> HFFit:
    """The faithful flavour, else the one with the fewest changes (NemotronH on a tie)."""
    return min(candidates.values(), key=lambda f: len(f.changes))


def write(folder: Path, fitted: HFFit) -> list[str]:
    (folder / CONFIG_FILE).write_text(json.dumps(fitted.config, indent=2) + "\n")
    return [CONFIG_FILE]
