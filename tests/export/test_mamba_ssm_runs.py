"""mamba_ssm exports load in mamba_ssm's ``MambaLMHeadModel`` and compute what HybridLM computes.

Each architecture is exported with trained-looking weights (every parameter moved off its initial
value), loaded with ``MambaLMHeadModel.from_pretrained(folder, device="cpu")`` (which loads
``pytorch_model.bin`` with strict keys; ``model.safetensors`` is loaded strictly as well) and
compared with HybridLM: logits within ``LOGIT_ATOL`` (float32; up to 1.5e-6 seen) and the same
greedy continuation.

mamba_ssm is a CUDA package; installed from its sdist without the CUDA build (see the install
note below) its Python modules import and its models build on CPU. On CPU tensors every module
runs plain torch except a few fused kernels, which ``mamba_ssm_cpu`` swaps for the torch
references mamba_ssm (and flash_attn) ship for them, the ones their own tests check the kernels
against. None changes what is computed:

- ``selective_scan_fn`` (CUDA) -> ``selective_scan_ref``, ``selective_state_update`` (Triton)
  -> ``selective_state_update_ref``: the Mamba-1 scan and the decoding step of both SSMs.
- ``layer_norm_fn`` (Triton, the fused add + RMSNorm of ``fused_add_norm=True``, as exported)
  -> ``rms_norm_ref`` with the residual; the gated ``rmsnorm_fn`` (Triton) of Mamba2's norm ->
  its ``rms_norm_ref`` with the same ``group_size`` and ``norm_before_gate``.
- ``mamba_chunk_scan_combined`` (Triton) -> ``ssd_minimal_discrete`` (mamba_ssm's SSD listing),
  after the dt preprocessing the kernel does itself (``+ dt_bias``, softplus, ``dt_limit``) and
  with its ``D * x`` skip; zero-padded to whole chunks (dt = 0 changes no state).
- Mamba2's ``use_mem_eff_path`` is switched off on the loaded modules: the fused
  ``mamba_split_conv1d_scan_combined`` needs causal_conv1d's CUDA kernel; the unfused branch of
  ``Mamba2.forward`` computes the same conv -> SSD scan -> gated norm (``group_size = d_ssm //
  ngroups``) -> out_proj, and is the branch mamba_ssm itself takes whenever it prefills a cache.
  (``use_mem_eff_path`` is a kernel switch; the exporter's reader treats it as one.)
- flash_attn's Triton ``apply_rotary`` -> flash_attn's ``apply_rotary_emb_torch`` over the
  same cos/sin tables; MHA's attention itself is already torch SDPA without flash_attn.
- Without causal_conv1d, Mamba, Mamba2 and MHA take their ``nn.Conv1d`` branches on their own.

Greedy generation: for attention-free models with mamba_ssm's own ``generate`` (prefill, then
``step``). mamba_ssm's cached decoding through attention does not run correctly on CPU, so those
models are decoded greedily by rerunning mamba_ssm's full forward: RoPE with ``rotary_emb_dim %
16 == 0`` decodes only through flash_attn's CUDA ``flash_attn_with_kvcache``, and the fallback
calls SDPA with ``is_causal=True`` on one query against the whole cache, which masks everything
but the first key (SDPA's causal mask is top-left aligned).

Install (the CUDA builds skipped; causal-conv1d is left out on purpose)::

    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation \
        --no-deps mamba-ssm==2.3.2.post1
    FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE pip install \
        --no-build-isolation --no-deps flash-attn==2.8.3.post2   # RoPE cases only
    pip install einops wheel   # mamba_ssm's import needs einops; the sdists' setup.py needs wheel
"""

import importlib.util
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hybridlab.config import ArchConfig, AttentionSpec, Mamba1Spec, Mamba2Spec, MLPSpec
from hybridlab.export import export_model
from hybridlab.model import HybridLM

# The CUDA extensions mamba_ssm and flash_attn import at module level, built or not. Stand-ins
# only for the import (nothing here calls them), removed again so no other test sees them.
_STUBS = [name for name, package in (("selective_scan_cuda", "mamba_ssm"),
                                     ("flash_attn_2_cuda", "flash_attn"))
          if importlib.util.find_spec(package) is not None
          and importlib.util.find_spec(name) is None]
for _name in _STUBS:
    sys.modules[_name] = types.ModuleType(_name)
try:
    mamba_ssm = pytest.importorskip("mamba_ssm")
    from mamba_ssm.models import mixer_seq_simple
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules import block, mamba2, mamba_simple, mha, ssd_minimal
    from mamba_ssm.ops import selective_scan_interface
    from mamba_ssm.ops.triton import layer_norm, layernorm_gated, selective_state_update

    rotary = sys.modules.get("flash_attn.layers.rotary") if mha.RotaryEmbedding else None
