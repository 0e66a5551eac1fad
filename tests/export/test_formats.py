"""Each format: faithful round trips, the written-down target names, refusals and lossy exports."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hybridlab.config import ArchConfig, AttentionSpec, Mamba1Spec, Mamba2Spec, MLPSpec
from hybridlab.cost import param_count
from hybridlab.export import (
    ExportError,
    ExportRefused,
    export_model,
    load_hybridlab,
    load_mamba_ssm,
    verify_export,
)
from hybridlab.export import mamba_ssm as mamba_ssm_format
from hybridlab.layers import build_layer
from hybridlab.model import HybridLM

# MambaLMHeadModel(MambaConfig(d_model=64, n_layer=3, d_intermediate=128, vocab_size=64,
# ssm_cfg={"layer": "Mamba2", d_state=16, headdim=16, expand=2, ngroups=1, d_conv=4},
# attn_layer_idx=[2], attn_cfg={num_heads=4, num_heads_kv=2, head_dim=16, ...})), transcribed
# from mamba_ssm/models/mixer_seq_simple.py (MixerModel.embedding, layers, norm_f; lm_head),
# modules/block.py (norm, mixer, and norm2 + mlp when d_intermediate > 0), modules/mamba2.py
# (d_inner 128, nheads 8, conv_dim 128 + 2*16 = 160, in_proj 2*128 + 2*16 + 8 = 296),
# modules/mha.py (in_proj head_dim * (4 + 2*2) = 128 rows; RotaryEmbedding's buffers are not
# persistent) and modules/mlp.py (fc1 2 * 128, fc2; 128 is already a multiple of 128).
MAMBA2_BLOCK = {
    "norm.weight": (64,),
    "mixer.dt_bias": (8,),
    "mixer.A_log": (8,),
    "mixer.D": (8,),
    "mixer.in_proj.weight": (296, 64),
    "mixer.conv1d.weight": (160, 1, 4),
    "mixer.conv1d.bias": (160,),
    "mixer.norm.weight": (128,),
    "mixer.out_proj.weight": (64, 128),
}
MHA_BLOCK = {
    "norm.weight": (64,),
    "mixer.in_proj.weight": (128, 64),
    "mixer.out_proj.weight": (64, 64),
}
MLP = {"norm2.weight": (64,), "mlp.fc1.weight": (256, 64), "mlp.fc2.weight": (64, 128)}
MAMBA_SSM_TABLE = {
    "backbone.embedding.weight": (64, 64),
    **{f"backbone.layers.0.{k}": v for k, v in (MAMBA2_BLOCK | MLP).items()},
    **{f"backbone.layers.1.{k}": v for k, v in (MAMBA2_BLOCK | MLP).items()},
    **{f"backbone.layers.2.{k}": v for k, v in (MHA_BLOCK | MLP).items()},
    "backbone.norm_f.weight": (64,),
    "lm_head.weight": (64, 64),
}
MAMBA_SSM_CONFIG = {
    "d_model": 64, "d_intermediate": 128, "n_layer": 3, "vocab_size": 64,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "d_conv": 4, "expand": 2, "headdim": 16,
                "ngroups": 1, "chunk_size": 16, "rmsnorm": True, "norm_before_gate": False,
                "D_has_hdim": False, "bias": False, "conv_bias": True, "d_ssm": None},
    "attn_layer_idx": [2],
    "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "rotary_emb_dim": 16,
                 "rotary_emb_base": 10000.0, "qkv_proj_bias": False, "out_proj_bias": False,
                 "causal": True, "rotary_emb_interleaved": False, "d_conv": 0, "mlp_dim": 0,
                 "softmax_scale": None},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "pad_vocab_size_multiple": 1, "tie_embeddings": True,
}
# MambaConfig's fields: from_pretrained passes every key of config.json to it.
MAMBA_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                       "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                       "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}


def arch(pattern: str, **specs) -> ArchConfig:
    specs.setdefault("mamba1", Mamba1Spec(d_state=8))
    specs.setdefault("mamba2", Mamba2Spec(d_state=16, headdim=16, chunk_size=16))
    specs.setdefault("attention", AttentionSpec(n_heads=4))
    return ArchConfig.from_pattern(pattern, d_model=64, vocab_size=64, **specs)


def test_hybridlab_format_round_trip_gives_same_params_and_logits(trained, tmp_path, logits):
    model, _, _ = trained
    result = export_model(model, "hybridlab", tmp_path / "out")
    assert result.faithful and result.weights == "hybridlab"
    assert set(result.files) == {"model.safetensors", "arch.yaml", "README.md"}
    manifest = verify_export(tmp_path / "out")
    assert manifest["format"] == "hybridlab" and manifest["files"] == result.files
    rebuilt = load_hybridlab(tmp_path / "out")
    assert rebuilt.config == model.config
    count = sum(p.numel() for p in rebuilt.parameters())
    assert count == sum(p.numel() for p in model.parameters()) == param_count(model.config)
    assert torch.equal(logits(rebuilt), logits(model))


def test_tampered_export_is_refused_on_load(trained, tmp_path):
    model, _, _ = trained
    export_model(model, "hybridlab", tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.safetensors does not match its sha256"):
        load_hybridlab(tmp_path / "out")


def test_mamba_ssm_names_shapes_and_config_match_the_written_down_table(trained, tmp_path,
                                                                         logits):
    model, _, _ = trained
    result = export_model(model, "mamba_ssm", tmp_path / "out")
    assert result.faithful and result.weights == "mamba_ssm"
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config == MAMBA_SSM_CONFIG
    assert set(config) == MAMBA_CONFIG_FIELDS
    for state in (load_file(str(out / "model.safetensors")),
                  torch.load(out / "pytorch_model.bin", weights_only=True)):
        assert {k: tuple(v.shape) for k, v in state.items()} == MAMBA_SSM_TABLE
    # Back through the converter: the same model.
    rebuilt = load_mamba_ssm(out)
    assert rebuilt.config.pattern == "M-M-*-"
    assert sum(p.numel() for p in rebuilt.parameters()) == param_count(model.config)
    assert torch.equal(logits(rebuilt), logits(model))


def reference_mha(cfg: dict, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's MHA.forward without a cache (modules/mha.py), its RoPE written out from
    flash_attn's RotaryEmbedding (interleaved=False) rather than taken from hybridlab."""
    heads, kv_heads, dim = cfg["num_heads"], cfg["num_heads_kv"], cfg["head_dim"]
    batch, seqlen, _ = x.shape
    qkv = F.linear(x, weights["in_proj.weight"])
    q, kv = qkv.split([heads * dim, kv_heads * 2 * dim], dim=-1)
    q = q.view(batch, seqlen, heads, dim)
    k, v = kv.view(batch, seqlen, 2, kv_heads, dim).unbind(dim=2)
    rotary = cfg["rotary_emb_dim"]
    if rotary:
        inv_freq = 1.0 / (cfg["rotary_emb_base"] ** (torch.arange(0, rotary, 2).float() / rotary))
        freqs = torch.outer(torch.arange(seqlen).float(), inv_freq)[None, :, None, :]
        cos, sin = freqs.cos(), freqs.sin()

        def rotate(t: torch.Tensor) -> torch.Tensor:
            t1, t2 = t[..., : rotary // 2], t[..., rotary // 2 : rotary]
            return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos, t[..., rotary:]], -1)

        q, k = rotate(q), rotate(k)
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), is_causal=cfg["causal"])
    return F.linear(out.transpose(1, 2).reshape(batch, seqlen, -1), weights["out_proj.weight"])


