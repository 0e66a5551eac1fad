"""Mamba-2 SSD Triton kernels against the sequential reference: values, every gradient, decoding.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before
triton is first imported.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hybridlab_kernels import ssd, ssd_state_update
from hybridlab_kernels.ssd import triton_common
from hybridlab_kernels.ssd.naive import ssd_ref
from hybridlab_kernels.ssd.triton_ssd import ssd_triton
from hybridlab_kernels.ssd.triton_step import ssd_state_update_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# float64: kernels and reference differ only in summation order, ~1e-15 relative (measured
# <= 6e-15 of the largest entry); 1e-9 leaves a wide margin while any real error (a wrong decay,
# a missed tile or chunk) shows at > 1e-3.
F64_TOL = {"rtol": 1e-9, "atol": 1e-9}
# float32 kernels against the float64 reference, as a bound on |error| relative to the tensor's
# largest entry: roundoff accumulates over O(T + L / T) terms of ~6e-8 each (measured <= 1e-6),
# so 2e-5 leaves a 20x margin; real errors show at >= 1e-2.
F32_REL = 2e-5

OPTIONAL = ("D", "z", "dt_bias", "initial_state")
TENSORS = ("x", "dt", "A", "B", "C", *OPTIONAL)


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs and grad buffers start as NaN, so memory a kernel fails to write shows."""
    monkeypatch.setattr(triton_common, "DEBUG_POISON", True)


def make_inputs(
    seed: int,
    batch: int,
    L: int,
    H: int,
    P: int,
    G: int,
    N: int,
    *,
    optional: tuple[str, ...] = OPTIONAL,
    softplus: bool = True,
    D_per_channel: bool = False,
    dtype: torch.dtype = torch.float64,
    big_dt_fraction: float = 0.1,
) -> dict:
    """Keyword arguments for `ssd` at Mamba-2's magnitudes.

    dt (after bias and softplus) is log-uniform in [1e-3, 0.1], Mamba-2's dt init range, with
    `big_dt_fraction` of the steps in [0.5, 1.5] to stress the decay; A = -exp(U[0, log 16]) lies
    in [-16, -1].
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    dt = torch.exp(math.log(1e-3) + rand(batch, L, H) * math.log(100))
    dt = torch.where(rand(batch, L, H) < big_dt_fraction, 0.5 + rand(batch, L, H), dt)
    bias = 0.1 * randn(H)
    inputs = {
        "x": randn(batch, L, H, P),
        # softplus^-1(dt) = dt + log(1 - exp(-dt)); the bias is subtracted again below if used
        "dt": dt + torch.log(-torch.expm1(-dt)) if softplus else dt,
        "A": -torch.exp(rand(H) * math.log(16)),
        "B": randn(batch, L, G, N),
        "C": randn(batch, L, G, N),
        "D": randn(H, P) if D_per_channel else randn(H),
        "z": randn(batch, L, H, P),
        "dt_bias": bias,
        "initial_state": randn(batch, H, P, N),
    }
    for name in OPTIONAL:
        if name not in optional:
            del inputs[name]
    if "dt_bias" in inputs:
        inputs["dt"] = inputs["dt"] - bias
    inputs = {k: v.to(device=DEVICE, dtype=dtype) for k, v in inputs.items()}
    return {**inputs, "dt_softplus": softplus}


def run(fn, inputs: dict, seed: int = 1234, **kwargs) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """y, final state and the gradient of every input tensor under random upstream gradients."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k in TENSORS}
    options = {k: v for k, v in inputs.items() if k not in TENSORS}
    y, state = fn(**leaves, **options, return_final_state=True, **kwargs)
    # drawn in float64 whatever y's dtype, so every precision sees the same upstream gradients
    g = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    grad_state = torch.randn(state.shape, generator=g, dtype=torch.float64).to(state)
    loss = (y * grad_y).sum() + (state * grad_state).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, state, dict(zip(leaves, grads, strict=True))


def as_float64(inputs: dict) -> dict:
    return {k: v.double() if isinstance(v, Tensor) else v for k, v in inputs.items()}


def assert_match(expected: tuple, actual: tuple, close) -> None:
    (y_ref, s_ref, g_ref), (y, s, grads) = expected, actual
    close(y, y_ref, "y")
    close(s, s_ref, "final state")
    assert grads.keys() == g_ref.keys()
    for name, grad in grads.items():
        close(grad, g_ref[name], f"d{name}")


def close_f64(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **F64_TOL, msg=lambda m: f"{what}: {m}")