finally:
    for _name in _STUBS:
        sys.modules.pop(_name, None)
    if "flash_attn_2_cuda" in _STUBS:
        # flash_attn was imported over the stand-in: let a later `import flash_attn` fail as usual.
        for _name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
            sys.modules.pop(_name)

from einops import repeat  # noqa: E402  (a mamba_ssm dependency)

LOGIT_ATOL = 1e-5
VOCAB = 64

FAMILIES = {
    # Mamba-1 blocks with a SwiGLU MLP each (width 128: no padding), tied head.
    "mamba1-mlp-tied": dict(pattern="M-M-", tie=True, mamba1=Mamba1Spec(d_state=8),
                            mlp=MLPSpec(multiplier=2.0, multiple_of=16)),
    # Mamba-1 alone (d_intermediate 0), explicit dt_rank and expand 3, untied head.
    "mamba1-untied": dict(pattern="MMM", tie=False,
                          mamba1=Mamba1Spec(d_state=16, d_conv=3, expand=3, dt_rank=7)),
    # Mamba-2 (two groups) + MLP blocks with one GQA RoPE attention block, untied head; the
    # default MLP width, 176, which mamba_ssm pads to 256.
    "mamba2-mlp-gqa-rope": dict(pattern="M-M-*-", tie=False,
                                mamba2=Mamba2Spec(d_state=16, headdim=16, ngroups=2,
                                                  chunk_size=16),
                                attention=AttentionSpec(n_heads=4, n_kv_heads=2)),
    # Attention first, MQA with head_dim != d_model / n_heads and a large RoPE base; an MLP of
    # width 192 that mamba_ssm pads to 256; 24 tokens are one and a half Mamba-2 chunks.
    "mqa-rope-theta-mamba2-padded-mlp": dict(
        pattern="*-M-M-", d_model=96, tie=True,
        mamba2=Mamba2Spec(d_state=16, headdim=32, chunk_size=16),
        attention=AttentionSpec(n_heads=3, n_kv_heads=1, head_dim=24, rope_theta=500000.0),
        mlp=MLPSpec(multiplier=2.0, multiple_of=8)),
    # Mamba-2 and RoPE-free multi-head attention, no MLP.
    "mamba2-mha-nope": dict(pattern="M*M*", tie=True,
                            mamba2=Mamba2Spec(d_state=16, headdim=16, chunk_size=16),
                            attention=AttentionSpec(n_heads=4, rope=False)),
    # Mamba-2 + MLP, attention-free: decoded with mamba_ssm's own generate.
    "mamba2-mlp": dict(pattern="M-M-M-", tie=False,
                       mamba2=Mamba2Spec(d_state=32, headdim=16, chunk_size=8)),
}


def needs_rotary(name: str) -> bool:
    spec = FAMILIES[name].get("attention")
    return spec is not None and spec.rope


def build(name: str, seed: int) -> HybridLM:
    f = dict(FAMILIES[name])
    pattern, tie, d_model = f.pop("pattern"), f.pop("tie"), f.pop("d_model", 64)
    arch = ArchConfig.from_pattern(pattern, d_model=d_model, vocab_size=VOCAB,
                                   tie_embeddings=tie, **f)
    model = HybridLM(arch, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def _layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False,
                   residual_in_fp32=False, is_rms_norm=False, **unused):
    """``layer_norm_fn`` (fused residual add + norm) through mamba_ssm's torch references."""
    ref = layer_norm.rms_norm_ref if is_rms_norm else layer_norm.layer_norm_ref
    out = ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
    if not prenorm:
        return out
    out, residual = out
    return out, residual.float() if residual_in_fp32 else residual


def _gated_rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    return layernorm_gated.rms_norm_ref(x, weight, bias, z=z, eps=eps, group_size=group_size,
                                        norm_before_gate=norm_before_gate)


def _chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                return_final_states=False, return_varlen_states=False):
    """``mamba_chunk_scan_combined`` through ``ssd_minimal_discrete``."""
    assert z is None and initial_states is None and seq_idx is None and cu_seqlens is None
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(*dt_limit)
    length, heads = x.shape[1], x.shape[2]
    B = repeat(B, "b l g n -> b l (g r) n", r=heads // B.shape[2])
    C = repeat(C, "b l g n -> b l (g r) n", r=heads // C.shape[2])
    pad = -length % chunk_size
    X, A_dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in
                     (x.float() * dt[..., None], A.float() * dt, B.float(), C.float()))
    y, final = ssd_minimal.ssd_minimal_discrete(X, A_dt, B, C, chunk_size)
    y = y[:, :length]
    if D is not None:
        y = y + x.float() * (D if D.dim() == 2 else D[:, None])
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


def _apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None,
                  interleaved=False, inplace=False, conjugate=False):
    """flash_attn's Triton ``apply_rotary`` through its ``apply_rotary_emb_torch``."""
    assert cu_seqlens is None and isinstance(seqlen_offsets, int)
    rows = slice(seqlen_offsets, seqlen_offsets + x.shape[1])
    out = rotary.apply_rotary_emb_torch(x, cos[rows], -sin[rows] if conjugate else sin[rows],
                                        interleaved)
    return x.copy_(out) if inplace else out


