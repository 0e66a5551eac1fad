import zlib

import pytest
import torch

from hybridlab.config import ArchConfig, AttentionSpec, Mamba1Spec, Mamba2Spec
from hybridlab.layers import Mamba3Spec
from hybridlab.model import HybridLM

VOCAB = 50
SPECS = {
    "mamba1": Mamba1Spec(d_state=8),
    "mamba2": Mamba2Spec(d_state=16, headdim=16, chunk_size=8),
    "attention": AttentionSpec(n_heads=4, n_kv_heads=2, sliding_window=6),
    "mamba3": Mamba3Spec(d_state=8, headdim=16, chunk_size=8),
}
PATTERNS = ["m", "M", "*", "-", "m*-M-*M-", "MM*", "*-m-*", "3", "3-M-*-3-", "M3*3"]


def build(pattern: str, *, seed: int = 0, tie: bool = True) -> HybridLM:
    config = ArchConfig.from_pattern(
        pattern, d_model=32, vocab_size=VOCAB, tie_embeddings=tie,
        mamba1=SPECS["mamba1"], mamba2=SPECS["mamba2"], attention=SPECS["attention"],
        mamba3=SPECS["mamba3"],
    )
    return HybridLM(config, seed=seed).eval()


def tokens(batch: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("batch", "seqlen", "prefill"), [(2, 11, 1), (1, 19, 9)])
def test_decoding_reproduces_full_logits(pattern, batch, seqlen, prefill):
    seed = zlib.crc32(f"{pattern}{batch}{seqlen}".encode())
    model = build(pattern, seed=seed)
    ids = tokens(batch, seqlen, seed)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(batch, seqlen)
        head = model(ids[:, :prefill], cache=cache)
        tail = model(ids[:, prefill:], cache=cache)
    assert cache.seqlen == seqlen
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["m*-M-*M-", "*", "mM", "3-M-*-3-"])
def test_generate_with_cache_equals_greedy_without(pattern):
    model = build(pattern, seed=3)
    prompt = tokens(2, 5, 4)
    cached = model.generate(prompt, 12)
    uncached = model.generate(prompt, 12, use_cache=False)
    assert cached.shape == (2, 17)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)


def test_sampling_is_seeded():
    model = build("m*M", seed=1)
    prompt = tokens(3, 4, 0)
    first = model.generate(prompt, 8, temperature=1.0, top_k=10, seed=7)
    assert torch.equal(first, model.generate(prompt, 8, temperature=1.0, top_k=10, seed=7))
    assert not torch.equal(first, model.generate(prompt, 8, temperature=1.0, top_k=10, seed=8))


def test_init_is_seeded_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, c = build("m*-M", seed=5), build("m*-M", seed=5), build("m*-M", seed=6)
    assert torch.equal(before, torch.random.get_rng_state())
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(),
                                  strict=True):
        assert torch.equal(pa, pb), name
        if name.endswith(("weight", "dt_bias", "dt_proj.bias")) and "norm" not in name:
            assert not torch.equal(pa, pc), name


@pytest.mark.parametrize("tie", [True, False])
def test_config_round_trip_rebuilds_same_model(tmp_path, tie):
    model = build("m*-M-*M-", seed=11, tie=tie)
    path = tmp_path / "arch.yaml"
    model.config.save(path)
    again = HybridLM(ArchConfig.load(path), seed=11).eval()
    ids = tokens(2, 9, 1)
    assert sum(p.numel() for p in again.parameters()) == sum(
        p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    assert (model.lm_head.weight is model.backbone.embedding.weight) == tie


def test_state_dict_names_follow_mamba_ssm_lm():
    names = set(build("m*", tie=False).state_dict())
    assert {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight",
            "backbone.layers.0.norm.weight", "backbone.layers.0.mixer.A_log",
            "backbone.layers.1.mixer.in_proj.weight"} <= names


def test_training_step_gives_finite_gradients_everywhere():
    model = build("m*-M-*M-", seed=2).train()
    ids = tokens(2, 17, 3)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_ssm_parameters_stay_fp32_under_autocast():
    model = build("mM*", seed=4)
    ids = tokens(2, 13, 5)
    with torch.no_grad():
        reference = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    logits.float().sum().backward()
    ssm = [(n, p) for n, p in model.named_parameters()
           if n.endswith(("A_log", ".D", "dt_bias", "dt_proj.bias"))]
    assert len(ssm) == 6
    for name, p in ssm:
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    # bf16 matmuls keep ~3 significant digits; logits here are O(1).
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)


def test_generate_rejects_bad_arguments():
    model = build("*")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tokens(1, 3, 0), -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tokens(1, 3, 0), 2, temperature=-1.0)