def close_f32(actual: Tensor, expected: Tensor, what: str) -> None:
    assert actual.dtype != torch.float64, what
    error = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= F32_REL * scale, f"{what}: max error {error:.3g} vs largest entry {scale:.3g}"


SHAPES = [
    # batch, L, H, P, G, N, chunk_size: lengths 1, 7 (< one chunk) and 40 (2.5 chunks; 3.3 of a
    # chunk size that is no power of two); P and N mostly below 16 and not powers of two; one
    # group, two groups, a group per head
    (2, 1, 2, 3, 1, 4, 16),
    (2, 7, 4, 3, 2, 5, 16),
    (2, 40, 4, 5, 2, 20, 16),
    (1, 40, 3, 2, 3, 7, 12),
]
OPTION_SETS = [
    # optional inputs, dt_softplus, D of shape (H, P) rather than (H,)
    ((), False, False),
    (OPTIONAL, True, True),
    (("initial_state", "dt_bias"), True, False),
    (("D", "z"), False, False),
]


@pytest.mark.parametrize(("optional", "softplus", "D_per_channel"), OPTION_SETS)
@pytest.mark.parametrize(("batch", "L", "H", "P", "G", "N", "chunk_size"), SHAPES)
def test_matches_reference_with_every_gradient(
    batch: int,
    L: int,
    H: int,
    P: int,
    G: int,
    N: int,
    chunk_size: int,
    optional: tuple[str, ...],
    softplus: bool,
    D_per_channel: bool,
) -> None:
    inputs = make_inputs(
        L * H + N,
        batch,
        L,
        H,
        P,
        G,
        N,
        optional=optional,
        softplus=softplus,
        D_per_channel=D_per_channel,
    )
    expected = run(ssd_ref, inputs)
    assert_match(expected, run(ssd_triton, inputs, chunk_size=chunk_size), close_f64)


def test_several_tiles_per_chunk_head_dim_and_state() -> None:
    # chunk 128 = two 64-step row tiles; P = 70 and N = 66 span two 64-wide tiles each, and the
    # (P, N) state four 256-entry blocks of the state passing: every partial sum over tiles runs.
    inputs = make_inputs(31, 1, 150, 2, 70, 1, 66, D_per_channel=True)
    expected = run(ssd_ref, inputs)
    assert_match(expected, run(ssd_triton, inputs, chunk_size=128), close_f64)


def test_float32_matches_float64_reference() -> None:
    inputs = make_inputs(41, 2, 40, 4, 5, 2, 20, dtype=torch.float32)
    actual = run(ssd_triton, inputs, chunk_size=16)
    assert actual[1].dtype == torch.float32
    assert_match(run(ssd_ref, as_float64(inputs)), actual, close_f32)


def test_strong_decay_over_long_sequence_stays_finite_and_correct() -> None:
    # dt near 0.5..1.5 on a third of the steps with A down to -16: the log decay over the
    # sequence reaches ~-1e3, far past exp's float32 range (-87), which a factored
    # exp(S_t) * exp(-S_s) would overflow; the kernels only take exp of in-chunk differences.
    inputs = make_inputs(3, 1, 320, 2, 2, 1, 4, dtype=torch.float32, big_dt_fraction=0.3)
    actual = run(ssd_triton, inputs, chunk_size=64)
    for tensor in (actual[0], actual[1], *actual[2].values()):
        assert torch.isfinite(tensor).all()
    assert_match(run(ssd_ref, as_float64(inputs)), actual, close_f32)


def test_public_op_routes_strided_inputs_to_triton() -> None:
    inputs = make_inputs(5, 2, 37, 4, 3, 2, 4)
    # x, B and C as Mamba-2 slices them out of one projection along the last dim
    packed = torch.cat([inputs["x"].flatten(2), inputs["B"].flatten(2), inputs["C"].flatten(2)], -1)
    x, B, C = packed.split([12, 8, 8], dim=-1)
    strided = {**inputs, "x": x.unflatten(-1, (4, 3)), "B": B.unflatten(-1, (2, 4))}
    strided["C"] = C.unflatten(-1, (2, 4))
    assert not strided["x"].is_contiguous() and not strided["B"].is_contiguous()
    expected = run(ssd_ref, inputs)
    actual = run(lambda **kw: ssd(**kw, backend="triton"), strided, chunk_size=16)
    assert_match(expected, actual, close_f64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_compute_in_float32(dtype: torch.dtype) -> None:
    inputs = make_inputs(11, 2, 40, 4, 3, 2, 4, dtype=torch.float32)
    # activations arrive in low precision, SSM parameters (A, D, dt_bias) stay float32
    low = {k: v.to(dtype) if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}
    y, state = ssd_triton(**low, chunk_size=16, return_final_state=True)
    y_ref, state_ref = ssd_ref(**as_float64(low), return_final_state=True)
    assert y.dtype == dtype and state.dtype == torch.float32
    # y is rounded once at the end, to 8 (bf16) or 11 (fp16) significant bits
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=1e-2)
    close_f32(state, state_ref, "final state")


