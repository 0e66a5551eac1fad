"""Compiled Triton scan kernels on CUDA against the sequential references.

tests/kernels/ checks the same kernels under Triton's interpreter at toy sizes; here they run
compiled, at a layer's sizes, at lengths that are no multiple of the chunk, in float32 and with
bfloat16 activations, values and every gradient. Skipped without CUDA (tests/conftest.py); run
them with `benchmarks/gpu_check.sh` or `pytest -m gpu` with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from hybridlab_kernels import (  # noqa: E402 (after the skip: these need triton)
    kernel_backend,
    selective_scan,
    selective_state_update,
    ssd,
    ssd_state_update,
)
from hybridlab_kernels.dispatch import triton_interpreted  # noqa: E402
from hybridlab_kernels.selective_scan.naive import selective_scan_ref  # noqa: E402
from hybridlab_kernels.ssd import triton_common, triton_ssd  # noqa: E402
from hybridlab_kernels.ssd.naive import ssd_ref  # noqa: E402

# `hybridlab_kernels.selective_scan` is the function; its folder is reached as a module here
triton_scan = importlib.import_module("hybridlab_kernels.selective_scan.triton_scan")

DEVICE = torch.device("cuda")

# Each output and gradient is compared to the float64 reference as its largest error relative
# to its largest entry. Float32 kernels round ~6e-8 per operation over up to a few thousand
# steps, chunk matmuls over up to 256 terms and sums over batch * L terms; under the interpreter
# at these shapes the worst tensor measured 1.1e-6 (Mamba-1) and 7.7e-6 (Mamba-2, dz at L = 333
# with chunks of 128), so 1e-4 leaves a 13x margin for compiled code (fused multiply-adds,
# approximate exp) while a real error (a missed decay, a dropped chunk boundary, an unwritten
# tile) shows at 1e-2 or more.
F32_REL = 1e-4
# A bfloat16 result is computed in float32 and rounded once at the end, on top of the float32
# error: by at most one unit in the last place of bf16's 8-bit significand, 2**-7 of its own
# magnitude (compiled Triton rounds to nearest, half that; the interpreter truncates).
BF16_ROUNDING = 2.0**-7


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs and grad buffers start as NaN, so memory a kernel fails to write shows."""
    monkeypatch.setattr(triton_scan, "DEBUG_POISON", True)
    monkeypatch.setattr(triton_common, "DEBUG_POISON", True)


@pytest.fixture(autouse=True)
def default_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDLAB_KERNELS", raising=False)


def dt_input(g: torch.Generator, shape: tuple[int, ...], *, softplus: bool) -> Tensor:
    """The dt input for steps dt log-uniform in [1e-3, 0.1] (Mamba's init range), a tenth of them
    in [0.5, 1.5] to stress the decay: softplus^-1(dt) if the op applies softplus, else dt."""
    dt = torch.exp(math.log(1e-3) + torch.rand(shape, generator=g, dtype=torch.float64)
                   * math.log(100))
    big = torch.rand(shape, generator=g, dtype=torch.float64) < 0.1
    dt = torch.where(big, 0.5 + torch.rand(shape, generator=g, dtype=torch.float64), dt)
    return dt + torch.log(-torch.expm1(-dt)) if softplus else dt


def scan_inputs(
    seed: int, batch: int, dim: int, N: int, L: int, G: int | None, *, softplus: bool = True
) -> dict:
    """Every `selective_scan` input at Mamba-1's magnitudes, float64 on the CPU; G=None gives B
    and C the (batch, N, L) layout. A = -exp(U[0, log 16]) lies in [-16, -1]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    bias = 0.1 * randn(dim)
    bc = (batch, N, L) if G is None else (batch, G, N, L)
    return {
        "u": randn(batch, dim, L),
        "delta": dt_input(g, (batch, dim, L), softplus=softplus) - bias[:, None],
        "A": -torch.exp(torch.rand(dim, N, generator=g, dtype=torch.float64) * math.log(16)),
        "B": randn(*bc),
        "C": randn(*bc),
        "D": randn(dim),
        "z": randn(batch, dim, L),
        "delta_bias": bias,
        "initial_state": randn(batch, dim, N),
    }


def ssd_inputs(
    seed: int, batch: int, L: int, H: int, P: int, G: int, N: int, *, D_per_channel: bool
) -> dict:
    """Every `ssd` input at Mamba-2's magnitudes (dt for dt_softplus=True), float64 on the CPU;
    A in [-16, -1]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    bias = 0.1 * randn(H)
    return {
        "x": randn(batch, L, H, P),
        "dt": dt_input(g, (batch, L, H), softplus=True) - bias,
        "A": -torch.exp(torch.rand(H, generator=g, dtype=torch.float64) * math.log(16)),
        "B": randn(batch, L, G, N),
        "C": randn(batch, L, G, N),
        "D": randn(H, P) if D_per_channel else randn(H),
        "z": randn(batch, L, H, P),
        "dt_bias": bias,
        "initial_state": randn(batch, H, P, N),
    }


