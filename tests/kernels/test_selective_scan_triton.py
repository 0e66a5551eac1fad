"""Triton selective scan and decoding step against the sequential reference.

Without a GPU the kernels run under Triton's interpreter, so shapes stay small; every buffer a
kernel must fill starts as NaN (DEBUG_POISON) so that unwritten memory fails the comparison.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from hybridlab_kernels import selective_scan, selective_state_update
from hybridlab_kernels.selective_scan.naive import selective_scan_ref

if not torch.cuda.is_available():
    # Triton reads this once, at import: without a GPU its kernels can only run interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
triton_scan = importlib.import_module("hybridlab_kernels.selective_scan.triton_scan")
selective_scan_triton = triton_scan.selective_scan_triton
selective_state_update_triton = triton_scan.selective_state_update_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# float32 kernel against the float64 reference, so only the kernel's own rounding counts: ~6e-8
# per operation, compounded over up to 33 steps and sums of up to batch * L terms (dA, dB, dC,
# d delta_bias). The largest difference seen uses 5% of this tolerance (3e-4 on a d delta_bias
# of 1.2e3); a wrong term (a missed decay, a dropped chunk boundary) shows at 1e-2 or more.
F32_TOL = {"rtol": 1e-4, "atol": 1e-4}
# float64 runs the same kernels in float64: only summation order differs (~1e-15 relative).
F64_TOL = {"rtol": 1e-10, "atol": 1e-10}

OPTIONAL = ("D", "z", "delta_bias", "initial_state")
TENSORS = ("u", "delta", "A", "B", "C", *OPTIONAL)


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_scan, "DEBUG_POISON", True)


def make_inputs(
    seed: int,
    batch: int,
    dim: int,
    N: int,
    L: int,
    G: int | None,
    *,
    optional: tuple[str, ...] = OPTIONAL,
    softplus: bool = True,
    dtype: torch.dtype = torch.float32,
    big_dt_fraction: float = 0.1,
) -> dict:
    """Keyword arguments at Mamba's magnitudes; G=None gives B and C the (batch, N, L) layout.

    dt (after bias and softplus) is log-uniform in [1e-3, 0.1], Mamba's dt init range, with
    `big_dt_fraction` of the steps in [0.5, 1.5]; A = -exp(U[0, log 16]) lies in [-16, -1].
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    dt = torch.exp(math.log(1e-3) + rand(batch, dim, L) * math.log(100))
    dt = torch.where(rand(batch, dim, L) < big_dt_fraction, 0.5 + rand(batch, dim, L), dt)
    bias = 0.1 * randn(dim)
    inputs = {
        "u": randn(batch, dim, L),
        # softplus^-1(dt) = dt + log(1 - exp(-dt)); the bias is subtracted again below if used
        "delta": dt + torch.log(-torch.expm1(-dt)) if softplus else dt,
        "A": -torch.exp(rand(dim, N) * math.log(16)),
        "B": randn(batch, N, L) if G is None else randn(batch, G, N, L),
        "C": randn(batch, N, L) if G is None else randn(batch, G, N, L),
        "D": randn(dim),
        "z": randn(batch, dim, L),
        "delta_bias": bias,
        "initial_state": randn(batch, dim, N),
    }
    inputs = {k: v for k, v in inputs.items() if k not in OPTIONAL or k in optional}
    if "delta_bias" in inputs:
        inputs["delta"] = inputs["delta"] - bias[:, None]
    inputs = {k: v.to(device=DEVICE, dtype=dtype) for k, v in inputs.items()}
    return {**inputs, "delta_softplus": softplus}


def run(
    fn: Callable[..., tuple[Tensor, Tensor]], inputs: dict, dtype: torch.dtype, **kwargs
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """y, final state and every input's grad under random upstream grads on y and the state,
    with the tensors cast to `dtype` first."""
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items() if k in TENSORS}
    options = {k: v for k, v in inputs.items() if k not in TENSORS}
    y, state = fn(**leaves, **options, return_final_state=True, **kwargs)
    g = torch.Generator().manual_seed(1234)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    grad_state = torch.randn(state.shape, generator=g, dtype=torch.float64).to(state)
    loss = (y * grad_y).sum() + (state * grad_state).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, state, dict(zip(leaves, grads, strict=True))


def assert_match(expected: tuple, actual: tuple, tol: dict[str, float]) -> None:
    (y_ref, s_ref, g_ref), (y, s, grads) = expected, actual
    torch.testing.assert_close(y, y_ref.to(y.dtype), **tol, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(s, s_ref.to(s.dtype), **tol, msg=lambda m: f"final state: {m}")
    assert grads.keys() == g_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, g_ref[name].to(grad.dtype), **tol, msg=lambda m, n=name: f"d{n}: {m}"
        )


