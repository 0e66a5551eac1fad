"""mamba_ssm's ``MambaLMHeadModel``: ``config.json`` (a ``MambaConfig``) and its state dict.

What mamba_ssm builds (``mamba_ssm/models/mixer_seq_simple.py``, ``modules/block.py``): ``n_layer``
blocks, each ``norm -> mixer`` and, when ``d_intermediate > 0``, ``norm2 -> mlp`` (a ``GatedMLP``)
in *every* block. Blocks listed in ``attn_layer_idx`` hold an ``MHA`` built from ``attn_cfg``; every
other block holds the one SSM layer type and setting of ``ssm_cfg`` (``layer``: "Mamba1" or
"Mamba2"). So a hybridlab stack exports faithfully when

- every MLP directly follows a mixer, and either every mixer has one or none has;
- all MLPs have one width; all SSM layers have one type and one setting; all attention layers
  have one setting, without a sliding window (``MHA`` has none);
- ``norm_eps`` is 1e-5 (``MambaLMHeadModel`` never passes an eps; ``Mamba2``'s gated norm fixes
  1e-5).

``GatedMLP`` rounds ``hidden_features`` up to a multiple of 128: a narrower MLP is zero-padded,
which changes no output and no gradient. The vocabulary is exported unpadded
(``pad_vocab_size_multiple`` 1): padded rows would add logits. ``fused_add_norm`` is written true
(``MambaConfig``'s default): the unfused ``Block`` path of some mamba_ssm versions gives the MLP the
mixer's output instead of ``norm2(residual)``.

Conventions, checked against the source and run (``tests/export/test_mamba_ssm_runs.py`` loads
exports in mamba_ssm 2.3.2's own model on CPU through its torch references): ``MHA.in_proj``
packs ``[q, k, v]`` as ours does; its RoPE is flash_attn's ``RotaryEmbedding`` with
``interleaved=False`` (rotate-half, GPT-NeoX) over ``rotary_emb_dim = head_dim`` with
``inv_freq = base^(-2i/dim)``, as ours; its softmax scale is SDPA's default ``1/sqrt(head_dim)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hybridlab.config import (
    ArchConfig,
    AttentionSpec,
    LayerSpec,
    Mamba1Spec,
    Mamba2Spec,
    MLPSpec,
)
from hybridlab.export.common import (
    MANIFEST_FILE,
    SSM_TYPES,
    Change,
    ExportError,
    Fit,
    chunk_size_note,
    describe,
    mlp_spec_of_width,
    pair_blocks,
    unify,
    unify_attention,
    verify_export,
)
from hybridlab.model import HybridLM

FORMAT = "mamba_ssm"
# The layer types this format maps (every other registered type refuses it in the registry).
WRITES = ("mamba1", "mamba2", "attention", "mlp")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
MLP_MULTIPLE = 128
NORM_EPS = 1e-5

# mamba_ssm's constructor defaults, for configs that leave a field out.
MAMBA1_DEFAULTS = {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto"}
MAMBA2_DEFAULTS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1,
                   "chunk_size": 256}
# Options hybridlab's layers have fixed; a config must hold exactly these values to convert.
MAMBA1_FIXED = {"bias": False, "conv_bias": True}
MAMBA2_FIXED = {"rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False, "bias": False,
                "conv_bias": True, "d_ssm": None}
MHA_FIXED = {"qkv_proj_bias": False, "out_proj_bias": False, "causal": True,
             "rotary_emb_interleaved": False, "d_conv": 0, "mlp_dim": 0, "softmax_scale": None}
# MHA's own defaults differ from what hybridlab needs (biases on, causal off): absent is wrong.
MHA_DEFAULTS = {"qkv_proj_bias": True, "out_proj_bias": True, "causal": False,
                "rotary_emb_interleaved": False, "d_conv": 0, "mlp_dim": 0, "softmax_scale": None}
# Options that only shape the initialisation: a converted checkpoint carries trained weights.
INIT_ONLY = {"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range",
             "conv_init", "use_fast_path", "use_mem_eff_path"}


def padded_width(width: int) -> int:
    """The hidden width mamba_ssm's ``GatedMLP`` builds for ``hidden_features=width``."""
    return -(-width // MLP_MULTIPLE) * MLP_MULTIPLE


@dataclass(frozen=True, kw_only=True)
class MambaSSMFit(Fit):
    """The closest mamba_ssm model, as a hybridlab config, and how our layers form its blocks."""

    target: ArchConfig
    blocks: tuple[tuple[int, int | None], ...] = ()


def fit(arch: ArchConfig) -> MambaSSMFit:
    """Map ``arch`` onto mamba_ssm's block structure; see the module docstring for the rules."""
    d = arch.d_model
    pairing = pair_blocks(arch)
    if not pairing.blocks:
        raise ExportError(f"format {FORMAT!r}: the architecture has no mixer layer "
                          f"(pattern {arch.pattern!r}); a mamba_ssm block is built around one")
    changes = [
        Change(where=f"layers[{i}]", was=describe(arch.layers[i], d), now="removed",
               reason="a mamba_ssm block is norm -> mixer -> norm2 -> mlp: each MLP must "
                      "directly follow a mixer, one per mixer")
        for i in pairing.stray_mlps
    ]
    notes: list[str] = []

    with_mlp = {mlp: arch.layers[mlp] for _, mlp in pairing.blocks if mlp is not None}
    mlp_spec: LayerSpec | None = None
    if with_mlp and 2 * len(with_mlp) >= len(pairing.blocks):
        mlp_spec, unified = unify(with_mlp, d, reason="d_intermediate is one MLP width for "
                                                      "every block")
        changes += unified
        width = mlp_spec.d_hidden(d)  # type: ignore[union-attr]
        for mixer, mlp in pairing.blocks:
            if mlp is None:
                changes.append(Change(
                    where=f"layers[{mixer}]", was=f"{arch.layers[mixer].type} without an MLP",
                    now=f"{arch.layers[mixer].type} + MLP of width {width}",
                    reason="with d_intermediate > 0 mamba_ssm puts an MLP in every block"))
        notes.append("keep fused_add_norm true: the unfused Block path of some mamba_ssm "
                     "versions feeds the MLP the mixer output instead of norm2(residual)")
        if padded_width(width) != width:
            notes.append(f"GatedMLP rounds hidden_features up to a multiple of {MLP_MULTIPLE}: "
                         f"the MLP width {width} is exported as {padded_width(width)} with zero "
                         "weights in the extra units, which change no output and get no "
                         "gradient")
    else:
        changes += [
            Change(where=f"layers[{mlp}]", was=describe(spec, d), now="removed",
                   reason="most blocks have no MLP, and mamba_ssm puts an MLP in every block "
                          "or in none")
            for mlp, spec in with_mlp.items()
        ]

    mixers = [mixer for mixer, _ in pairing.blocks]
    ssm = [i for i in mixers if arch.layers[i].type in SSM_TYPES]
    ssm_spec: LayerSpec | None = None
    if ssm:
        n2 = sum(isinstance(arch.layers[i], Mamba2Spec) for i in ssm)
        kind = Mamba2Spec if 2 * n2 >= len(ssm) else Mamba1Spec
        same = {i: arch.layers[i] for i in ssm if isinstance(arch.layers[i], kind)}
        ssm_spec, unified = unify(same, d, reason="ssm_cfg is one setting for all SSM layers")
        changes += unified
        changes += [
            Change(where=f"layers[{i}]", was=describe(arch.layers[i], d),
                   now=describe(ssm_spec, d),
                   reason="ssm_cfg names one layer type ('Mamba1' or 'Mamba2') for all SSM "
                          "layers")
            for i in ssm if i not in same
        ]
        if isinstance(ssm_spec, Mamba2Spec):
            notes += chunk_size_note(list(same.values()), ssm_spec)

    attention = [i for i in mixers if isinstance(arch.layers[i], AttentionSpec)]
    attn_spec, attn_changes = unify_attention(
        arch, attention, reason="attn_cfg is one setting for all attention layers",
        window_reason="mamba_ssm's MHA has no sliding window")
    changes += attn_changes
    if attn_spec is not None:
        notes.append("attention: mamba_ssm's MHA packs in_proj as [q, k, v] like hybridlab, "
                     "and applies RoPE with flash_attn's RotaryEmbedding (interleaved=False, "
                     "rotate-half over rotary_emb_dim = head_dim, inv_freq = base^(-2i/dim)), "
                     "the convention hybridlab uses; this is read from both sources, not run "
                     "here (mamba_ssm's MHA needs flash_attn)")

    if arch.norm_eps != NORM_EPS:
        changes.append(Change(where="norm_eps", was=str(arch.norm_eps), now=str(NORM_EPS),
                              reason="MambaLMHeadModel passes no eps to its RMSNorms and "
                                     "Mamba2 fixes its gated norm's eps at 1e-5"))

    layers: list[LayerSpec] = []
    for mixer in mixers:
        spec = arch.layers[mixer]
        layers.append(attn_spec if isinstance(spec, AttentionSpec) else ssm_spec)  # type: ignore[arg-type]
        if mlp_spec is not None:
            layers.append(mlp_spec)
    target = ArchConfig(d_model=d, vocab_size=arch.vocab_size, layers=tuple(layers),
                        tie_embeddings=arch.tie_embeddings, norm_eps=NORM_EPS)
    return MambaSSMFit(changes=tuple(changes), notes=tuple(notes), target=target,
                       blocks=pairing.blocks)


def config_dict(target: ArchConfig) -> dict[str, Any]:
    """``config.json`` for ``MambaLMHeadModel`` of a config that fits mamba_ssm (a fit target).

    Only ``MambaConfig``'s fields: ``MambaLMHeadModel.from_pretrained`` passes every key to it.
    """
    d = target.d_model
    mixers = [s for s in target.layers if not isinstance(s, MLPSpec)]
    mlps = [s for s in target.layers if isinstance(s, MLPSpec)]
    ssm_cfg: dict[str, Any] = {}
    attn_cfg: dict[str, Any] = {}
    for spec in mixers:
        if isinstance(spec, Mamba1Spec):
            ssm_cfg = {"layer": "Mamba1", "d_state": spec.d_state, "d_conv": spec.d_conv,
                       "expand": spec.expand, "dt_rank": spec.resolved_dt_rank(d),
                       **MAMBA1_FIXED}
        elif isinstance(spec, Mamba2Spec):
            ssm_cfg = {"layer": "Mamba2", "d_state": spec.d_state, "d_conv": spec.d_conv,
                       "expand": spec.expand, "headdim": spec.headdim, "ngroups": spec.ngroups,
                       "chunk_size": spec.chunk_size, **MAMBA2_FIXED}
        elif isinstance(spec, AttentionSpec):
            head_dim = spec.resolved_head_dim(d)
            attn_cfg = {"num_heads": spec.n_heads, "num_heads_kv": spec.kv_heads(),
                        "head_dim": head_dim, "rotary_emb_dim": head_dim if spec.rope else 0,
                        "rotary_emb_base": spec.rope_theta, **MHA_FIXED}
    return {
        "d_model": d,
        "d_intermediate": padded_width(mlps[0].d_hidden(d)) if mlps else 0,
        "n_layer": len(mixers),
        "vocab_size": target.vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [b for b, s in enumerate(mixers) if isinstance(s, AttentionSpec)],
        "attn_cfg": attn_cfg,
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 1,
        "tie_embeddings": target.tie_embeddings,
    }


def _pad_mlp(name: str, tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad a GatedMLP weight from ``width`` to mamba_ssm's rounded width."""
    extra = padded_width(width) - width
    if not extra:
        return tensor
    if name.endswith("fc1.weight"):
        # fc1 is [value; gate], (width, d_model) each: pad both halves.
        value, gate = tensor.chunk(2, dim=0)
        zeros = tensor.new_zeros(extra, tensor.shape[1])
        return torch.cat([value, zeros, gate, zeros], dim=0)
    # fc2: (d_model, width), zero columns for the extra units.
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], extra)], dim=1)


