"""The shipped published layouts: each loads, names its source, and is what importing the
published config computes (the lossy import, its changes written in the header)."""

import pytest

from hybridlab import published
from hybridlab.config import ConfigError
from hybridlab.cost import param_count
from hybridlab.export.importing import import_dict

# The published configs, transcribed from the Hugging Face Hub config.json files the layouts
# name (nvidia/Nemotron-H-8B-Base-8K, ibm-ai-platform/Bamba-9B, ai21labs/Jamba-v0.1), the fields
# that decide the architecture.
NEMOTRON_H_8B = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
    "hidden_size": 4096, "vocab_size": 131072, "tie_word_embeddings": False,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "num_attention_heads": 32, "num_key_value_heads": 8, "attention_head_dim": 128,
    "mamba_num_heads": 128, "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8,
    "conv_kernel": 4, "expand": 2, "chunk_size": 128, "mamba_hidden_act": "silu",
    "use_conv_bias": True, "use_bias": False, "intermediate_size": 21504,
    "mlp_hidden_act": "relu2", "mlp_bias": False, "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": False, "max_position_embeddings": 8192,
}
BAMBA_9B = {
    "architectures": ["BambaForCausalLM"], "model_type": "bamba",
    "hidden_size": 4096, "num_hidden_layers": 32, "attn_layer_indices": [9, 18, 27],
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
    "hidden_act": "silu", "mamba_n_heads": 128, "mamba_d_head": 64, "mamba_n_groups": 1,
    "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "vocab_size": 128256, "tie_word_embeddings": False,
    "pad_token_id": 0,
}
JAMBA_V01 = {
    "architectures": ["JambaForCausalLM"], "model_type": "jamba",
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "hidden_act": "silu",
    "attn_layer_period": 8, "attn_layer_offset": 4, "expert_layer_period": 2,
    "expert_layer_offset": 1, "num_experts": 16, "num_experts_per_tok": 2,
    "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 256,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "rms_norm_eps": 1e-6,
    "vocab_size": 65536, "tie_word_embeddings": False,
}
PUBLISHED = {"nemotron-h-8b": NEMOTRON_H_8B, "bamba-9b": BAMBA_9B,
             "jamba-v0.1-dense": JAMBA_V01}


def test_every_layout_loads_and_names_its_source():
    assert set(published.names()) == {*PUBLISHED, "samba-421m"}
    for name in published.names():
        arch = published.layout(name)
        assert arch.n_layers > 0
        text = published.describe(name)
        assert any(where in text for where in ("arXiv:", "Hugging Face Hub", "github.com"))
        assert "no weights" in text


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_layout_is_the_lossy_import_of_its_published_config(name):
    imported = import_dict(PUBLISHED[name], lossy=True)
    assert published.layout(name) == imported.arch
    header = " ".join(published.describe(name).split())
    for change in imported.changes:
        assert " ".join(change.describe().split()) in header


@pytest.mark.parametrize(("name", "billions"), [
    # Nemotron-H-8B; Bamba's checkpoint is named Bamba-9.8b; Jamba has 12B active parameters
    # (its paper's Table 1), which the dense replacement of its experts keeps; Samba_421M.
    ("nemotron-h-8b", 8.1), ("bamba-9b", 9.78), ("jamba-v0.1-dense", 12.1),
    ("samba-421m", 0.4218),
])
def test_layouts_have_the_published_sizes(name, billions):
    assert param_count(published.layout(name)) / 1e9 == pytest.approx(billions, rel=0.01)


def test_an_unknown_layout_is_refused_with_the_shipped_names():
    with pytest.raises(ConfigError, match=r"no published layout 'nemotron'.*nemotron-h-8b"):
        published.layout("nemotron")
