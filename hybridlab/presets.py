"""Named architectures: small, known-good hybrids to start from or to compare against."""

from __future__ import annotations

from hybridlab.config import ArchConfig, AttentionSpec, Mamba1Spec, Mamba2Spec, MLPSpec

BYTE_VOCAB = 256


def _tiny_hybrid() -> ArchConfig:
    return ArchConfig.from_pattern(
        "m*-M-*M-", d_model=64, vocab_size=BYTE_VOCAB,
        mamba1=Mamba1Spec(d_state=16), mamba2=Mamba2Spec(d_state=32, headdim=16, chunk_size=32),
        attention=AttentionSpec(n_heads=4, n_kv_heads=2), mlp=MLPSpec(multiplier=3.0),
    )


def _small_hybrid() -> ArchConfig:
    return ArchConfig.from_pattern(
        "M-M-M*-M-M-M*-", d_model=256, vocab_size=BYTE_VOCAB,
        mamba2=Mamba2Spec(d_state=64, headdim=32),
        attention=AttentionSpec(n_heads=8, n_kv_heads=2),
    )


def _small_transformer() -> ArchConfig:
    return ArchConfig.from_pattern(
        "*-*-*-*-", d_model=256, vocab_size=BYTE_VOCAB, attention=AttentionSpec(n_heads=8),
    )


PRESETS = {
    "tiny-hybrid": _tiny_hybrid,
    "small-hybrid": _small_hybrid,
    "small-transformer": _small_transformer,
}


def preset(name: str) -> ArchConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
