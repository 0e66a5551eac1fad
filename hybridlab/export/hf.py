"""Hugging Face transformers model folders: NemotronH, Bamba or GraniteMoeHybrid.

All are Mamba-2 hybrids with one setting per layer kind; they differ in structure:

- NemotronH stacks single-kind layers by ``layers_block_type`` (each with its own pre-norm, as
  hybridlab). Its attention (Jamba's) has no positional encoding, and its MLP is ungated
  (``up_proj -> act -> down_proj``), so it fits stacks of Mamba-2 and RoPE-free attention
  without MLP layers. Its Mamba-2 mixer uses hybridlab's names and its grouped gated norm.
  transformers' NemotronH never ties the head: ``lm_head.weight`` is written as its own tensor.
- Bamba builds every layer as mixer + SwiGLU MLP (``attn_layer_indices`` picks the attention
  layers), like a mamba_ssm block. Its attention always applies RoPE to half of each head
  (``partial_rotary_factor`` 0.5, hard-coded by ``BambaConfig``), and its gated norm normalises
  over the whole inner width in transformers 5.16, which equals hybridlab's grouped norm only
  with one group. It fits Mamba-2 + MLP stacks with ``ngroups`` 1 and no attention.
- GraniteMoeHybrid (``granitemoehybrid``) with no experts has Bamba's blocks (its ``shared_mlp``
  is the SwiGLU MLP) and attention with full RoPE or none, once its embedding, residual,
  attention and logit multipliers are set to what hybridlab computes. It fits Mamba-2 + MLP
  blocks with ``ngroups`` 1 and any one attention setting: the common ``M-M-*-`` hybrids.

``--format hf`` picks the flavour that fits; when neither does it is refused with both lists of
reasons, or written (``--lossy``) as the flavour with fewer changes. A faithful export of a
trained model is a complete transformers folder: ``config.json``, ``generation_config.json``,
``model.safetensors`` in transformers' names (``to_transformers``), and the tokenizer's files.

Checked against transformers' torch paths in tests (``tests/export/test_hf_transformers.py``):
versions 5.12-5.14 floor NemotronH's dt at ``time_step_min`` where hybridlab has no floor, so
``REQUIREMENT`` starts at 5.16. ``time_step_min``/``max``/``floor`` are written as hybridlab's dt
init range, which only matters for a model built from the config. transformers 5.x cannot
build the cache of a NemotronH or Bamba model without attention (its mask code asks the cache
for an attention layer), so such exports set ``use_cache`` false: forward and ``generate`` then
run the whole sequence every step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

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
from hybridlab.layers.init import DT_FLOOR, DT_MAX, DT_MIN

# The layer types this format maps (every other registered type refuses it in the registry).
WRITES = ("mamba1", "mamba2", "attention", "mlp")
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
REQUIREMENT = "transformers>=5.16,<6"
Flavour = Literal["nemotron_h", "bamba", "granitemoehybrid"]


@dataclass(frozen=True, kw_only=True)
class HFFit(Fit):
    flavour: Flavour
    config: dict[str, Any] = field(default_factory=dict)


def _common(arch: ArchConfig, seq_length: int, eos_id: int | None) -> dict[str, Any]:
    attends = any(isinstance(s, AttentionSpec) for s in arch.layers)
    # No pad id: Bamba's embedding would stop training that row (nn.Embedding padding_idx).
    return {"vocab_size": arch.vocab_size, "hidden_size": arch.d_model,
            "tie_word_embeddings": arch.tie_embeddings, "max_position_embeddings": seq_length,
            "attention_dropout": 0.0, "initializer_range": 0.02, "dtype": "float32",
            "use_cache": attends, "bos_token_id": None, "eos_token_id": eos_id,
            "pad_token_id": None}


def _attention_fields(attention: AttentionSpec | None, d_model: int) -> dict[str, Any]:
    if attention is None:
        # Read by the config classes but unused: no layer attends.
        return {"num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": d_model}
    return {"num_attention_heads": attention.n_heads,
            "num_key_value_heads": attention.kv_heads(),
            "head_dim": attention.resolved_head_dim(d_model)}


def fit_nemotron_h(arch: ArchConfig, *, seq_length: int, eos_id: int | None = None) -> HFFit:
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
                        "chunk_size": mamba.chunk_size, "time_step_min": DT_MIN,
                        "time_step_max": DT_MAX, "time_step_floor": DT_FLOOR,
                        "mamba_ssm_cache_dtype": "float32"}
    kinds = {"attention": "full_attention", "mlp": "mlp"}
    config = {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        **_common(arch, seq_length, eos_id),
        "layers_block_type": [kinds.get(s.type, "linear_attention") for s in arch.layers],
        **_attention_fields(attention, d),  # type: ignore[arg-type]
        "attention_bias": False, "sliding_window": None,
        "intermediate_size": width, "mlp_hidden_act": "silu", "mlp_bias": False,
        **mamba_fields, "mamba_hidden_act": "silu", "use_conv_bias": True,
        "mamba_proj_bias": False, "use_bias": False, "layer_norm_epsilon": arch.norm_eps,
        "residual_in_fp32": False, "hidden_dropout": 0.0, "rescale_prenorm_residual": True,
    }
    if arch.tie_embeddings:
        notes.append("transformers' NemotronH does not tie the head: lm_head.weight is written as "
                     "a copy of the embedding, and fine-tuning there trains the two apart")
    return HFFit(flavour="nemotron_h", config=config, changes=tuple(changes), notes=tuple(notes))


@dataclass(frozen=True)
class _Blocks:
    """A stack fitted to mixer + SwiGLU-MLP layers with one setting per kind (Bamba, Granite)."""

    mixers: list[int]
    attention_indices: list[int]
    width: int
    mamba: Mamba2Spec
    attention: AttentionSpec | None
    changes: list[Change]
    notes: list[str]


def _fit_blocks(arch: ArchConfig, fmt: str) -> _Blocks:
    d = arch.d_model
    pairing = pair_blocks(arch)
    changes = [
        Change(where=f"layers[{i}]", was=describe(arch.layers[i], d), now="removed",
               reason=f"a {fmt} layer is mixer + one MLP: each MLP must directly follow a mixer")
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
               reason=f"every {fmt} layer has an MLP")
        for mixer, after in pairing.blocks if after is None
    ]

    mixers = [mixer for mixer, _ in pairing.blocks]
    ssm = [i for i in mixers if arch.layers[i].type in SSM_TYPES]
    mamba, ssm_changes, notes = unify_ssm_as_mamba2(
        arch, ssm, fmt=fmt, reason=f"{fmt} has one Mamba setting for all layers")
    changes += ssm_changes
    if mamba is not None and mamba.ngroups != 1:
        changes += [
            Change(where=f"layers[{i}].ngroups", was=str(mamba.ngroups), now="1",
                   reason=f"{fmt}'s gated RMSNorm normalises over the whole inner width in "
                          "transformers 5.16, which equals hybridlab's per-group norm only "
                          "with one group")
            for i in ssm
        ]
        mamba = replace(mamba, ngroups=1)

    attn_idx = [i for i in mixers if isinstance(arch.layers[i], AttentionSpec)]
    attention, attn_changes = unify_attention(
        arch, attn_idx, reason=f"{fmt} has one attention setting for all layers",
        window_reason=f"hybridlab maps no sliding window onto {fmt}")
    changes += attn_changes
    return _Blocks(mixers=mixers, attention_indices=attn_idx, width=width,
                   mamba=mamba or Mamba2Spec(), attention=attention, changes=changes,
                   notes=notes)


def _mamba_fields(mamba: Mamba2Spec, d_model: int) -> dict[str, Any]:
    """Bamba's and GraniteMoeHybrid's spelling of the Mamba-2 settings."""
    return {"mamba_n_heads": mamba.nheads(d_model), "mamba_d_head": mamba.headdim,
            "mamba_n_groups": mamba.ngroups, "mamba_d_state": mamba.d_state,
            "mamba_d_conv": mamba.d_conv, "mamba_expand": mamba.expand,
            "mamba_chunk_size": mamba.chunk_size, "mamba_conv_bias": True,
            "mamba_proj_bias": False}


def fit_bamba(arch: ArchConfig, *, seq_length: int, eos_id: int | None = None) -> HFFit:
    d = arch.d_model
    fitted = _fit_blocks(arch, "Bamba")
    changes = fitted.changes + [
        Change(where=f"layers[{i}].rope", was="full RoPE" if arch.layers[i].rope else "no RoPE",  # type: ignore[union-attr]
               now="RoPE on half of each head",
               reason="BambaConfig hard-codes partial_rotary_factor 0.5")
        for i in fitted.attention_indices
    ]
    attention = fitted.attention
    theta = attention.rope_theta if attention is not None else AttentionSpec().rope_theta
    config = {
        "architectures": ["BambaForCausalLM"], "model_type": "bamba",
        **_common(arch, seq_length, eos_id),
        "num_hidden_layers": len(fitted.mixers),
        "attn_layer_indices": [b for b, i in enumerate(fitted.mixers)
                               if i in fitted.attention_indices],
        **_attention_fields(attention, d),
        "intermediate_size": fitted.width, "hidden_act": "silu", "rms_norm_eps": arch.norm_eps,
        **_mamba_fields(fitted.mamba, d),
        "rope_parameters": {"rope_type": "default", "rope_theta": theta,
                            "partial_rotary_factor": 0.5},
    }
    return HFFit(flavour="bamba", config=config, changes=tuple(changes),
                 notes=tuple(fitted.notes))


def fit_granite(arch: ArchConfig, *, seq_length: int, eos_id: int | None = None) -> HFFit:
    """GraniteMoeHybrid without experts: Bamba's blocks with full RoPE (or none) and its
    multipliers set to identities."""
    d = arch.d_model
    fitted = _fit_blocks(arch, "GraniteMoeHybrid")
    attention = fitted.attention
    # head_dim is not a GraniteMoeHybridConfig field, but its attention and RoPE read it.
    rope = attention is not None and attention.rope
    config = {
        "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid",
        **_common(arch, seq_length, eos_id),
        "num_hidden_layers": len(fitted.mixers),
        "layer_types": ["full_attention" if i in fitted.attention_indices else
                        "linear_attention" for i in fitted.mixers],
        **_attention_fields(attention, d),
        "attention_multiplier": (attention.resolved_head_dim(d) ** -0.5 if attention is not None
                                 else 1.0),
        "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
        "num_local_experts": 0, "num_experts_per_tok": 0,
        "shared_intermediate_size": fitted.width, "intermediate_size": fitted.width,
        "hidden_act": "silu", "rms_norm_eps": arch.norm_eps,
        **_mamba_fields(fitted.mamba, d),
        "position_embedding_type": "rope" if rope else None,
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": attention.rope_theta if rope else  # type: ignore[union-attr]
                            AttentionSpec().rope_theta},
    }
    return HFFit(flavour="granitemoehybrid", config=config, changes=tuple(fitted.changes),
                 notes=tuple(fitted.notes))


def fits(arch: ArchConfig, *, seq_length: int, eos_id: int | None = None) -> dict[Flavour, HFFit]:
    return {"nemotron_h": fit_nemotron_h(arch, seq_length=seq_length, eos_id=eos_id),
            "bamba": fit_bamba(arch, seq_length=seq_length, eos_id=eos_id),
            "granitemoehybrid": fit_granite(arch, seq_length=seq_length, eos_id=eos_id)}


def choose(candidates: dict[Flavour, HFFit]) -> HFFit:
    """The faithful flavour, else the one with the fewest changes (the first of ``fits`` on a
    tie)."""
    return min(candidates.values(), key=lambda f: len(f.changes))


def _split_qkv(arch: ArchConfig, index: int, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """hybridlab's fused ``in_proj`` ([q, k, v] rows) as transformers' q/k/v projections."""
    spec = arch.layers[index]
    assert isinstance(spec, AttentionSpec)
    head_dim = spec.resolved_head_dim(arch.d_model)
    q, kv = spec.n_heads * head_dim, spec.kv_heads() * head_dim
    return {"q_proj.weight": weight[:q], "k_proj.weight": weight[q:q + kv],
            "v_proj.weight": weight[q + kv:]}


def _mixer(arch: ArchConfig, index: int, state: Mapping[str, torch.Tensor],
           prefix: str) -> dict[str, torch.Tensor]:
    """One mixer's tensors under ``prefix``: Mamba-2 names are shared; attention is split."""
    ours = f"backbone.layers.{index}.mixer."
    tensors = {name[len(ours):]: t for name, t in state.items() if name.startswith(ours)}
    if isinstance(arch.layers[index], AttentionSpec):
        renamed = _split_qkv(arch, index, tensors.pop("in_proj.weight"))
        renamed["o_proj.weight"] = tensors.pop("out_proj.weight")
        tensors = renamed
    return {prefix + name: t for name, t in tensors.items()}


