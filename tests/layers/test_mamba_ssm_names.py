"""Parameter names and shapes against mamba_ssm's modules, written down from its source.

The tables stand without mamba_ssm installed (it is a CUDA package; tests/export/
test_mamba_ssm_runs.py runs it on CPU where .ci/mamba-ssm-cpu.sh installed it). They are transcribed
from mamba_ssm/modules/mamba_simple.py (Mamba), mamba2.py (Mamba2), mamba3.py (Mamba3 with
is_outproj_norm=False), mha.py (MHA with qkv_proj_bias=False, out_proj_bias=False) and mlp.py
(GatedMLP, bias=False) for the settings named in each case. The Mamba3 cases are also checked
against mamba_ssm's module itself where it is installed.
"""

import importlib.util
import sys
import types

import pytest
import torch

from hybridlab.config import AttentionSpec, Mamba1Spec, Mamba2Spec, MLPSpec
from hybridlab.layers import Mamba3Spec, build_layer

MAMBA3_CASES = [
    # Mamba3(d_model=64, d_state=32, expand=2, headdim=16): d_inner 128, nheads 8,
    # rope_fraction 0.5 -> 8 angles; in_proj 2*128 + 2*32 + 3*8 + 8 = 352
    (64, Mamba3Spec(d_state=32, headdim=16), {
        "dt_bias": (8,),
        "B_bias": (8, 1, 32),
        "C_bias": (8, 1, 32),
        "D": (8,),
        "in_proj.weight": (352, 64),
        "B_norm.weight": (32,),
        "C_norm.weight": (32,),
        "out_proj.weight": (64, 128),
    }),
    # Mamba3(d_model=48, d_state=16, expand=2, headdim=24, ngroups=2, rope_fraction=1.0,
    # is_mimo=True, mimo_rank=2): d_inner 96, nheads 4, 8 angles;
    # in_proj 2*96 + 2*16*2*2 + 3*4 + 8 = 340
    (48, Mamba3Spec(d_state=16, headdim=24, ngroups=2, rope_fraction=1.0, mimo_rank=2), {
        "dt_bias": (4,),
        "B_bias": (4, 2, 16),
        "C_bias": (4, 2, 16),
        "mimo_x": (4, 2, 24),
        "mimo_z": (4, 2, 24),
        "mimo_o": (4, 2, 24),
        "D": (4,),
        "in_proj.weight": (340, 48),
        "B_norm.weight": (16,),
        "C_norm.weight": (16,),
        "out_proj.weight": (48, 96),
    }),
]

CASES = [
    # Mamba(d_model=64, d_state=16, d_conv=4, expand=2): d_inner 128, dt_rank ceil(64/16) = 4
    (64, Mamba1Spec(d_state=16, d_conv=4, expand=2), {
        "A_log": (128, 16),
        "D": (128,),
        "in_proj.weight": (256, 64),
        "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,),
        "x_proj.weight": (36, 128),
        "dt_proj.weight": (128, 4),
        "dt_proj.bias": (128,),
        "out_proj.weight": (64, 128),
    }),
    # Mamba(d_model=48, d_state=8, d_conv=3, expand=3, dt_rank=7): d_inner 144
    (48, Mamba1Spec(d_state=8, d_conv=3, expand=3, dt_rank=7), {
        "A_log": (144, 8),
        "D": (144,),
        "in_proj.weight": (288, 48),
        "conv1d.weight": (144, 1, 3),
        "conv1d.bias": (144,),
        "x_proj.weight": (23, 144),
        "dt_proj.weight": (144, 7),
        "dt_proj.bias": (144,),
        "out_proj.weight": (48, 144),
    }),
    # Mamba2(d_model=64, d_state=32, d_conv=4, expand=2, headdim=16, ngroups=2):
    # d_inner 128, nheads 8, conv_dim 128 + 2*2*32 = 256, d_in_proj 2*128 + 2*2*32 + 8 = 392
    (64, Mamba2Spec(d_state=32, d_conv=4, expand=2, headdim=16, ngroups=2), {
        "dt_bias": (8,),
        "A_log": (8,),
        "D": (8,),
        "in_proj.weight": (392, 64),
        "conv1d.weight": (256, 1, 4),
        "conv1d.bias": (256,),
        "norm.weight": (128,),
        "out_proj.weight": (64, 128),
    }),
    # Mamba2(d_model=96, d_state=64, d_conv=2, expand=1, headdim=32, ngroups=1):
    # d_inner 96, nheads 3, conv_dim 96 + 128 = 224, d_in_proj 192 + 128 + 3 = 323
    (96, Mamba2Spec(d_state=64, d_conv=2, expand=1, headdim=32, ngroups=1), {
        "dt_bias": (3,),
        "A_log": (3,),
        "D": (3,),
        "in_proj.weight": (323, 96),
        "conv1d.weight": (224, 1, 2),
        "conv1d.bias": (224,),
        "norm.weight": (96,),
        "out_proj.weight": (96, 96),
    }),
    # MHA(embed_dim=64, num_heads=8, num_heads_kv=2): head_dim 8, qkv_dim 8*(8+4) = 96
    (64, AttentionSpec(n_heads=8, n_kv_heads=2), {
        "in_proj.weight": (96, 64),
        "out_proj.weight": (64, 64),
    }),
    # GatedMLP(in_features=64, hidden_features=176, multiple_of=16): fc1 -> 2*176
    (64, MLPSpec(multiplier=2.75, multiple_of=16), {
        "fc1.weight": (352, 64),
        "fc2.weight": (64, 176),
    }),
    *MAMBA3_CASES,
]


@pytest.mark.parametrize(("d_model", "spec", "expected"), CASES)
def test_names_and_shapes_match_mamba_ssm(d_model, spec, expected):
    mixer = build_layer(spec, d_model)
    got = {name: tuple(t.shape) for name, t in mixer.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize(("d_model", "spec", "expected"), MAMBA3_CASES)
def test_mamba3_table_is_mamba_ssm_own(d_model, spec, expected, monkeypatch):
    """mamba_ssm's Mamba3 built with the same settings has the table's names and shapes."""
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not installed (.ci/mamba-ssm-cpu.sh installs it)")
    pytest.importorskip("triton")
    # mamba_ssm's package import pulls its CUDA selective-scan extension; nothing here runs it
    if "selective_scan_cuda" not in sys.modules:
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("x"))
    mamba3 = pytest.importorskip("mamba_ssm.modules.mamba3")
    # its MIMO constructor only checks that the TileLang kernel imported; nothing here runs it
    monkeypatch.setattr(mamba3, "mamba3_mimo_combined", object(), raising=False)
    module = mamba3.Mamba3(
        d_model, d_state=spec.d_state, expand=spec.expand, headdim=spec.headdim,
        ngroups=spec.ngroups, rope_fraction=spec.rope_fraction, is_mimo=spec.mimo_rank > 1,
        mimo_rank=spec.mimo_rank,
    )
    assert {name: tuple(t.shape) for name, t in module.state_dict().items()} == expected
    # and a built hybridlab layer's weights load into it under strict keys
    ours = build_layer(spec, d_model)
    ours.reset_parameters(torch.Generator().manual_seed(0), n_layers=2)
    module.load_state_dict(ours.state_dict(), strict=True)
