"""Megatron-LM's hybrid (Mamba) model: the override pattern and matching command-line arguments.

Megatron builds a hybrid from ``--hybrid-override-pattern`` ("M" Mamba-2, "*" attention, "-" MLP,
each with its own pre-norm, as hybridlab does) and one global setting per layer kind. So a stack
exports faithfully when

- it has no Mamba-1 layer (Megatron's ``MambaMixer`` is Mamba-2 only);
- all Mamba-2 layers share one setting with ``d_conv`` 4 (the stack spec builds ``MambaMixer``
  with its default ``d_conv=4``; the inner width goes through ``--mamba-num-heads``);
- all attention layers share one setting (heads, KV groups, head dim, RoPE on or off and its base)
  without a sliding window;
- all MLPs share one width (``--ffn-hidden-size``; ``--swiglu`` is hybridlab's gated MLP).

Only arguments are written: Megatron checkpoints are sharded ``torch_dist`` folders made by its own
tools, and its tensor layouts differ from hybridlab's (SwiGLU ``fc1`` is [gate, value] there,
[value, gate] here; the fused QKV weight is grouped per KV head there, [q, k, v] here).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridlab.config import ArchConfig, AttentionSpec, LayerSpec, Mamba2Spec, MLPSpec
from hybridlab.export.common import (
    SSM_TYPES,
    Change,
    Fit,
    unify,
    unify_attention,
    unify_ssm_as_mamba2,
)

ARGS_JSON = "megatron_args.json"
ARGS_SH = "megatron_args.sh"
MAMBA_D_CONV = 4
STACK_SPEC = ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]


@dataclass(frozen=True, kw_only=True)
class MegatronFit(Fit):
    """The closest Megatron hybrid, as a hybridlab config of M / * / - layers."""

    target: ArchConfig


def fit(arch: ArchConfig) -> MegatronFit:
    """Map ``arch`` onto Megatron's one-setting-per-kind hybrid; see the module docstring."""
    d = arch.d_model
    changes: list[Change] = []
    notes: list[str] = []
    by_type: dict[str, list[int]] = {}
    for i, spec in enumerate(arch.layers):
        by_type.setdefault("ssm" if spec.type in SSM_TYPES else spec.type, []).append(i)

    mamba, ssm_changes, ssm_notes = unify_ssm_as_mamba2(
        arch, by_type.get("ssm", []), fmt="Megatron",
        reason="--mamba-state-dim/--mamba-head-dim/--mamba-num-groups/--mamba-num-heads set "
               "every Mamba layer")
    changes += ssm_changes
    notes += ssm_notes
    if mamba is not None and mamba.d_conv != MAMBA_D_CONV:
        changes += [
            Change(where=f"layers[{i}].d_conv", was=str(mamba.d_conv), now=str(MAMBA_D_CONV),
                   reason="Megatron's mamba_stack_spec builds MambaMixer with d_conv=4 and has "
                          "no argument for it")
            for i in by_type["ssm"]
        ]
        mamba = Mamba2Spec(d_state=mamba.d_state, headdim=mamba.headdim, expand=mamba.expand,
                           ngroups=mamba.ngroups, d_conv=MAMBA_D_CONV,
                           chunk_size=mamba.chunk_size)

    attention, attn_changes = unify_attention(
        arch, by_type.get("attention", []),
        reason="--num-attention-heads/--num-query-groups/--kv-channels/"
               "--position-embedding-type set every attention layer",
        window_reason="hybridlab maps no sliding window onto Megatron's hybrid stack, whose "
                      "attention layers are full causal")
    changes += attn_changes

    mlp: LayerSpec | None = None
    mlps = {i: arch.layers[i] for i in by_type.get("mlp", [])}
    if mlps:
        mlp, mlp_changes = unify(mlps, d, reason="--ffn-hidden-size is one width for all MLPs")
        changes += mlp_changes

    chosen = {"ssm": mamba, "attention": attention, "mlp": mlp}
    layers = tuple(chosen["ssm" if s.type in SSM_TYPES else s.type] for s in arch.layers)
    target = ArchConfig(d_model=d, vocab_size=arch.vocab_size, layers=layers,  # type: ignore[arg-type]
                        tie_embeddings=arch.tie_embeddings, norm_eps=arch.norm_eps)
    return MegatronFit(changes=tuple(changes), notes=tuple(notes), target=target)


