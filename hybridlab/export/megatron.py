"""Megatron-LM's hybrid model: the layer pattern and matching command-line arguments.

Megatron builds a hybrid from ``--hybrid-layer-pattern`` ("M" Mamba-2, "*" attention, "-" MLP,
each with its own pre-norm, as hybridlab does) and one global setting per layer kind. So a stack
exports faithfully when

- it has no Mamba-1 layer (Megatron's ``MambaMixer`` is Mamba-2 only);
- all Mamba-2 layers share one setting with ``d_conv`` 4 (the stack spec builds ``MambaMixer``
  with its default ``d_conv=4``; the inner width goes through ``--mamba-num-heads``);
- ``norm_eps`` is 1e-5 when there is a Mamba layer: ``MambaMixer`` builds its gated RMSNorm with
  ``eps=1e-5`` whatever ``--norm-epsilon`` says (that flag sets the pre-norms and the final norm);
- all attention layers share one setting (heads, KV groups, head dim, RoPE on or off) without a
  sliding window, and an integer RoPE base (``--rotary-base`` is ``type=int``);
- all MLPs share one width (``--ffn-hidden-size``; ``--swiglu`` is hybridlab's gated MLP).

The flags, their types and spellings are those of megatron-core 0.19.2's
``megatron/training/arguments.py`` (tests/export/megatron_arguments.json is the table the tests
parse every export with). Older checkouts spell some differently; ``megatron_args.sh`` says which.

Only arguments are written here. Trained weights reach Megatron through the Hugging Face export:
Megatron-Bridge's NemotronH bridge converts a NemotronH folder into a Megatron checkpoint
(:func:`usage` gives the steps). A direct writer is not possible on CPU: ``MambaMixer`` allocates
its parameters on ``torch.cuda.current_device()`` and needs mamba_ssm, so the model whose
sharded state dict Megatron's ``dist_checkpointing`` saves cannot be built without a GPU.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hybridlab.config import ArchConfig, AttentionSpec, LayerSpec, Mamba2Spec, MLPSpec
from hybridlab.export.common import (
    SSM_TYPES,
    Change,
    ExportError,
    Fit,
    unify,
    unify_attention,
    unify_ssm_as_mamba2,
)

# The layer types this format maps (Mamba-1 as the closest Mamba-2, lossy; every other
# registered type refuses it in the registry).
WRITES = ("mamba1", "mamba2", "attention", "mlp")
ARGS_JSON = "megatron_args.json"
ARGS_SH = "megatron_args.sh"
MAMBA_D_CONV = 4
MAMBA_NORM_EPS = 1e-5
PATTERN_FLAG = "--hybrid-layer-pattern"
STACK_SPEC = ["megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"]
# Megatron-Core older than 0.18 has no models/hybrid package; older than 0.17, no
# --hybrid-layer-pattern (checked in the 0.16.1, 0.17.0 and 0.18.0 wheels).
LEGACY_STACK_SPEC = ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]
LEGACY_PATTERN_FLAG = "--hybrid-override-pattern"
# Megatron-Bridge pads the vocabulary to the largest power of two up to 128 that divides it
# (MegatronModelBridge.make_vocab_size_divisible_by), i.e. not at all.
MAX_VOCAB_DIVISOR = 128


@dataclass(frozen=True, kw_only=True)
class MegatronFit(Fit):
    """The closest Megatron hybrid, as a hybridlab config of M / * / - layers."""

    target: ArchConfig


def _integer_rope_bases(arch: ArchConfig, indices: list[int]) -> tuple[ArchConfig, list[Change]]:
    """``arch`` with every RoPE base rounded to an integer, and one Change per rounded layer."""
    layers = list(arch.layers)
    changes = []
    for i in indices:
        spec = layers[i]
        assert isinstance(spec, AttentionSpec)
        if spec.rope and not float(spec.rope_theta).is_integer():
            rounded = float(round(spec.rope_theta))
            changes.append(Change(where=f"layers[{i}].rope_theta", was=str(spec.rope_theta),
                                  now=str(int(rounded)),
                                  reason="Megatron's --rotary-base is an integer (type=int)"))
            layers[i] = replace(spec, rope_theta=rounded)
    return replace(arch, layers=tuple(layers)), changes


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
                   reason="Megatron's hybrid_stack_spec builds MambaMixer with d_conv=4 and has "
                          "no argument for it")
            for i in by_type["ssm"]
        ]
        mamba = replace(mamba, d_conv=MAMBA_D_CONV)
    if mamba is not None and arch.norm_eps != MAMBA_NORM_EPS:
        changes.append(Change(
            where="norm_eps", was=str(arch.norm_eps),
            now=f"{MAMBA_NORM_EPS} in the gated norms of layers {by_type['ssm']}",
            reason="Megatron's MambaMixer fixes its gated RMSNorm's eps at 1e-5; "
                   "--norm-epsilon sets only the pre-norms and the final norm"))

    rounded, rope_changes = _integer_rope_bases(arch, by_type.get("attention", []))
    changes += rope_changes
    attention, attn_changes = unify_attention(
        rounded, by_type.get("attention", []),
        reason="--num-attention-heads/--num-query-groups/--kv-channels/"
               "--position-embedding-type/--rotary-base set every attention layer",
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
        PATTERN_FLAG: target.pattern,
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
        # Padded rows would add logits, and a checkpoint converted by Megatron-Bridge holds the
        # vocabulary unpadded: loading it needs the same padded size.
        "--make-vocab-size-divisible-by": math.gcd(target.vocab_size, MAX_VOCAB_DIVISOR),
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
            if not float(attention.rope_theta).is_integer():
                index = target.layers.index(attention)
                raise ExportError(f"megatron: layers[{index}].rope_theta = "
                                  f"{attention.rope_theta} is not an integer; export the "
                                  "target of megatron.fit(), which rounds it")
            args |= {"--position-embedding-type": "rope",
                     "--rotary-base": int(attention.rope_theta), "--rotary-percent": 1.0}
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
    ``pretrain_hybrid.py`` command line)."""
    args = arguments(fitted.target, seq_length=seq_length)
    tokens = argv(args)
    # The key keeps the name NemotronH's config.json (and Megatron-Bridge) give the pattern.
    payload = {"hybrid_override_pattern": fitted.target.pattern, "arguments": args,
               "argv": tokens}
    (folder / ARGS_JSON).write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Model arguments for Megatron-LM's hybrid model (pretrain_hybrid.py), from a",
             "# hybridlab export, in megatron-core 0.19's spellings. Before megatron-core 0.18",
             f"# write --spec {' '.join(LEGACY_STACK_SPEC)} (pretrain_mamba.py);",
             f"# before 0.17 also {LEGACY_PATTERN_FLAG} for {PATTERN_FLAG}.",
             "# Add data, tokenizer, parallelism and optimizer flags.",
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


