import pytest
import torch

from hybridlab.config import ArchConfig, AttentionSpec, Mamba1Spec, Mamba2Spec, MLPSpec
from hybridlab.cost import (
    cost_report,
    flops_per_token,
    inference_state_bytes,
    param_count,
)
from hybridlab.layers.attention import attended_keys
from hybridlab.model import HybridLM

MLP = MLPSpec(multiplier=2.0, multiple_of=4)  # hidden 16
ATTN = AttentionSpec(n_heads=2, n_kv_heads=1, head_dim=4)
ATTN_WINDOW = AttentionSpec(n_heads=2, n_kv_heads=1, head_dim=4, sliding_window=2)
M1 = Mamba1Spec(d_state=2, d_conv=2, expand=2)  # d_inner 16, dt_rank ceil(8/16) = 1
M2 = Mamba2Spec(d_state=4, headdim=4, expand=2, ngroups=1, d_conv=2)  # 4 heads, conv_dim 24


def tiny(*layers, tie=True) -> ArchConfig:
    return ArchConfig(d_model=8, vocab_size=10, layers=layers, tie_embeddings=tie)


# Worked by hand; each layer count includes its block's pre-norm (8).
#   mlp:    fc1 8*32 + fc2 16*8                                               = 384 (+8)
#   attn:   in_proj 8*4*(2+2*1) + out_proj 2*4*8                              = 192 (+8)
#   mamba1: in 8*32 + conv 16*2+16 + x_proj 16*(1+4) + dt 1*16+16 + A 32 + D 16 + out 128 = 592
#   mamba2: in 8*(16+24+4) + conv 24*2+24 + dt_bias/A_log/D 3*4 + norm 16 + out 128     = 580
HAND_PARAMS = {"mlp": 392, "attn": 200, "mamba1": 600, "mamba2": 588}


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ((MLP,), 80 + 392 + 8),
        ((ATTN,), 80 + 200 + 8),
        ((M1,), 80 + 600 + 8),
        ((M2,), 80 + 588 + 8),
        ((M1, ATTN, MLP, M2), 80 + 392 + 200 + 600 + 588 + 8),
    ],
)
def test_param_count_by_hand(layers, expected):
    assert param_count(tiny(*layers)) == expected
    assert param_count(tiny(*layers, tie=False)) == expected + 80


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pattern", ["m*-M", "MM*-m", "*", "-m-"])
def test_param_count_equals_built_model(pattern, tie):
    config = ArchConfig.from_pattern(
        pattern, d_model=32, vocab_size=70, tie_embeddings=tie,
        mamba2=Mamba2Spec(headdim=16, d_state=8, ngroups=2),
        attention=AttentionSpec(n_heads=4, n_kv_heads=2),
        mamba1=Mamba1Spec(dt_rank=5, d_conv=3),
    )
    model = HybridLM(config, seed=0)
    assert param_count(config) == sum(p.numel() for p in model.parameters())
    report = cost_report(config, 64)
    assert report.params == param_count(config)
    assert sum(layer.params for layer in report.layers) == param_count(config) - 70 * 32 * (
        1 if tie else 2) - 32


def test_flops_by_hand():
    # Context 4, no window: a token attends on average (4+1)/2 = 2.5 keys.
    #   attn:   2*(128 + 64) + 4*2*4*2.5                          = 464
    #   mlp:    2*3*8*16                                          = 768
    #   mamba1: 2*(256+80+16+128) + 2*16*2 + 9*16*2               = 1312
    #   mamba2: 2*(352+128) + 2*24*2 + 6*16*4                     = 1440
    #   head:   2*8*10                                            = 160
    assert flops_per_token(tiny(ATTN, MLP, M1, M2), 4) == 464 + 768 + 1312 + 1440 + 160
    # Decoding the 5th token attends to 5 keys; window 2 caps it at 2.
    assert flops_per_token(tiny(ATTN), 4, decode=True) == 2 * 192 + 4 * 2 * 4 * 5 + 160
    assert flops_per_token(tiny(ATTN_WINDOW), 4, decode=True) == 2 * 192 + 4 * 2 * 4 * 2 + 160


@pytest.mark.parametrize(("context", "window"), [(1, None), (7, None), (9, 3), (50, 8), (5, 10)])
def test_attended_keys_matches_brute_force(context, window):
    brute = sum(min(t, window or t) for t in range(1, context + 1)) / context
    assert attended_keys(context, window) == pytest.approx(brute)


def test_ssm_flops_do_not_grow_with_context():
    ssm_only = tiny(M1, M2, MLP)
    assert flops_per_token(ssm_only, 16) == flops_per_token(ssm_only, 4096)
    assert flops_per_token(tiny(ATTN), 4096) > flops_per_token(tiny(ATTN), 16)


def test_state_bytes_by_hand():
    # bf16 cache (2 bytes), fp32 SSM state (4 bytes), context 4:
    #   attn K+V 2*4 tokens*1 kv head*4*2 = 64; window 2 keeps 2 tokens = 32
    #   mamba1 conv 16*2*2 + ssm 16*2*4 = 192 ; mamba2 conv 24*2*2 + ssm 4*4*4*4 = 352
    report = cost_report(tiny(ATTN, ATTN_WINDOW, M1, M2, MLP), 4)
    assert [layer.state_bytes for layer in report.layers] == [64, 32, 192, 352, 0]
    assert report.state_bytes == 640


def test_kv_cache_grows_mamba_state_does_not():
    config = tiny(ATTN, M1, M2)
    short, long = cost_report(config, 128), cost_report(config, 4096)
    assert long.layers[0].state_bytes == 32 * short.layers[0].state_bytes
    assert long.layers[1].state_bytes == short.layers[1].state_bytes
    assert long.layers[2].state_bytes == short.layers[2].state_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("context", "batch"), [(1, 1), (37, 2), (300, 3)])
def test_state_bytes_equal_allocated_cache(context, batch, dtype):
    config = ArchConfig.from_pattern(
        "m*-M*", d_model=32, vocab_size=20,
        mamba2=Mamba2Spec(headdim=16, d_state=8), attention=AttentionSpec(
            n_heads=4, n_kv_heads=2, sliding_window=64),
    )
    model = HybridLM(config, seed=0)
    cache = model.allocate_cache(batch, context, dtype=dtype)
    assert cache.nbytes() == inference_state_bytes(config, context, dtype=dtype,
                                                   batch_size=batch)


def test_bad_context_is_refused():
    with pytest.raises(ValueError, match="context"):
        flops_per_token(tiny(MLP), 0)