def outputs_and_grads(
    fn: Callable[..., tuple[Tensor, Tensor]],
    tensors: dict[str, Tensor],
    *,
    grad_dtype: torch.dtype,
    **options: object,
) -> dict[str, Tensor]:
    """{"y", "final state", "d<input>" ...} of `fn` under seeded upstream gradients.

    The upstream gradients are drawn in float64 and rounded to `grad_dtype` (y's) and float32
    (the state's), so a kernel and the float64 reference see the very same values.
    """
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    y, state = fn(**leaves, **options, return_final_state=True)
    g = torch.Generator().manual_seed(1234)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(grad_dtype)
    grad_state = torch.randn(state.shape, generator=g, dtype=torch.float64).float()
    loss = (y * grad_y.to(y)).sum() + (state * grad_state.to(state)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    named = {f"d{name}": grad for name, grad in zip(leaves, grads, strict=True)}
    return {"y": y, "final state": state, **named}


def assert_close_to_reference(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Every tensor within F32_REL of its largest entry, plus BF16_ROUNDING of itself where the
    kernel's result is bfloat16. NaN (unwritten memory) fails."""
    assert actual.keys() == expected.keys()
    failures = []
    for name, tensor in actual.items():
        ref = expected[name].to(DEVICE)
        error = (tensor.double() - ref).abs()
        bound = F32_REL * ref.abs().max()
        if tensor.dtype == torch.bfloat16:
            bound = bound + BF16_ROUNDING * ref.abs()
        if not bool((error <= bound).all()):
            worst = error.nan_to_num(math.inf).max().item()
            failures.append(f"{name} ({tensor.dtype}): max error {worst:.3g}, largest entry "
                            f"{ref.abs().max().item():.3g}")
    assert not failures, "; ".join(failures)


def on_device(tensors: dict[str, Tensor], activations: tuple[str, ...], dtype: torch.dtype):
    """The inputs on CUDA: `activations` in `dtype`, SSM parameters in float32 (as the layers
    pass them), and the float64 reference's copy of exactly those values."""
    kernel = {
        k: v.to(DEVICE, dtype if k in activations else torch.float32) for k, v in tensors.items()
    }
    return kernel, {k: v.double() for k, v in kernel.items()}


SCAN_ACTIVATIONS = ("u", "delta", "B", "C", "z")
SCAN_SHAPES = [
    # batch, dim, N, L, G: Mamba-1 at d_model 128 over 62.5 chunks of 16; 48 channels per group
    # (a full block of 32, then a masked one) at an odd length; N = 5 padded to 8 with a group per
    # 16 channels; N = 64, where a block holds 8 channels
    (2, 256, 16, 1000, None),
    (1, 96, 16, 513, 2),
    (3, 64, 5, 77, 4),
    (2, 40, 64, 257, None),
]


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize(("batch", "dim", "N", "L", "G"), SCAN_SHAPES)
def test_selective_scan_matches_reference_in_float32(
    batch: int, dim: int, N: int, L: int, G: int | None, softplus: bool
) -> None:
    tensors = scan_inputs(L + dim + softplus, batch, dim, N, L, G, softplus=softplus)
    kernel, reference = on_device(tensors, SCAN_ACTIVATIONS, torch.float32)
    options = {"delta_softplus": softplus}
    expected = outputs_and_grads(selective_scan_ref, reference, grad_dtype=torch.float32,
                                 **options)
    actual = outputs_and_grads(triton_scan.selective_scan_triton, kernel,
                               grad_dtype=torch.float32, **options)
    assert_close_to_reference(actual, expected)


@pytest.mark.parametrize(("batch", "dim", "N", "L", "G"), SCAN_SHAPES[:2])
def test_selective_scan_with_bfloat16_activations(
    batch: int, dim: int, N: int, L: int, G: int | None
) -> None:
    tensors = scan_inputs(7 * L + dim, batch, dim, N, L, G)
    kernel, reference = on_device(tensors, SCAN_ACTIVATIONS, torch.bfloat16)
    options = {"delta_softplus": True}
    expected = outputs_and_grads(selective_scan_ref, reference, grad_dtype=torch.bfloat16,
                                 **options)
    actual = outputs_and_grads(triton_scan.selective_scan_triton, kernel,
                               grad_dtype=torch.bfloat16, **options)
    assert actual["y"].dtype == torch.bfloat16
    assert actual["final state"].dtype == torch.float32
    assert_close_to_reference(actual, expected)


SSD_ACTIVATIONS = ("x", "dt", "B", "C", "z")
SSD_SHAPES = [
    # batch, L, H, P, G, N, chunk_size, D of shape (H, P): Mamba-2 at d_model 256 (8 heads of 64)
    # over 15.6 chunks; P = 48 in a 64-wide tile with chunks of two 64-step row tiles; odd P and
    # N with a group per head; N = 128 over two tiles and chunks of four row tiles
    (2, 1000, 8, 64, 1, 64, 64, False),
    (1, 333, 6, 48, 2, 32, 128, True),
    (2, 77, 4, 17, 4, 20, 32, False),
    (1, 2048, 4, 32, 1, 128, 256, True),
]


@pytest.mark.parametrize(("batch", "L", "H", "P", "G", "N", "chunk_size", "D_per_channel"),
                         SSD_SHAPES)
def test_ssd_matches_reference_in_float32(
    batch: int, L: int, H: int, P: int, G: int, N: int, chunk_size: int, D_per_channel: bool
) -> None:
    tensors = ssd_inputs(L + H * P, batch, L, H, P, G, N, D_per_channel=D_per_channel)
    kernel, reference = on_device(tensors, SSD_ACTIVATIONS, torch.float32)
    expected = outputs_and_grads(ssd_ref, reference, grad_dtype=torch.float32, dt_softplus=True)
    actual = outputs_and_grads(triton_ssd.ssd_triton, kernel, grad_dtype=torch.float32,
                               dt_softplus=True, chunk_size=chunk_size)
    assert_close_to_reference(actual, expected)


@pytest.mark.parametrize(("batch", "L", "H", "P", "G", "N", "chunk_size", "D_per_channel"),
                         SSD_SHAPES[:2])
def test_ssd_with_bfloat16_activations(
    batch: int, L: int, H: int, P: int, G: int, N: int, chunk_size: int, D_per_channel: bool
) -> None:
    tensors = ssd_inputs(3 * L + N, batch, L, H, P, G, N, D_per_channel=D_per_channel)
    kernel, reference = on_device(tensors, SSD_ACTIVATIONS, torch.bfloat16)
    expected = outputs_and_grads(ssd_ref, reference, grad_dtype=torch.bfloat16, dt_softplus=True)
    actual = outputs_and_grads(triton_ssd.ssd_triton, kernel, grad_dtype=torch.bfloat16,
                               dt_softplus=True, chunk_size=chunk_size)
    assert actual["y"].dtype == torch.bfloat16
    assert actual["final state"].dtype == torch.float32
    assert_close_to_reference(actual, expected)


def test_kernels_run_compiled() -> None:
    assert not triton_interpreted(), (
        "TRITON_INTERPRET=1 is set: these tests must check the compiled kernels; unset it "
        "(benchmarks/gpu_check.sh does)"
    )


def test_dispatch_picks_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    for op in ("selective_scan", "ssd"):
        assert kernel_backend(DEVICE, op=op) == "triton"
        assert kernel_backend("cuda:0", "torch", op=op) == "torch"
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "ref")
    assert kernel_backend(DEVICE) == "ref"


def spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Count the calls of `module.name` (the public ops import it at call time)."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_public_ops_run_triton_on_cuda_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_calls = spy(monkeypatch, triton_scan, "selective_scan_triton")
    ssd_calls = spy(monkeypatch, triton_ssd, "ssd_triton")

    kernel, reference = on_device(scan_inputs(1, 2, 64, 16, 99, None), (), torch.float32)
    y = selective_scan(**kernel, delta_softplus=True)
    y_ref = selective_scan_ref(**reference, delta_softplus=True)
    assert_close_to_reference({"y": y}, {"y": y_ref})

    tensors = ssd_inputs(2, 2, 99, 4, 32, 1, 16, D_per_channel=False)
    kernel, reference = on_device(tensors, (), torch.float32)
    y = ssd(**kernel, dt_softplus=True)
    assert_close_to_reference({"y": y}, {"y": ssd_ref(**reference, dt_softplus=True)})
    assert (len(scan_calls), len(ssd_calls)) == (1, 1)


@torch.no_grad()
def test_decoding_steps_reproduce_the_scans() -> None:
    # The default dispatch on CUDA runs the compiled step kernels; fed token by token from the
    # initial state, they must end where the sequential scan does.
    L = 37
    kernel, reference = on_device(scan_inputs(3, 2, 96, 16, L, 2), (), torch.float32)
    y_ref, state_ref = selective_scan_ref(**reference, delta_softplus=True,
                                          return_final_state=True)
    state = kernel["initial_state"].clone()
    ys = [
        selective_state_update(
            state, kernel["u"][..., t], kernel["delta"][..., t], kernel["A"],
            kernel["B"][..., t], kernel["C"][..., t], kernel["D"], kernel["z"][..., t],
            dt_bias=kernel["delta_bias"], dt_softplus=True,
        )
        for t in range(L)
    ]  # fmt: skip
    assert_close_to_reference({"y": torch.stack(ys, -1), "state": state},
                              {"y": y_ref, "state": state_ref})

    tensors = ssd_inputs(4, 2, L, 4, 32, 2, 16, D_per_channel=True)
    kernel, reference = on_device(tensors, (), torch.float32)
    y_ref, state_ref = ssd_ref(**reference, dt_softplus=True, return_final_state=True)
    state = kernel["initial_state"].clone()
    ys = [
        ssd_state_update(
            state, kernel["x"][:, t], kernel["dt"][:, t], kernel["A"], kernel["B"][:, t],
            kernel["C"][:, t], kernel["D"], kernel["z"][:, t], dt_bias=kernel["dt_bias"],
            dt_softplus=True,
        )
        for t in range(L)
    ]  # fmt: skip
    assert_close_to_reference({"y": torch.stack(ys, 1), "state": state},
                              {"y": y_ref, "state": state_ref})