def usage(*, weights_route: bool) -> str:
    """The model card's usage block. ``weights_route``: the architecture also exports faithfully
    as a Hugging Face NemotronH folder with weights, so the trained weights reach Megatron through
    Megatron-Bridge."""
    train = ("```bash\nsource megatron_args.sh\ntorchrun ... pretrain_hybrid.py "
             "\"${MODEL_ARGS[@]}\" <tokenizer, data, parallelism, optimizer flags>\n```\n"
             "`--vocab-size` is the trained vocabulary; with a real tokenizer Megatron takes "
             "the vocabulary from it. `--seq-length` is the trained length. "
             "`megatron_args.sh` names the spellings of Megatron-Core older than 0.18.")
    if not weights_route:
        return train
    return train + (
        "\n\nTo continue from the trained weights, write them as a Hugging Face NemotronH "
        "folder and convert that with Megatron-Bridge (on a GPU machine with megatron-bridge, "
        "transformer-engine and mamba-ssm installed):\n\n"
        "```python\nfrom hybridlab.export import export_model, load_hybridlab\n\n"
        "export_model(load_hybridlab(\"<this folder>\"), \"hf\", \"<hf folder>\")\n```\n\n"
        "```python\n# convert.py, run as: torchrun --nproc-per-node 1 convert.py\n"
        "from megatron.bridge import AutoBridge\n\n"
        "AutoBridge.import_ckpt(\"<hf folder>\", \"<megatron checkpoint folder>\")\n```\n\n"
        "then add `--load <megatron checkpoint folder> --finetune` to the `pretrain_hybrid.py` "
        "command above (`--finetune`: the converted checkpoint has no optimizer state).")
