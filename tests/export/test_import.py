"""Importing foreign configs: transformers' own config classes and models say what each computes
(parameter counts equal where representable), refusals name the file and field, lossy imports
list every change, and import -> export -> import is the identity for every format."""

import json
import math

import pytest
import torch
from transformers import (
    BambaConfig,
    BambaForCausalLM,
    FalconH1Config,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
)

from hybridlab.cli import main
from hybridlab.config import ArchConfig, ConfigError
from hybridlab.cost import param_count
from hybridlab.export.common import atomic_folder
from hybridlab.export.importing import (
    ImportRefused,
    import_config,
    import_dict,
    megatron_pattern,
)
from hybridlab.export.writer import write_config_export
from tests.export.test_formats import MAMBA_SSM_CONFIG, MAMBA_SSM_TABLE

SMALL = {"vocab_size": 64, "hidden_size": 32}
NEMOTRON = {**SMALL, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "mamba_num_heads": 8, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 16,
            "chunk_size": 16, "intermediate_size": 48}
BAMBA = {**SMALL, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
         "mamba_n_heads": 8, "mamba_d_state": 16, "mamba_chunk_size": 16}
GRANITE = {**BAMBA, "shared_intermediate_size": 48, "num_local_experts": 0,
           "attention_multiplier": 8 ** -0.5, "position_embedding_type": "rope",
           "rms_norm_eps": 1e-5}
JAMBA = {**SMALL, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
         "mamba_d_state": 8, "num_experts": 1}
MEGATRON = {"--hybrid-layer-pattern": "M-M*-", "--hidden-size": 64, "--num-attention-heads": 4,
            "--group-query-attention": True, "--num-query-groups": 2, "--kv-channels": 16,
            "--mamba-state-dim": 16, "--mamba-head-dim": 16, "--mamba-num-groups": 2,
            "--ffn-hidden-size": 96, "--swiglu": True, "--normalization": "RMSNorm",
            "--disable-bias-linear": True, "--position-embedding-type": "rope",
            "--rotary-base": 10000, "--vocab-size": 256}


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_nemotron_h_imports_with_the_parameters_transformers_builds():
    config = NemotronHConfig(**NEMOTRON, layers_block_type=[
        "linear_attention", "full_attention", "linear_attention"])
    imported = import_dict(config.to_dict())
    assert imported.faithful and imported.format == "nemotron_h"
    assert imported.arch.pattern == "M*M"
    assert param_count(imported.arch) == params(NemotronHForCausalLM(config))
    attention = imported.arch.layers[1]
    assert (attention.n_kv_heads, attention.head_dim, attention.rope) == (2, None, False)


def test_nemotron_h_reads_both_pattern_spellings_and_the_legacy_names():
    data = NemotronHConfig(**NEMOTRON, layers_block_type=[
        "linear_attention", "full_attention", "linear_attention"]).to_dict()
    by_list = import_dict(data).arch
    legacy = {**data, "layers_block_type": ["mamba", "attention", "mamba"]}
    by_pattern = {k: v for k, v in data.items() if k != "layers_block_type"}
    by_pattern["hybrid_override_pattern"] = "M*M"
    assert import_dict(legacy).arch == by_list == import_dict(by_pattern).arch


def test_nemotron_h_relu2_mlp_is_a_change_to_a_swiglu_of_the_same_parameters():
    config = NemotronHConfig(**NEMOTRON, layers_block_type=["linear_attention", "mlp"])
    with pytest.raises(ImportRefused, match="mlp_hidden_act = ungated relu2 MLP of width 48"):
        import_dict(config.to_dict(), source="nemotron.json")
    imported = import_dict(config.to_dict(), lossy=True)
    assert imported.arch.layers[1].d_hidden(32) == 32
    assert param_count(imported.arch) == params(NemotronHForCausalLM(config))


def test_nemotron_h_moe_refused_naming_the_field_or_made_dense():
    config = NemotronHConfig(**NEMOTRON, layers_block_type=["linear_attention", "moe"],
                             n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                             moe_shared_expert_intermediate_size=24)
    with pytest.raises(ImportRefused) as refused:
        import_dict(config.to_dict(), source="nemotron.json")
    assert "nemotron.json" in str(refused.value)
    assert "layers_block_type (moe) = mixture of 4 ungated experts" in str(refused.value)
    dense = import_dict(config.to_dict(), lossy=True).arch
    # Two experts and the shared one, 24 wide each and ungated: a SwiGLU of 2/3 of 72.
    assert dense.pattern == "M-" and dense.layers[1].d_hidden(32) == 48