def to_transformers(fitted: HFFit, arch: ArchConfig,
                    state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A faithful fit's weights in the flavour's transformers names (``NemotronHForCausalLM`` or
    ``BambaForCausalLM`` state-dict keys)."""
    if not fitted.faithful:
        raise ValueError("only a faithful fit has weights in transformers' names")
    out: dict[str, torch.Tensor] = {}
    if fitted.flavour == "nemotron_h":
        # On disk NemotronH is "backbone.*", as transformers' save_pretrained writes it and
        # Megatron-Bridge reads it; transformers renames it to "model.*" when loading.
        out["backbone.embeddings.weight"] = state["backbone.embedding.weight"]
        for i in range(arch.n_layers):
            out[f"backbone.layers.{i}.norm.weight"] = state[f"backbone.layers.{i}.norm.weight"]
            out |= _mixer(arch, i, state, f"backbone.layers.{i}.mixer.")
        out["backbone.norm_f.weight"] = state["backbone.norm_f.weight"]
        out["lm_head.weight"] = state["lm_head.weight"]
        return out
    out["model.embed_tokens.weight"] = state["backbone.embedding.weight"]
    granite = fitted.flavour == "granitemoehybrid"
    for block, (mixer, mlp) in enumerate(pair_blocks(arch).blocks):
        theirs = f"model.layers.{block}."
        out[theirs + "input_layernorm.weight"] = state[f"backbone.layers.{mixer}.norm.weight"]
        kind = "self_attn" if isinstance(arch.layers[mixer], AttentionSpec) else "mamba"
        out |= _mixer(arch, mixer, state, f"{theirs}{kind}.")
        assert mlp is not None, "a faithful block fit has an MLP after every mixer"
        ours = f"backbone.layers.{mlp}."
        norm = "post_attention_layernorm" if granite else "pre_ff_layernorm"
        out[f"{theirs}{norm}.weight"] = state[ours + "norm.weight"]
        value, gate = state[ours + "mixer.fc1.weight"].chunk(2, dim=0)
        down = state[ours + "mixer.fc2.weight"]
        if granite:
            # Its input_linear is [gate, value]: act(first half) * second half.
            out[theirs + "shared_mlp.input_linear.weight"] = torch.cat([gate, value])
            out[theirs + "shared_mlp.output_linear.weight"] = down
        else:
            out[theirs + "feed_forward.up_proj.weight"] = value
            out[theirs + "feed_forward.gate_proj.weight"] = gate
            out[theirs + "feed_forward.down_proj.weight"] = down
    out["model.norm.weight" if granite else "model.final_layernorm.weight"] = (
        state["backbone.norm_f.weight"])
    if not arch.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def generation_config(fitted: HFFit) -> dict[str, Any]:
    """Greedy decoding, stopping at the tokenizer's end of text (none without a tokenizer)."""
    eos = fitted.config["eos_token_id"]
    return {"do_sample": False, "bos_token_id": None, "eos_token_id": eos,
            "pad_token_id": eos, "use_cache": fitted.config["use_cache"]}


def write(folder: Path, fitted: HFFit, arch: ArchConfig,
          state: Mapping[str, torch.Tensor] | None) -> list[str]:
    """config.json and generation_config.json; with a faithful fit's trained ``state``, also
    model.safetensors in transformers' names."""
    (folder / CONFIG_FILE).write_text(json.dumps(fitted.config, indent=2) + "\n")
    (folder / GENERATION_FILE).write_text(json.dumps(generation_config(fitted), indent=2) + "\n")
    files = [CONFIG_FILE, GENERATION_FILE]
    if state is not None and fitted.faithful:
        tensors = to_transformers(fitted, arch, state)
        # safetensors refuses tensors that share memory (a tied head, chunks of one weight).
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
                  str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        files.append(WEIGHTS_FILE)
    return files