def reference_mamba_ssm_logits(config: dict, state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """MambaLMHeadModel.forward as mixer_seq_simple.py and block.py define it (the fused
    add + norm path: norm(residual) into each sub-layer, residual carried), from config.json and
    the mamba_ssm-named state dict alone. SSM mixers run in hybridlab's Mamba/Mamba2 modules,
    whose names and math the layer tests hold to mamba_ssm's."""
    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    def sub(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    d = config["d_model"]
    ssm_cfg = dict(config["ssm_cfg"])
    kind = ssm_cfg.pop("layer")
    keys = {"d_state", "d_conv", "expand"} | ({"headdim", "ngroups", "chunk_size"}
                                               if kind == "Mamba2" else {"dt_rank"})
    spec = (Mamba2Spec if kind == "Mamba2" else Mamba1Spec)(
        **{k: v for k, v in ssm_cfg.items() if k in keys})
    hidden, residual = F.embedding(tokens, state["backbone.embedding.weight"]), None
    for i in range(config["n_layer"]):
        prefix = f"backbone.layers.{i}."
        residual = hidden if residual is None else hidden + residual
        hidden = rms(residual, state[prefix + "norm.weight"])
        if i in config["attn_layer_idx"]:
            hidden = reference_mha(config["attn_cfg"], sub(prefix + "mixer."), hidden)
        else:
            mixer = build_layer(spec, d)
            mixer.load_state_dict(sub(prefix + "mixer."))
            hidden = mixer(hidden)
        if config["d_intermediate"] > 0:
            residual = hidden + residual
            hidden = rms(residual, state[prefix + "norm2.weight"])
            value, gate = F.linear(hidden, state[prefix + "mlp.fc1.weight"]).chunk(2, dim=-1)
            hidden = F.linear(value * F.silu(gate), state[prefix + "mlp.fc2.weight"])
    hidden = rms(hidden + residual, state["backbone.norm_f.weight"])
    return F.linear(hidden, state["lm_head.weight"])


@pytest.mark.parametrize("pattern", ["M-M-*-", "m*m*"])
def test_mamba_ssm_export_computes_the_same_logits_under_mamba_ssm_structure(
    trained, tmp_path, pattern
):
    if pattern == "M-M-*-":
        model, _, _ = trained
    else:
        model = HybridLM(arch(pattern, attention=AttentionSpec(n_heads=2, rope_theta=500.0)),
                         seed=4)
    export_model(model, "mamba_ssm", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    tokens = torch.randint(64, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.eval()(tokens)
        got = reference_mamba_ssm_logits(config, state, tokens)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_mamba_ssm_pads_mlp_to_a_multiple_of_128_without_changing_outputs(tmp_path, logits):
    # d_model 48: the MLP is 8/3 * 48 = 128 -> multiple_of 16 -> 128; use multiplier 2 -> 96.
    config = ArchConfig.from_pattern(
        "m-*-", d_model=48, vocab_size=40, tie_embeddings=False,
        mamba1=Mamba1Spec(d_state=4, d_conv=3), attention=AttentionSpec(n_heads=3, rope=False),
        mlp=MLPSpec(multiplier=2.0, multiple_of=16))
    model = HybridLM(config, seed=3)
    result = export_model(model, "mamba_ssm", tmp_path / "out")
    assert result.faithful
    assert any("multiple of 128" in note and "96" in note for note in result.notes)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["d_intermediate"] == 128 and written["ssm_cfg"]["layer"] == "Mamba1"
    assert written["attn_cfg"]["rotary_emb_dim"] == 0 and not written["tie_embeddings"]
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert state["backbone.layers.0.mlp.fc1.weight"].shape == (256, 48)
    assert state["backbone.layers.0.mixer.x_proj.weight"].shape == (3 + 2 * 4, 96)
    assert not state["backbone.layers.0.mlp.fc2.weight"][:, 96:].any()
    rebuilt = load_mamba_ssm(tmp_path / "out")
    assert torch.allclose(logits(rebuilt), logits(model), atol=1e-6, rtol=0)


REFUSALS = [
    ("mamba_ssm", arch("mM"), ["layers[0] = mamba1", "one layer type"]),
    ("mamba_ssm", ArchConfig(d_model=64, vocab_size=64, layers=(
        Mamba2Spec(d_state=16, headdim=16), Mamba2Spec(d_state=32, headdim=16))),
     ["layers[1].d_state = 32", "one setting for all SSM layers"]),
    ("mamba_ssm", arch("M-MM"), ["layers[1] = mlp(width=176)", "every block or in none"]),
    ("mamba_ssm", arch("M--"), ["layers[2] = mlp", "directly follow a mixer"]),
    ("mamba_ssm", arch("M*", attention=AttentionSpec(n_heads=4, sliding_window=8)),
     ["layers[1].sliding_window = 8", "no sliding window"]),
    ("mamba_ssm", ArchConfig(d_model=64, vocab_size=64, norm_eps=1e-6,
                             layers=(Mamba2Spec(d_state=16, headdim=16),)), ["norm_eps = 1e-06"]),
    ("hf", arch("mM*"), ["as nemotron_h:", "as bamba:", "NemotronH has no Mamba-1 layer",
                         "partial_rotary_factor 0.5"]),
]


@pytest.mark.parametrize(("fmt", "config", "expected"), REFUSALS,
                         ids=[f"{fmt}-{c.pattern}-{i}" for i, (fmt, c, _) in
                              enumerate(REFUSALS)])
def test_unrepresentable_architecture_is_refused_with_the_reason(tmp_path, fmt, config,
                                                                  expected):
    with pytest.raises(ExportRefused) as refused:
        export_model(HybridLM(config), fmt, tmp_path / "out")
    message = str(refused.value)
    assert f"format {fmt!r} cannot represent" in message and "--lossy" in message
    for text in expected:
        assert text in message
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary folder left


def test_lossy_mamba_ssm_lists_every_change_and_writes_no_weights(tmp_path):
    config = ArchConfig(d_model=64, vocab_size=64, layers=(
        Mamba2Spec(d_state=16, headdim=16), MLPSpec(),
        Mamba1Spec(d_state=8), MLPSpec(),
        Mamba2Spec(d_state=32, headdim=16), MLPSpec(multiplier=2.0),
        AttentionSpec(n_heads=4, sliding_window=16),
    ))
    result = export_model(HybridLM(config), "mamba_ssm", tmp_path / "out", lossy=True)
    assert not result.faithful and result.weights is None
    changed = {c.where: (c.was, c.now) for c in result.changes}
    assert changed == {
        "layers[5].width": ("128", "176"),
        "layers[6]": ("attention without an MLP", "attention + MLP of width 176"),
        "layers[4].d_state": ("32", "16"),
        "layers[2]": ("mamba1(d_state=8, d_conv=4, expand=2, dt_rank=4)",
                      "mamba2(d_state=16, headdim=16, expand=2, ngroups=1, d_conv=4)"),
        "layers[6].sliding_window": ("16", "None (full causal)"),
    }
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "LOSSY.md", "README.md", "arch.yaml", "config.json", "export.json"]
    lossy = (out / "LOSSY.md").read_text()
    for change in result.changes:
        assert change.where in lossy and change.reason in lossy
    assert "pattern `M-M-M-*-`" in lossy  # the closest mamba_ssm model, as hybridlab layers
    manifest = json.loads((out / "export.json").read_text())
    assert not manifest["faithful"] and manifest["weights"] is None
    assert len(manifest["changes"]) == len(result.changes)
    config_json = json.loads((out / "config.json").read_text())
    assert set(config_json) == MAMBA_CONFIG_FIELDS
    assert config_json["ssm_cfg"]["d_state"] == 16 and config_json["attn_layer_idx"] == [3]
    assert ArchConfig.load(out / "arch.yaml") == config  # the trained architecture, unchanged
    with pytest.raises(ExportError, match=r"no model\.safetensors"):
        load_mamba_ssm(out)


def test_converter_refuses_mamba_ssm_options_hybridlab_cannot_build():
    config = dict(MAMBA_SSM_CONFIG, ssm_cfg={**MAMBA_SSM_CONFIG["ssm_cfg"],
                                              "norm_before_gate": True})
    with pytest.raises(ExportError, match=r"ssm_cfg\.norm_before_gate"):
        mamba_ssm_format.from_mamba_ssm(config, {})


def test_export_refuses_an_existing_folder(trained, tmp_path):
    model, _, _ = trained
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, "hybridlab", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