def test_nemotron_h_ignores_tie_word_embeddings_as_transformers_does():
    config = NemotronHConfig(**NEMOTRON, layers_block_type=["linear_attention"],
                             tie_word_embeddings=True)
    imported = import_dict(config.to_dict())
    assert not imported.arch.tie_embeddings
    assert any("never ties" in note for note in imported.notes)
    assert param_count(imported.arch) == params(NemotronHForCausalLM(config))


def test_bamba_blocks_import_with_the_parameters_transformers_builds():
    config = BambaConfig(**BAMBA, num_hidden_layers=2, attn_layer_indices=[],
                         tie_word_embeddings=True)
    imported = import_dict(config.to_dict())
    assert imported.faithful and imported.arch.pattern == "M-M-"
    assert param_count(imported.arch) == params(BambaForCausalLM(config))


def test_bamba_attention_rotates_half_of_each_head_which_is_a_change():
    config = BambaConfig(**BAMBA, num_hidden_layers=2, attn_layer_indices=[1])
    with pytest.raises(ImportRefused, match=r"rope_parameters\.partial_rotary_factor = 0\.5"):
        import_dict(config.to_dict())
    imported = import_dict(config.to_dict(), lossy=True)
    assert imported.arch.pattern == "M-*-" and imported.arch.layers[2].rope
    assert param_count(imported.arch) == params(BambaForCausalLM(config))


def test_granite_without_experts_imports_with_transformers_parameters():
    config = GraniteMoeHybridConfig(**GRANITE, num_hidden_layers=2,
                                    layer_types=["mamba", "attention"])
    imported = import_dict(config.to_dict())
    assert imported.faithful and imported.arch.pattern == "M-*-"
    assert param_count(imported.arch) == params(GraniteMoeHybridForCausalLM(config))


@pytest.mark.parametrize(("field", "value"), [
    ("attention_multiplier", 1.0), ("embedding_multiplier", 12.0), ("logits_scaling", 8.0),
    ("num_local_experts", 4)])
def test_granite_multipliers_and_experts_are_refused_by_field(field, value):
    config = GraniteMoeHybridConfig(**{**GRANITE, field: value}, num_hidden_layers=2,
                                    layer_types=["mamba", "attention"])
    with pytest.raises(ImportRefused, match=f"- {field} ="):
        import_dict(config.to_dict())


def test_jamba_mamba_norms_are_the_one_change_and_cost_their_parameters():
    config = JambaConfig(**JAMBA, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1)
    with pytest.raises(ImportRefused, match="dt_layernorm"):
        import_dict(config.to_dict())
    imported = import_dict(config.to_dict(), lossy=True)
    assert imported.arch.pattern == "m-*-m-*-" and len(imported.changes) == 1
    # Exactly the dropped RMSNorm weights: dt_rank + 2 * d_state per Mamba layer.
    dropped = 2 * (math.ceil(32 / 16) + 2 * 8)
    assert params(JambaForCausalLM(config)) - param_count(imported.arch) == dropped


def test_jamba_attention_only_is_faithful():
    config = JambaConfig(**JAMBA, num_hidden_layers=2, attn_layer_period=1, attn_layer_offset=0)
    imported = import_dict(config.to_dict())
    assert imported.faithful and imported.arch.pattern == "*-*-"
    assert param_count(imported.arch) == params(JambaForCausalLM(config))


def test_jamba_experts_become_one_dense_mlp_of_the_active_width():
    config = JambaConfig(**{**JAMBA, "num_experts": 4}, num_hidden_layers=2, attn_layer_period=2,
                         attn_layer_offset=1)
    arch = import_dict(config.to_dict(), lossy=True).arch
    assert [arch.layers[i].d_hidden(32) for i in (1, 3)] == [48, 96]


