"""The attention layer's CUDA kernels in bfloat16 against a naive softmax attention.

On CUDA in half precision the layer calls flash_attn when it is installed, else torch SDPA; the
SDPA case here pins SDPA to its FlashAttention backend, so both are FlashAttention kernels.
Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from hybridlab.config import AttentionSpec
from hybridlab.layers.attention import Attention, attention_backend

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")

# FlashAttention's own test criterion: in bfloat16 the kernel's error against a float32
# reference stays within twice the error of the naive attention computed in bfloat16 (scores,
# softmax and the weighted sum each rounded to 8 significant bits); the 0.1% of the largest
# entry, below bf16's 0.4% rounding step, only keeps outputs with a tiny naive error from failing
# on one rounding.
NAIVE_ERROR_FACTOR = 2.0
SLACK = 1e-3

CASES = [
    # n_heads, n_kv_heads, head_dim, L, sliding_window
    (4, None, 64, 128, None),
    (8, 2, 64, 77, None),  # grouped KV heads, odd length
    (6, 3, 128, 301, None),
    (4, 2, 64, 200, 48),
]


def naive_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
    """Causal softmax attention in the inputs' dtype. q: (B, L, H, hd), k and v:
    (B, L, Hkv, hd) -> (B, L, H, hd); with `window`, a query sees the last `window` keys."""
    repeat = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
    scores = torch.einsum("blhd,bshd->bhls", q, k) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    i = torch.arange(q.shape[1], device=q.device)
    distance = i[:, None] - i[None, :]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhls,bshd->blhd", weights, v)


def reference_forward(layer: Attention, x: Tensor) -> Tensor:
    # The projections and RoPE are the same code on every backend; only the attention kernel
    # in between is replaced by the naive one.
    q, k, v = layer._qkv(x, torch.arange(x.shape[1], device=x.device))
    return layer.out_proj(naive_attention(q, k, v, layer.window).flatten(2))


def forward_backward(
    forward: Callable[[Tensor], Tensor], layer: Attention, x: Tensor, grad_out: Tensor
) -> dict[str, Tensor]:
    """The output and the gradients of x and of every weight under `grad_out`."""
    x = x.detach().clone().requires_grad_()
    out = forward(x)
    weights = dict(layer.named_parameters())
    grads = torch.autograd.grad(out, [x, *weights.values()], grad_out)
    return {"out": out, **dict(zip(["dx", *(f"d{n}" for n in weights)], grads, strict=True))}


@pytest.mark.parametrize("kernel", ["flash_attn", "sdpa flash"])
@pytest.mark.parametrize(("n_heads", "n_kv_heads", "head_dim", "L", "window"), CASES)
def test_flash_attention_matches_naive_attention_in_bfloat16(
    monkeypatch: pytest.MonkeyPatch,
    kernel: str,
    n_heads: int,
    n_kv_heads: int | None,
    head_dim: int,
    L: int,
    window: int | None,
) -> None:
    pinned: contextlib.AbstractContextManager = contextlib.nullcontext()
    if kernel == "flash_attn":
        pytest.importorskip("flash_attn")
        monkeypatch.delenv("HYBRIDLAB_ATTENTION", raising=False)
        expected_backend = "flash"
    else:
        monkeypatch.setenv("HYBRIDLAB_ATTENTION", "sdpa")
        expected_backend = "sdpa"
        # SDPA's flash kernel takes no mask, and the layer passes one for a sliding window:
        # there SDPA picks its own backend.
        if window is None:
            pinned = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    assert attention_backend(DEVICE, torch.bfloat16) == expected_backend

    d_model = n_heads * head_dim
    spec = AttentionSpec(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                         sliding_window=window)
    layer = Attention(d_model, spec)
    layer.reset_parameters(torch.Generator().manual_seed(L), n_layers=4)
    exact = layer.to(DEVICE)
    low = copy.deepcopy(exact).to(torch.bfloat16)
    g = torch.Generator().manual_seed(L + n_heads)
    x = torch.randn(2, L, d_model, generator=g).to(DEVICE, torch.bfloat16)
    grad_out = torch.randn(2, L, d_model, generator=g).to(DEVICE, torch.bfloat16)

    with pinned:
        actual = forward_backward(low, low, x, grad_out)
    expected = forward_backward(lambda t: reference_forward(exact, t), exact, x.float(),
                                grad_out.float())
    naive = forward_backward(lambda t: reference_forward(low, t), low, x, grad_out)

    failures = []
    for name, ref in expected.items():
        error = (actual[name].float() - ref).abs().max().item()
        naive_error = (naive[name].float() - ref).abs().max().item()
        bound = NAIVE_ERROR_FACTOR * naive_error + SLACK * ref.abs().max().item()
        if not error <= bound:
            failures.append(f"{name}: error {error:.3g} > {bound:.3g} (naive bf16 error "
                            f"{naive_error:.3g})")
    assert not failures, "; ".join(failures)