def arguments(target: ArchConfig, *, seq_length: int) -> dict[str, Any]:
    """Megatron arguments for a config that fits (a fit target): flag -> value, True for a
    switch, a list for a multi-token value."""
    d = target.d_model
    args: dict[str, Any] = {
        "--num-layers": target.n_layers,
        "--hybrid-override-pattern": target.pattern,
        "--spec": STACK_SPEC,
        "--hidden-size": d,
        "--normalization": "RMSNorm",
        "--norm-epsilon": target.norm_eps,
        "--disable-bias-linear": True,
        "--hidden-dropout": 0.0,
        "--attention-dropout": 0.0,
        "--seq-length": seq_length,
        "--max-position-embeddings": seq_length,
        "--vocab-size": target.vocab_size,
    }
    if not target.tie_embeddings:
        args["--untie-embeddings-and-output-weights"] = True
    mamba = next((s for s in target.layers if isinstance(s, Mamba2Spec)), None)
    if mamba is not None:
        args |= {"--mamba-state-dim": mamba.d_state, "--mamba-head-dim": mamba.headdim,
                 "--mamba-num-groups": mamba.ngroups, "--mamba-num-heads": mamba.nheads(d)}
    attention = next((s for s in target.layers if isinstance(s, AttentionSpec)), None)
    if attention is None:
        # Megatron requires the flag even when no layer attends; one head divides any width.
        args |= {"--num-attention-heads": 1, "--position-embedding-type": "none"}
    else:
        args |= {"--num-attention-heads": attention.n_heads,
                 "--kv-channels": attention.resolved_head_dim(d)}
        if attention.kv_heads() != attention.n_heads:
            args |= {"--group-query-attention": True,
                     "--num-query-groups": attention.kv_heads()}
        if attention.rope:
            args |= {"--position-embedding-type": "rope", "--rotary-base": attention.rope_theta,
                     "--rotary-percent": 1.0}
        else:
            args["--position-embedding-type"] = "none"
    mlp = next((s for s in target.layers if isinstance(s, MLPSpec)), None)
    if mlp is not None:
        args |= {"--ffn-hidden-size": mlp.d_hidden(d), "--swiglu": True}
    return args


def argv(args: dict[str, Any]) -> list[str]:
    """The arguments as command-line tokens."""
    tokens: list[str] = []
    for flag, value in args.items():
        tokens.append(flag)
        if isinstance(value, list):
            tokens += [str(v) for v in value]
        elif value is not True:
            tokens.append(str(value))
    return tokens


def write(folder: Path, fitted: MegatronFit, *, seq_length: int) -> list[str]:
    """Write ``megatron_args.json`` and ``megatron_args.sh`` (a bash array to splice into a
    ``pretrain_mamba.py`` command line)."""
    args = arguments(fitted.target, seq_length=seq_length)
    tokens = argv(args)
    payload = {"hybrid_override_pattern": fitted.target.pattern, "arguments": args,
               "argv": tokens}
    (folder / ARGS_JSON).write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Model arguments for Megatron-LM's hybrid model (pretrain_mamba.py), from a",
             "# hybridlab export; newer Megatron spells --hybrid-override-pattern as",
             "# --hybrid-layer-pattern. Add data, tokenizer, parallelism and optimizer flags.",
             f"# pattern: {fitted.target.pattern}", "MODEL_ARGS=("]
    pending = list(tokens)
    while pending:
        flag = pending.pop(0)
        values = []
        while pending and not pending[0].startswith("--"):
            values.append(pending.pop(0))
        lines.append("    " + " ".join(shlex.quote(t) for t in [flag, *values]))
    lines.append(")")
    (folder / ARGS_SH).write_text("\n".join(lines) + "\n")
    return [ARGS_JSON, ARGS_SH]