@pytest.mark.parametrize(("cls", "minimal"), [
    (NemotronHConfig, {"layers_block_type": ["linear_attention", "full_attention", "mlp"]}),
    (BambaConfig, {"attn_layer_indices": [3]}),
    (GraniteMoeHybridConfig, {"layer_types": ["mamba"] * 31 + ["attention"]}),
    (JambaConfig, {}),
])
def test_fields_left_out_take_transformers_defaults(cls, minimal):
    config = cls(**minimal)
    data = {"model_type": config.model_type, **minimal}
    assert import_dict(data, lossy=True).arch == import_dict(config.to_dict(), lossy=True).arch


def test_falcon_h1_is_refused_even_lossy():
    with pytest.raises(ImportRefused, match="in parallel in every layer"):
        import_dict(FalconH1Config().to_dict(), lossy=True)


def test_an_explicit_format_must_match_the_model_type():
    data = BambaConfig(**BAMBA, num_hidden_layers=1).to_dict()
    with pytest.raises(ConfigError, match="model_type: 'bamba', but the format asked for is "
                                          "'jamba'"):
        import_dict(data, fmt="jamba", source="c.json")
    assert import_dict(data, fmt="hf").format == "bamba"


def test_mamba_ssm_config_imports_with_its_state_dict_parameters():
    imported = import_dict(MAMBA_SSM_CONFIG)
    assert imported.format == "mamba_ssm" and imported.arch.pattern == "M-M-*-"
    assert param_count(imported.arch) == sum(math.prod(s) for s in MAMBA_SSM_TABLE.values()) - (
        64 * 64)  # the head is tied: one tensor in hybridlab, listed twice in the table


def test_mamba_ssm_pads_the_vocabulary_and_refuses_what_it_cannot_convert():
    padded = import_dict({**MAMBA_SSM_CONFIG, "vocab_size": 60, "pad_vocab_size_multiple": 16})
    assert padded.arch.vocab_size == 64 and "padded to 64" in padded.notes[0]
    bias = {**MAMBA_SSM_CONFIG, "ssm_cfg": {**MAMBA_SSM_CONFIG["ssm_cfg"], "bias": True}}
    with pytest.raises(ImportRefused, match=r"m.json: mamba_ssm: ssm_cfg.bias = True"):
        import_dict(bias, source="m.json")


def test_megatron_arguments_and_their_defaults():
    arch = import_dict(MEGATRON).arch
    assert arch.pattern == "M-M*-" and arch.tie_embeddings
    attention = arch.layers[3]
    assert (attention.n_heads, attention.n_kv_heads, attention.rope) == (4, 2, True)
    assert arch.layers[0].nheads(64) == 8 and arch.layers[1].d_hidden(64) == 96
    # Megatron's own defaults: LayerNorm, biases, learned absolute positions, gelu MLP.
    bare = {k: MEGATRON[k] for k in ("--hybrid-layer-pattern", "--hidden-size",
                                      "--num-attention-heads", "--vocab-size",
                                      "--mamba-head-dim", "--mamba-num-groups")}
    with pytest.raises(ImportRefused) as refused:
        import_dict(bare, source="args.json")
    for flag in ("--normalization = LayerNorm", "--disable-bias-linear = absent",
                 "--position-embedding-type = learned_absolute", "--swiglu = ungated gelu MLP"):
        assert flag in str(refused.value)


def test_megatron_spellings_shell_files_and_vocab_padding(tmp_path):
    old = {("--hybrid-override-pattern" if k == "--hybrid-layer-pattern" else k): v
           for k, v in MEGATRON.items()}
    assert import_dict(old).arch == import_dict(MEGATRON).arch
    with pytest.raises(ConfigError, match="disagree"):
        import_dict({**MEGATRON, "--hybrid-override-pattern": "M*"})
    lines = ["# model", "MODEL_ARGS=("]
    for flag, value in MEGATRON.items():
        lines.append(f"    {flag}" + ("" if value is True else f" {value}") + " \\")
    script = tmp_path / "args.sh"
    script.write_text("\n".join([*lines, ")"]) + "\n")
    assert import_config(script).arch == import_dict(MEGATRON).arch
    padded = import_dict({**MEGATRON, "--vocab-size": 100})
    assert padded.arch.vocab_size == 128 and any("padded to 128" in n for n in padded.notes)