SHAPES = [
    # batch, dim, N, L, G, chunk_size
    (2, 4, 3, 1, None, 16),  # one step
    (2, 6, 4, 7, 2, 16),  # 3 channels per group in a block of 4
    (1, 5, 5, 33, 1, 16),  # G = 1 as a 4-D tensor, N padded 5 -> 8, L = 2 chunks + 1
    (2, 4, 3, 33, None, 16),
    (1, 8, 2, 20, 8, 8),  # one channel per group: BLOCK_D = 1
    (1, 80, 3, 9, 2, 4),  # 40 channels per group: two blocks, the second partly masked
    (2, 40, 16, 32, None, 16),  # two blocks over 40 channels; L a multiple of the chunk
]

OPTION_SETS = [
    # optional inputs, delta_softplus
    ((), False),
    (OPTIONAL, True),
    (("initial_state", "delta_bias"), False),
    (("D", "z"), True),
]


@pytest.mark.parametrize(("optional", "softplus"), OPTION_SETS)
@pytest.mark.parametrize(("batch", "dim", "N", "L", "G", "chunk_size"), SHAPES)
def test_matches_reference(
    batch: int,
    dim: int,
    N: int,
    L: int,
    G: int | None,
    chunk_size: int,
    optional: tuple[str, ...],
    softplus: bool,
) -> None:
    inputs = make_inputs(L + dim, batch, dim, N, L, G, optional=optional, softplus=softplus)
    expected = run(selective_scan_ref, inputs, torch.float64)
    actual = run(selective_scan_triton, inputs, torch.float32, chunk_size=chunk_size)
    assert_match(expected, actual, F32_TOL)


@pytest.mark.parametrize(("batch", "dim", "N", "L", "G", "chunk_size"), SHAPES[1:4])
def test_matches_reference_in_float64(
    batch: int, dim: int, N: int, L: int, G: int | None, chunk_size: int
) -> None:
    inputs = make_inputs(L * dim, batch, dim, N, L, G, dtype=torch.float64)
    expected = run(selective_scan_ref, inputs, torch.float64)
    actual = run(selective_scan_triton, inputs, torch.float64, chunk_size=chunk_size)
    assert_match(expected, actual, F64_TOL)


def test_strong_decay_over_many_chunks_stays_finite_and_correct() -> None:
    # dt up to 1.5 on a third of the steps with A down to -16: decays reach exp(-24) per step and
    # underflow to 0 across a chunk, which the checkpointed backward must survive.
    inputs = make_inputs(3, 1, 4, 4, 200, None, big_dt_fraction=0.3)
    expected = run(selective_scan_ref, inputs, torch.float64)
    actual = run(selective_scan_triton, inputs, torch.float32)
    for tensor in (actual[0], actual[1], *actual[2].values()):
        assert torch.isfinite(tensor).all()
    assert_match(expected, actual, F32_TOL)


def test_softplus_keeps_the_precision_of_small_dt() -> None:
    # One step from a zero state: y = dt * u * sum(B * C), so y's relative error is dt's. A naive
    # log(1 + exp(x)) in float32 loses ~6e-8 / dt relative, 6e-4 at dt = 1e-4.
    g = torch.Generator().manual_seed(6)
    dt = torch.logspace(-5, -1, 64, dtype=torch.float64).view(1, 64, 1)
    inputs = {
        "u": torch.ones(1, 64, 1, dtype=torch.float64),
        "delta": torch.log(torch.expm1(dt)),
        "A": -torch.ones(64, 2, dtype=torch.float64),
        "B": torch.randn(1, 2, 1, generator=g, dtype=torch.float64),
        "C": torch.randn(1, 2, 1, generator=g, dtype=torch.float64),
    }
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    args = {k: v.float().to(DEVICE) for k, v in inputs.items()}
    y = selective_scan_triton(**args, delta_softplus=True)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-5, atol=0)