def to_mamba_ssm(
    arch: ArchConfig, blocks: tuple[tuple[int, int | None], ...], state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename (and pad) a HybridLM state dict to mamba_ssm's names; the fit must be faithful."""
    out = {
        "backbone.embedding.weight": state["backbone.embedding.weight"],
        "backbone.norm_f.weight": state["backbone.norm_f.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for b, (mixer, mlp) in enumerate(blocks):
        ours, theirs = f"backbone.layers.{mixer}.", f"backbone.layers.{b}."
        for name, tensor in state.items():
            if name.startswith(ours):
                out[theirs + name[len(ours):]] = tensor
        if mlp is None:
            continue
        ours = f"backbone.layers.{mlp}."
        width = arch.layers[mlp].d_hidden(arch.d_model)  # type: ignore[union-attr]
        out[theirs + "norm2.weight"] = state[ours + "norm.weight"]
        for fc in ("fc1", "fc2"):
            name = f"mixer.{fc}.weight"
            out[f"{theirs}mlp.{fc}.weight"] = _pad_mlp(name, state[ours + name], width)
    return out


def _options(cfg: Mapping[str, Any], defaults: Mapping[str, Any], fixed: Mapping[str, Any],
             where: str) -> dict[str, Any]:
    """The settings of one mamba_ssm module config, refusing options hybridlab cannot build."""
    known = {*defaults, *fixed, *INIT_ONLY}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ExportError(f"{FORMAT}: {where} has options hybridlab does not build: {unknown}")
    for key, want in fixed.items():
        have = cfg.get(key, defaults.get(key, want))
        if have != want:
            raise ExportError(f"{FORMAT}: {where}.{key} = {have!r}; hybridlab's layers need "
                              f"{want!r}")
    return {key: cfg.get(key, default) for key, default in defaults.items() if key not in fixed}


def from_mamba_ssm(
    config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> tuple[ArchConfig, dict[str, torch.Tensor]]:
    """Convert a mamba_ssm ``config.json`` and state dict to a hybridlab config and state dict.

    The MLP width is read from the weights (mamba_ssm pads it to a multiple of 128) and the
    vocabulary from the embedding (mamba_ssm may pad it).
    """
    if not config.get("rms_norm", False):
        raise ExportError(f"{FORMAT}: rms_norm is false (LayerNorm); hybridlab uses RMSNorm")
    d = int(config["d_model"])
    d_intermediate = int(config.get("d_intermediate", 0))
    ssm_cfg = dict(config.get("ssm_cfg") or {})
    kind = ssm_cfg.pop("layer", "Mamba1")
    ssm: LayerSpec
    if kind == "Mamba2":
        ssm = Mamba2Spec(**_options(ssm_cfg, MAMBA2_DEFAULTS, MAMBA2_FIXED, "ssm_cfg"))
    elif kind == "Mamba1":
        ssm = Mamba1Spec(**_options(ssm_cfg, MAMBA1_DEFAULTS, MAMBA1_FIXED, "ssm_cfg"))
    else:
        raise ExportError(f"{FORMAT}: ssm_cfg.layer = {kind!r}; expected 'Mamba1' or 'Mamba2'")
    attn_layers = set(config.get("attn_layer_idx") or [])
    attn: AttentionSpec | None = None
    if attn_layers:
        attn_cfg = dict(config.get("attn_cfg") or {})
        known = {"num_heads": None, "num_heads_kv": None, "head_dim": None,
                 "rotary_emb_dim": 0, "rotary_emb_base": 10000.0, **MHA_DEFAULTS}
        opts = _options(attn_cfg, known, MHA_FIXED, "attn_cfg")
        if opts["num_heads"] is None:
            raise ExportError(f"{FORMAT}: attn_cfg.num_heads is missing")
        head_dim = opts["head_dim"] or d // opts["num_heads"]
        if opts["rotary_emb_dim"] not in (0, head_dim):
            raise ExportError(f"{FORMAT}: attn_cfg.rotary_emb_dim = {opts['rotary_emb_dim']}; "
                              f"hybridlab rotates all of head_dim ({head_dim}) or none")
        attn = AttentionSpec(n_heads=opts["num_heads"], n_kv_heads=opts["num_heads_kv"],
                             head_dim=head_dim, rope=opts["rotary_emb_dim"] > 0,
                             rope_theta=float(opts["rotary_emb_base"]))
    mlp: MLPSpec | None = None
    if d_intermediate > 0:
        width = state["backbone.layers.0.mlp.fc2.weight"].shape[1]
        if width != padded_width(d_intermediate):
            raise ExportError(f"{FORMAT}: the MLP weights are {width} wide but d_intermediate "
                              f"{d_intermediate} builds {padded_width(d_intermediate)}")
        mlp = mlp_spec_of_width(width, d)

    layers: list[LayerSpec] = []
    out = {
        "backbone.embedding.weight": state["backbone.embedding.weight"],
        "backbone.norm_f.weight": state["backbone.norm_f.weight"],
        "lm_head.weight": state.get("lm_head.weight", state["backbone.embedding.weight"]),
    }
    for b in range(int(config["n_layer"])):
        theirs = f"backbone.layers.{b}."
        mixer_at = len(layers)
        layers.append(attn if b in attn_layers else ssm)  # type: ignore[arg-type]
        for name, tensor in state.items():
            if name.startswith(theirs + "norm.") or name.startswith(theirs + "mixer."):
                out[f"backbone.layers.{mixer_at}.{name[len(theirs):]}"] = tensor
        if mlp is not None:
            ours = f"backbone.layers.{len(layers)}."
            layers.append(mlp)
            out[ours + "norm.weight"] = state[theirs + "norm2.weight"]
            for fc in ("fc1", "fc2"):
                out[f"{ours}mixer.{fc}.weight"] = state[f"{theirs}mlp.{fc}.weight"]
    arch = ArchConfig(
        d_model=d, vocab_size=state["backbone.embedding.weight"].shape[0], layers=tuple(layers),
        tie_embeddings=bool(config.get("tie_embeddings", True)), norm_eps=NORM_EPS,
    )
    return arch, out


def write(model: HybridLM | None, folder: Path, fitted: MambaSSMFit) -> list[str]:
    """Write config.json and, for a faithful fit of a model, the weights in mamba_ssm's names
    (safetensors and the ``pytorch_model.bin`` that ``MambaLMHeadModel.from_pretrained`` reads);
    without a model (an untrained architecture), config.json alone."""
    (folder / CONFIG_FILE).write_text(json.dumps(config_dict(fitted.target), indent=2) + "\n")
    if model is None or not fitted.faithful:
        return [CONFIG_FILE]
    state = to_mamba_ssm(model.config, fitted.blocks,
                         {k: v.detach().cpu() for k, v in model.state_dict().items()})
    torch.save(state, folder / TORCH_WEIGHTS_FILE)
    # safetensors refuses tensors that share memory (the tied head); give each its own copy.
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))
    return [CONFIG_FILE, WEIGHTS_FILE, TORCH_WEIGHTS_FILE]


def load(folder: str | Path) -> HybridLM:
    """Rebuild a HybridLM from a mamba_ssm export (config.json + weights) through the converter."""
    folder = Path(folder)
    if (folder / MANIFEST_FILE).is_file():
        verify_export(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if (folder / WEIGHTS_FILE).is_file():
        state = load_file(str(folder / WEIGHTS_FILE))
    elif (folder / TORCH_WEIGHTS_FILE).is_file():
        state = torch.load(folder / TORCH_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    else:
        raise ExportError(f"{folder}: no {WEIGHTS_FILE} or {TORCH_WEIGHTS_FILE} (a lossy export "
                          "has no weights)")
    arch, ours = from_mamba_ssm(config, state)
    model = HybridLM(arch)
    model.load_state_dict(ours, strict=True)
    return model
