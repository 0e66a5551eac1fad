"""Every mixer's step-by-step decoding reproduces its full-sequence forward."""

import zlib

import pytest
import torch

from hybridlab.config import AttentionSpec, Mamba1Spec, Mamba2Spec, MLPSpec
from hybridlab.layers import build_layer

D_MODEL = 32
SPECS = {
    "mamba1": Mamba1Spec(d_state=8, d_conv=4),
    "mamba1-rank": Mamba1Spec(d_state=4, d_conv=2, expand=1, dt_rank=6),
    "mamba2": Mamba2Spec(d_state=16, headdim=16, chunk_size=8),
    "mamba2-groups": Mamba2Spec(d_state=8, headdim=8, ngroups=4, d_conv=3, chunk_size=16),
    "attention": AttentionSpec(n_heads=4),
    "attention-gqa": AttentionSpec(n_heads=4, n_kv_heads=2, head_dim=12),
    "attention-window": AttentionSpec(n_heads=2, n_kv_heads=1, sliding_window=5),
    "attention-norope": AttentionSpec(n_heads=2, rope=False),
    "mlp": MLPSpec(multiplier=2.0),
}


def make(name: str, seed: int):
    mixer = build_layer(SPECS[name], D_MODEL)
    mixer.reset_parameters(torch.Generator().manual_seed(seed), n_layers=2)
    return mixer


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize(("batch", "seqlen", "prefill"), [(1, 1, 0), (2, 13, 0), (3, 21, 7),
                                                          (2, 19, 19)])
def test_step_reproduces_forward(name, batch, seqlen, prefill):
    seed = zlib.crc32(f"{name}-{batch}-{seqlen}-{prefill}".encode())
    mixer = make(name, seed)
    x = torch.randn(batch, seqlen, D_MODEL, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.allocate_cache(batch, seqlen, device=x.device, dtype=x.dtype)
        outputs = []
        if prefill:
            outputs.append(mixer(x[:, :prefill], cache=cache))
        outputs += [mixer.step(x[:, t], cache)[:, None] for t in range(prefill, seqlen)]
        stepped = torch.cat(outputs, dim=1)
    # fp32 throughout; the recurrent and parallel forms sum in different orders.
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-5)


def test_windowed_cache_stays_at_window_size():
    mixer = make("attention-window", 0)
    cache = mixer.allocate_cache(1, 100, device=torch.device("cpu"), dtype=torch.float32)
    assert cache.k.shape[1] == 5


def test_full_cache_refuses_more_tokens():
    mixer = make("attention", 0)
    cache = mixer.allocate_cache(1, 2, device=torch.device("cpu"), dtype=torch.float32)
    x = torch.zeros(1, D_MODEL)
    mixer.step(x, cache)
    mixer.step(x, cache)
    with pytest.raises(ValueError, match="full"):
        mixer.step(x, cache)