def test_low_precision_inputs_compute_in_float32() -> None:
    inputs = make_inputs(11, 2, 6, 3, 21, 2)
    # activations arrive in bf16, SSM parameters (A, D, delta_bias) stay float32
    low = {k: v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    leaves = {k: v.detach().requires_grad_() for k, v in low.items() if k in TENSORS}
    y, state = selective_scan_triton(**leaves, delta_softplus=True, return_final_state=True)
    assert (y.dtype, state.dtype) == (torch.bfloat16, torch.float32)
    y.float().sum().backward()
    assert all(leaf.grad.dtype == leaf.dtype for leaf in leaves.values())
    upcast = {k: v.float() if k in TENSORS else v for k, v in low.items()}
    y_ref, state_ref = selective_scan_ref(**upcast, return_final_state=True)
    # the kernel computes from the same bf16 values in float32 and rounds y once at the end
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(state, state_ref, **F32_TOL)


def test_backward_keeps_one_state_per_chunk() -> None:
    inputs = make_inputs(4, 2, 4, 3, 40, None)
    leaves = {k: v.requires_grad_() if k == "u" else v for k, v in inputs.items()}
    y = selective_scan_triton(**leaves, chunk_size=16)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    # (batch, ceil(40 / 16), dim, N): no tensor of batch * dim * N * L states is kept
    assert max(t.numel() for t in saved) == inputs["u"].numel()
    assert any(t.shape == (2, 3, 4, 3) for t in saved)


def test_public_op_routes_to_triton_and_accepts_strided_inputs() -> None:
    inputs = make_inputs(5, 2, 4, 3, 19, 2)
    # B and C as a layer slices them out of one projection: transposed views
    strided = {
        k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if k in ("B", "C") else v
        for k, v in inputs.items()
    }
    assert not strided["B"].is_contiguous()
    y = selective_scan(**strided, backend="triton")
    y_ref = selective_scan_ref(**{k: v.double() if k in TENSORS else v for k, v in inputs.items()})
    torch.testing.assert_close(y, y_ref.float(), **F32_TOL)


def step_through(
    step: Callable[..., Tensor], inputs: dict, state: Tensor, **kwargs
) -> tuple[Tensor, Tensor]:
    """Feed the scan's inputs token by token; returns (y (batch, dim, L), the final state)."""
    ys = [
        step(
            state,
            inputs["u"][..., t],
            inputs["delta"][..., t],
            inputs["A"],
            inputs["B"][..., t],
            inputs["C"][..., t],
            inputs["D"],
            inputs["z"][..., t],
            dt_bias=inputs["delta_bias"],
            dt_softplus=True,
            **kwargs,
        )
        for t in range(inputs["u"].shape[-1])
    ]
    return torch.stack(ys, dim=-1), state


@pytest.mark.parametrize(("dim", "G"), [(6, None), (5, 1), (6, 2), (40, 2)])
def test_state_update_reproduces_scan(dim: int, G: int | None) -> None:
    inputs = make_inputs(21 + dim, 2, dim, 5, 9, G)
    y_ref, state_ref = selective_scan_ref(
        **{k: v.double() if k in TENSORS else v for k, v in inputs.items()},
        return_final_state=True,
    )
    state = inputs["initial_state"].clone()
    state_ptr = state.data_ptr()
    with torch.no_grad():
        y, state = step_through(selective_state_update_triton, inputs, state)
    assert state.data_ptr() == state_ptr
    torch.testing.assert_close(y, y_ref.float(), **F32_TOL)
    torch.testing.assert_close(state, state_ref.float(), **F32_TOL)


def test_state_update_writes_through_a_strided_state() -> None:
    inputs = make_inputs(23, 2, 4, 3, 5, None)
    storage = inputs["initial_state"].transpose(1, 2).contiguous()  # (batch, N, dim)
    state = storage.transpose(1, 2)  # (batch, dim, N) view, not contiguous
    expected = inputs["initial_state"].clone()
    with torch.no_grad():
        y, _ = step_through(selective_state_update_triton, inputs, state)
        y_torch, _ = step_through(selective_state_update, inputs, expected, backend="torch")
    torch.testing.assert_close(y, y_torch, **F32_TOL)
    torch.testing.assert_close(storage.transpose(1, 2), expected, **F32_TOL)


def test_state_update_grads_match_the_torch_step() -> None:
    inputs = make_inputs(24, 2, 6, 3, 3, 2)

    def grads(backend: str) -> list[Tensor]:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k in TENSORS}
        # a strided state, as the grad path copies it before the kernel sees it
        state = leaves["initial_state"].transpose(1, 2).contiguous().transpose(1, 2)
        y, state = step_through(selective_state_update, leaves, state, backend=backend)
        (y.sum() + (state * state).sum()).backward()
        return [leaf.grad for leaf in leaves.values()]

    for triton_grad, torch_grad in zip(grads("triton"), grads("torch"), strict=True):
        torch.testing.assert_close(triton_grad, torch_grad, **F32_TOL)


def test_state_update_backend_argument_dispatches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(*args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return selective_state_update_triton(*args, **kwargs)

    monkeypatch.setattr(triton_scan, "selective_state_update_triton", spy)
    inputs = make_inputs(25, 1, 4, 3, 2, None)
    with torch.no_grad():
        step_through(
            selective_state_update, inputs, inputs["initial_state"].clone(), backend="torch"
        )
        assert calls == []
        step_through(
            selective_state_update, inputs, inputs["initial_state"].clone(), backend="triton"
        )
    assert len(calls) == 2