class _NoEvent:
    """``torch.cuda.Event`` for mamba_ssm's ``decode``, which makes two even without timing."""

    def __init__(self, *args, **kwargs) -> None:
        pass


@pytest.fixture(scope="module")
def mamba_ssm_cpu():
    """mamba_ssm with its fused kernels swapped for its torch references (module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mamba_simple, "selective_scan_fn", selective_scan_interface.selective_scan_ref)
        ref_update = selective_state_update.selective_state_update_ref
        mp.setattr(mamba_simple, "selective_state_update", ref_update)
        mp.setattr(mamba2, "selective_state_update", ref_update)
        mp.setattr(mamba2, "mamba_chunk_scan_combined", _chunk_scan)
        mp.setattr(block, "layer_norm_fn", _layer_norm_fn)
        mp.setattr(mixer_seq_simple, "layer_norm_fn", _layer_norm_fn)
        mp.setattr(layernorm_gated, "rmsnorm_fn", _gated_rmsnorm_fn)
        mp.setattr(mha, "flash_attn_with_kvcache", None)
        if rotary is not None:
            mp.setattr(rotary, "apply_rotary", _apply_rotary)
        if not torch.cuda.is_available():
            mp.setattr(torch.cuda, "Event", _NoEvent)
        yield


@pytest.fixture(scope="module")
def exported(mamba_ssm_cpu, tmp_path_factory):
    """name -> (hybridlab model, export folder, MambaLMHeadModel), built once per name."""
    done = {}

    def get(name: str):
        if needs_rotary(name) and rotary is None:
            pytest.skip("RoPE attention: mamba_ssm's MHA needs flash_attn's RotaryEmbedding "
                        "(flash-attn installed without its CUDA build)")
        if name not in done:
            model = build(name, seed=300 + list(FAMILIES).index(name))
            out = tmp_path_factory.mktemp("mamba_ssm") / name
            result = export_model(model, "mamba_ssm", out)
            assert result.faithful, result.changes
            theirs = MambaLMHeadModel.from_pretrained(str(out), device="cpu").eval()
            for module in theirs.modules():
                if isinstance(module, mamba2.Mamba2):
                    module.use_mem_eff_path = False
            done[name] = (model, out, theirs)
        return done[name]
    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_with_strict_keys(exported, name):
    model, out, theirs = exported(name)  # from_pretrained: load_state_dict(strict=True)
    theirs.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    config = json.loads((out / "config.json").read_text())
    assert theirs.config.tie_embeddings is model.config.tie_embeddings
    tied = theirs.lm_head.weight is theirs.backbone.embedding.weight
    assert tied is model.config.tie_embeddings
    assert len(theirs.backbone.layers) == config["n_layer"]
    mixers = [s for s in model.config.layers if not isinstance(s, MLPSpec)]
    kind = {Mamba1Spec: mamba_simple.Mamba, Mamba2Spec: mamba2.Mamba2, AttentionSpec: mha.MHA}
    assert [type(layer.mixer) for layer in theirs.backbone.layers] == [
        kind[type(s)] for s in mixers]
    # mamba_ssm pads the MLP to a multiple of 128 with zeros: more parameters, no other change.
    widths = {s.d_hidden(model.config.d_model) for s in model.config.layers
              if isinstance(s, MLPSpec)}
    pad = 0
    if widths:
        (width,) = widths
        pad = len(mixers) * 3 * model.config.d_model * (config["d_intermediate"] - width)
    ours = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in theirs.parameters()) == ours + pad


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("length", [1, 24])
def test_logits_equal_hybridlabs(exported, name, length):
    model, _, theirs = exported(name)
    tokens = torch.randint(VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        diff = (theirs(tokens).logits - model(tokens)).abs().max().item()
    assert diff <= LOGIT_ATOL


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_equals_hybridlabs(exported, name):
    model, _, theirs = exported(name)
    prompt = torch.randint(VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    ours = model.generate(prompt, max_new_tokens=12)
    with torch.no_grad():
        if "attention" not in FAMILIES[name]:
            # mamba_ssm's own decoding: prefill with an inference cache, then one step a token.
            out = theirs.generate(prompt, max_length=ours.shape[1], top_k=1)
        else:
            out = prompt
            while out.shape[1] < ours.shape[1]:
                next_token = theirs(out).logits[:, -1].argmax(-1, keepdim=True)
                out = torch.cat([out, next_token], dim=1)
    assert torch.equal(out, ours)