def test_gradients_flow_only_where_asked() -> None:
    # Only the final state reaches the loss (y's gradient is None in the backward), and z is
    # given without requiring a grad (the pre-gate y is then not kept).
    inputs = make_inputs(13, 2, 40, 4, 3, 2, 5)
    x = inputs["x"].clone().requires_grad_()
    options = {k: v for k, v in inputs.items() if k != "x"}
    _, state = ssd_triton(x, **options, chunk_size=16, return_final_state=True)
    (grad,) = torch.autograd.grad(state.sum(), [x])
    x_ref = inputs["x"].clone().requires_grad_()
    _, state_ref = ssd_ref(x_ref, **options, return_final_state=True)
    (grad_ref,) = torch.autograd.grad(state_ref.sum(), [x_ref])
    close_f64(grad, grad_ref, "dx through the final state")

    y = ssd_triton(x, **options, chunk_size=16)
    (grad,) = torch.autograd.grad(y.sum(), [x])
    (grad_ref,) = torch.autograd.grad(ssd_ref(x_ref, **options).sum(), [x_ref])
    close_f64(grad, grad_ref, "dx through y")


STEP_CASES = [
    # G, D of shape (H, P), optional inputs, softplus
    (1, False, OPTIONAL, True),
    (2, True, OPTIONAL, True),
    (4, False, ("initial_state",), False),
]


@pytest.mark.parametrize(("G", "D_per_channel", "optional", "softplus"), STEP_CASES)
def test_state_update_reproduces_scan(
    G: int, D_per_channel: bool, optional: tuple[str, ...], softplus: bool
) -> None:
    inputs = make_inputs(21, 2, 9, 4, 3, G, 5, D_per_channel=D_per_channel, optional=optional)
    inputs["dt_softplus"] = softplus
    y_ref, state_ref = ssd_ref(**inputs, return_final_state=True)
    state = inputs["initial_state"].clone()
    ys = []
    with torch.no_grad():
        for t in range(9):
            ys.append(
                ssd_state_update(
                    state,
                    inputs["x"][:, t],
                    inputs["dt"][:, t],
                    inputs["A"],
                    inputs["B"][:, t],
                    inputs["C"][:, t],
                    inputs.get("D"),
                    inputs["z"][:, t] if "z" in inputs else None,
                    dt_bias=inputs.get("dt_bias"),
                    dt_softplus=softplus,
                    backend="triton",
                )
            )
    torch.testing.assert_close(torch.stack(ys, dim=1), y_ref, **F64_TOL)
    torch.testing.assert_close(state, state_ref, **F64_TOL)


def test_state_update_keeps_low_precision_state_dtype() -> None:
    inputs = make_inputs(23, 2, 1, 4, 3, 2, 5, dtype=torch.float32)
    state = inputs["initial_state"].to(torch.bfloat16)
    args = (inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"], inputs["B"][:, 0])
    args += (inputs["C"][:, 0], inputs["D"], inputs["z"][:, 0])
    options = {"dt_bias": inputs["dt_bias"], "dt_softplus": True}
    expected_state = state.clone()
    expected = ssd_state_update(expected_state, *args, **options, backend="torch")
    y = ssd_state_update_triton(state, *args, **options)
    assert state.dtype == torch.bfloat16
    # same float32 arithmetic, then one rounding of the state to bf16 (8 significant bits)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.float(), expected_state.float(), rtol=1e-2, atol=1e-2)


def test_state_update_refuses_inputs_that_need_grad() -> None:
    inputs = make_inputs(22, 1, 1, 2, 3, 1, 4)
    A = inputs["A"].clone().requires_grad_()
    state = torch.zeros(1, 2, 3, 4, dtype=torch.float64, device=DEVICE)
    x, dt, B, C = (inputs[k][:, 0] for k in ("x", "dt", "B", "C"))
    with pytest.raises(RuntimeError, match="inference only"):
        ssd_state_update(state, x, dt, A, B, C, backend="triton")