def test_megatron_ratios_allocate_the_pattern_megatron_does():
    # megatron/core/ssm/mamba_hybrid_layer_allocation.py keeps the attention count, puts
    # attention between Mamba runs that open and close the stack, and spreads the MLPs.
    for layers, attention, mlp in ((52, 4 / 52, 24 / 52), (10, 0.2, 0.3), (9, 0.0, 0.0)):
        pattern = megatron_pattern(layers, attention, mlp)
        assert pattern.count("*") == round(layers * attention)
        assert pattern.count("-") == round(layers * mlp)
        assert pattern[0] == "M" and "*" not in (pattern[0], pattern[-1])
    args = {**MEGATRON, "--num-layers": 10, "--hybrid-attention-ratio": 0.2,
            "--hybrid-mlp-ratio": 0.3}
    del args["--hybrid-layer-pattern"]
    assert import_dict(args).arch.pattern == megatron_pattern(10, 0.2, 0.3)


def export_and_import(arch: ArchConfig, fmt: str, tmp_path) -> tuple:
    folder = tmp_path / f"export-{fmt}"
    with atomic_folder(folder) as tmp:
        written = write_config_export(arch, fmt, tmp)
    return written, import_config(folder)


def nemotron_source() -> dict:
    return NemotronHConfig(**NEMOTRON, layers_block_type=[
        "linear_attention", "full_attention", "linear_attention"]).to_dict()


def bamba_source() -> dict:
    return BambaConfig(**BAMBA, num_hidden_layers=2, attn_layer_indices=[]).to_dict()


def granite_source() -> dict:
    return GraniteMoeHybridConfig(**GRANITE, num_hidden_layers=2,
                                  layer_types=["mamba", "attention"]).to_dict()


MAMBA1_SSM = {**MAMBA_SSM_CONFIG, "attn_layer_idx": [], "d_intermediate": 0,
              "ssm_cfg": {"layer": "Mamba1", "d_state": 8, "d_conv": 4, "expand": 2,
                          "dt_rank": 4}}
NO_ATTENTION = {k: v for k, v in MEGATRON.items() if k not in (
    "--num-attention-heads", "--group-query-attention", "--num-query-groups", "--kv-channels",
    "--rotary-base")} | {"--hybrid-layer-pattern": "M-M-", "--position-embedding-type": "none"}


@pytest.mark.parametrize(("fmt", "source", "flavour"), [
    ("hf", nemotron_source, "nemotron_h"),
    ("hf", bamba_source, "bamba"),
    ("hf", granite_source, "granitemoehybrid"),
    ("mamba_ssm", lambda: MAMBA_SSM_CONFIG, None),
    ("mamba_ssm", lambda: MAMBA1_SSM, None),
    ("megatron", lambda: MEGATRON, None),
    ("megatron", lambda: NO_ATTENTION, None),
    ("hybridlab", lambda: MAMBA_SSM_CONFIG, None),
])
def test_import_export_import_is_the_identity(fmt, source, flavour, tmp_path):
    first = import_dict(source())
    written, again = export_and_import(first.arch, fmt, tmp_path)
    assert written.faithful and written.flavour == flavour
    assert again.format == (flavour or fmt)
    assert again.arch.canonical_hash() == first.arch.canonical_hash()
    assert again.arch.to_dict() == first.arch.to_dict()


def test_an_export_folder_without_a_manifest_is_read_by_its_config_file(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(bamba_source()))
    assert import_config(folder).arch == import_dict(bamba_source()).arch


def test_cli_writes_the_import_and_refuses_with_the_field(tmp_path, capsys):
    source = tmp_path / "config.json"
    source.write_text(json.dumps(BambaConfig(**BAMBA, num_hidden_layers=2,
                                             attn_layer_indices=[1]).to_dict()))
    out = tmp_path / "arch.yaml"
    assert main(["import", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybridlab import: error: {source}: this bamba config")
    assert "partial_rotary_factor" in err and not out.exists()
    assert main(["import", str(source), "--out", str(out), "--lossy"]) == 0
    assert "LOSSY, 1 changes" in capsys.readouterr().out
    assert ArchConfig.load(out) == import_dict(json.loads(source.read_text()), lossy=True).arch
    assert main(["import", "samba-421m", "--out", str(out), "--scale-to", "2x",
                 "--strategy", "stack"]) == 0
    assert ArchConfig.load(out).n_layers == 52
    assert main(["import", "samba-421m", "--out", str(out), "--strategy", "stack"]) == 2
    assert "--strategy: applies only with --scale-to" in capsys.readouterr().err
