"""Mamba-1 selective scan: reference vs formula, chunked vs reference, decoding step vs scan."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from hybridlab_kernels import selective_scan, selective_state_update
from hybridlab_kernels.selective_scan.chunked import selective_scan_chunked
from hybridlab_kernels.selective_scan.naive import selective_scan_ref

# float64 inputs: chunked and reference then differ only in summation order (~1e-15 relative), so
# 1e-9 keeps a wide margin while any real error (a wrong decay, a missed chunk) shows at >1e-3.
F64_TOL = {"rtol": 1e-9, "atol": 1e-9}
# float32: the two paths accumulate ~L roundings of 6e-8 in different orders.
F32_TOL = {"rtol": 1e-4, "atol": 1e-4}

OPTIONAL = ("D", "z", "delta_bias", "initial_state")
TENSORS = ("u", "delta", "A", "B", "C", *OPTIONAL)


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
    dtype: torch.dtype = torch.float64,
    big_dt_fraction: float = 0.1,
) -> dict:
    """Keyword arguments at Mamba's magnitudes; G=None gives B and C the (batch, N, L) layout.

    dt (after bias and softplus) lands log-uniformly in [1e-3, 0.1], Mamba's dt init range, with
    `big_dt_fraction` of the steps in [0.5, 1.5] to stress the decay; A = -exp(U[0, log 16]) lies
    in [-16, -1].
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=dtype)

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
    for name in OPTIONAL:
        if name not in optional:
            del inputs[name]
    if "delta_bias" in inputs:
        inputs["delta"] = inputs["delta"] - bias[:, None]
    return {**inputs, "delta_softplus": softplus}


def run(
    fn: Callable[..., tuple[Tensor, Tensor]], inputs: dict, seed: int = 1234, **kwargs
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """y, final state and the gradient of every input tensor under random upstream gradients."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k in TENSORS}
    options = {k: v for k, v in inputs.items() if k not in TENSORS}
    y, state = fn(**leaves, **options, return_final_state=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(y.shape, generator=g, dtype=y.dtype)
    grad_state = torch.randn(state.shape, generator=g, dtype=state.dtype)
    loss = (y * grad_y).sum() + (state * grad_state).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, state, dict(zip(leaves, grads, strict=True))


def assert_match(expected: tuple, actual: tuple, tol: dict[str, float]) -> None:
    (y_ref, s_ref, g_ref), (y, s, grads) = expected, actual
    torch.testing.assert_close(y, y_ref, **tol, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(s, s_ref, **tol, msg=lambda m: f"final state: {m}")
    assert grads.keys() == g_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, g_ref[name], **tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_reference_matches_hand_computation() -> None:
    # dim = N = 1, L = 2, every option on, written out from the recurrence's definition
    u, delta, B, C, z = [0.7, -1.3], [0.4, -0.2], [1.5, -0.5], [0.3, 2.0], [1.1, -0.4]
    a, d, bias, h_init = -2.0, 0.6, 0.25, 0.9
    dt = [math.log1p(math.exp(x + bias)) for x in delta]
    h0 = math.exp(dt[0] * a) * h_init + dt[0] * B[0] * u[0]
    h1 = math.exp(dt[1] * a) * h0 + dt[1] * B[1] * u[1]
    silu = [x / (1 + math.exp(-x)) for x in z]
    expected = [(C[0] * h0 + d * u[0]) * silu[0], (C[1] * h1 + d * u[1]) * silu[1]]

    def t(*values: float) -> Tensor:
        return torch.tensor(values, dtype=torch.float64)

    y, state = selective_scan_ref(
        t(*u).view(1, 1, 2),
        t(*delta).view(1, 1, 2),
        t(a).view(1, 1),
        t(*B).view(1, 1, 2),
        t(*C).view(1, 1, 2),
        t(d),
        t(*z).view(1, 1, 2),
        delta_bias=t(bias),
        delta_softplus=True,
        initial_state=t(h_init).view(1, 1, 1),
        return_final_state=True,
    )
    assert y.flatten().tolist() == pytest.approx(expected, rel=1e-12)
    assert state.item() == pytest.approx(h1, rel=1e-12)


def test_reference_groups_map_channel_d_to_group_d_over_dim_per_group() -> None:
    inputs = make_inputs(0, batch=2, dim=6, N=3, L=5, G=3, optional=())
    y = selective_scan_ref(**inputs)
    for d in range(6):
        group = d // 2
        y_d = selective_scan_ref(
            inputs["u"][:, d : d + 1],
            inputs["delta"][:, d : d + 1],
            inputs["A"][d : d + 1],
            inputs["B"][:, group],
            inputs["C"][:, group],
            delta_softplus=True,
        )
        torch.testing.assert_close(y[:, d : d + 1], y_d, rtol=1e-12, atol=1e-12)


SHAPES = [
    # batch, dim, N, L, G, chunk_size
    (2, 4, 3, 1, None, 16),
    (2, 6, 4, 7, 2, 16),
    (1, 8, 5, 63, 4, 16),
    (2, 4, 3, 64, None, 16),
    (2, 4, 3, 130, 1, 32),
    (1, 6, 2, 130, 6, 64),
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
def test_chunked_matches_reference(
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
    expected = run(selective_scan_ref, inputs)
    actual = run(selective_scan_chunked, inputs, chunk_size=chunk_size)
    assert_match(expected, actual, F64_TOL)


def test_chunked_matches_reference_in_float32() -> None:
    inputs = make_inputs(7, 2, 8, 4, 100, 2, dtype=torch.float32)
    assert_match(run(selective_scan_ref, inputs), run(selective_scan_chunked, inputs), F32_TOL)


def test_strong_decay_over_long_sequence_stays_finite_and_correct() -> None:
    # dt near 1..1.5 on a third of the steps with A down to -16: cumulative log decays reach ~-1e4,
    # far past exp's float32 range (-87), which a factored exp(S_t) * exp(-S_s) would overflow.
    inputs = make_inputs(3, 1, 4, 4, 2048, None, dtype=torch.float32, big_dt_fraction=0.3)
    expected = run(selective_scan_ref, inputs)
    actual = run(selective_scan_chunked, inputs)
    for tensor in (actual[0], actual[1], *actual[2].values()):
        assert torch.isfinite(tensor).all()
    assert_match(expected, actual, F32_TOL)


def test_public_op_accepts_non_contiguous_inputs() -> None:
    inputs = make_inputs(5, 2, 4, 3, 37, 2)
    # B and C as a layer would slice them out of one projection: a transposed view
    strided = {
        k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if k in ("B", "C") else v
        for k, v in inputs.items()
    }
    assert not strided["B"].is_contiguous()
    torch.testing.assert_close(selective_scan(**strided), selective_scan_ref(**inputs), **F64_TOL)


@pytest.fixture
def nan_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uninitialised float tensors come out NaN, so an output element never written shows."""

    def poisoned(make: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def wrapper(*args: object, **kwargs: object) -> Tensor:
            t = make(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t

        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize(
    ("batch", "dim", "N", "L", "G", "chunk_size"),
    [(2, 6, 4, 7, 2, 3), (1, 4, 3, 16, None, 16), (2, 4, 3, 33, 1, 5)],
)
def test_chunked_writes_every_element(
    batch: int, dim: int, N: int, L: int, G: int | None, chunk_size: int
) -> None:
    inputs = make_inputs(L, batch, dim, N, L, G)
    expected = run(selective_scan_ref, inputs)
    assert_match(expected, run(selective_scan_chunked, inputs, chunk_size=chunk_size), F64_TOL)


@pytest.mark.parametrize("chunk_size", [1, 3, 40, 1000])
def test_chunked_result_does_not_depend_on_block_length(chunk_size: int) -> None:
    inputs = make_inputs(8, 2, 4, 3, 40, 2)
    expected = run(selective_scan_ref, inputs)
    assert_match(expected, run(selective_scan_chunked, inputs, chunk_size=chunk_size), F64_TOL)


@pytest.mark.parametrize("G", [None, 2])
def test_chunked_backward_passes_gradcheck(G: int | None) -> None:
    # the hand-written backward against finite differences, every option on, ragged blocks
    inputs = make_inputs(9, 1, 4, 2, 5, G)
    names = [k for k in inputs if k in TENSORS]

    def fn(*tensors: Tensor) -> tuple[Tensor, Tensor]:
        kwargs = dict(zip(names, tensors, strict=True))
        return selective_scan_chunked(
            **kwargs, delta_softplus=True, return_final_state=True, chunk_size=2
        )

    leaves = tuple(inputs[k].detach().clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("output", ["y", "final state"])
def test_chunked_gradients_through_one_output(output: str) -> None:
    inputs = make_inputs(10, 2, 4, 3, 21, 2)

    def grads(fn: Callable[..., tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k in TENSORS}
        y, state = fn(**leaves, delta_softplus=True, return_final_state=True)
        loss = (y.sin() if output == "y" else state.sin()).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        # an input that cannot reach the used output has gradient None or zeros
        return tuple(
            torch.zeros_like(x) if g is None else g
            for x, g in zip(leaves.values(), grads, strict=True)
        )

    for expected, actual in zip(
        grads(selective_scan_ref), grads(selective_scan_chunked), strict=True
    ):
        torch.testing.assert_close(actual, expected, **F64_TOL)


def test_chunked_gradients_when_only_some_inputs_require_grad() -> None:
    inputs = make_inputs(12, 2, 4, 3, 19, None)

    def grads(fn: Callable[..., Tensor]) -> tuple[Tensor, ...]:
        u, A = inputs["u"].clone().requires_grad_(), inputs["A"].clone().requires_grad_()
        y = fn(**{**inputs, "u": u, "A": A})
        return torch.autograd.grad(y.square().sum(), [u, A])

    for expected, actual in zip(
        grads(selective_scan_ref), grads(selective_scan_chunked), strict=True
    ):
        torch.testing.assert_close(actual, expected, **F64_TOL)


def test_chunked_output_can_be_modified_in_place() -> None:
    inputs = make_inputs(13, 2, 4, 3, 9, 2)

    def grads(fn: Callable[..., Tensor]) -> tuple[Tensor, ...]:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k in TENSORS}
        y = fn(**leaves, delta_softplus=True)
        y.mul_(2.0)
        return torch.autograd.grad(y.square().sum(), list(leaves.values()))

    for expected, actual in zip(
        grads(selective_scan_ref), grads(selective_scan_chunked), strict=True
    ):
        torch.testing.assert_close(actual, expected, **F64_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_autocast_and_low_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    inputs = make_inputs(11, 2, 4, 3, 40, 2, dtype=torch.float32)
    # activations arrive in low precision, SSM parameters (A, D, delta_bias) stay float32
    low = {k: v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    upcast = {k: v.float() if k in TENSORS else v for k, v in low.items()}
    expected = selective_scan_ref(**upcast, return_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = selective_scan(**low, return_final_state=True)
    assert y.dtype == dtype
    assert state.dtype == torch.float32
    # low-precision y is rounded once at the end; float32 y must be unaffected by autocast
    y_tol = F32_TOL if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(y.float(), expected[0], **y_tol)
    torch.testing.assert_close(state, expected[1], **F32_TOL)


@pytest.mark.parametrize("G", [None, 1, 2])
def test_state_update_reproduces_scan(G: int | None) -> None:
    inputs = make_inputs(21, 2, 4, 3, 9, G)
    y_ref, state_ref = selective_scan_ref(**inputs, return_final_state=True)
    state = inputs["initial_state"].clone()
    state_id = id(state)
    ys = [
        selective_state_update(
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
        )
        for t in range(9)
    ]
    assert id(state) == state_id
    torch.testing.assert_close(torch.stack(ys, dim=-1), y_ref, **F64_TOL)
    torch.testing.assert_close(state, state_ref, **F64_TOL)


def test_state_update_works_with_grad_enabled() -> None:
    inputs = make_inputs(22, 1, 4, 3, 3, None)
    A = inputs["A"].clone().requires_grad_()
    state = torch.zeros(1, 4, 3, dtype=torch.float64)
    u, delta, B, C = (inputs[k] for k in ("u", "delta", "B", "C"))
    total = sum(
        selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t]).sum()
        for t in range(3)
    )
    total.backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("u", torch.zeros(2, 4)),
        ("delta", torch.zeros(2, 4, 6)),
        ("A", torch.zeros(5, 3)),
        ("B", torch.zeros(2, 3, 3, 7)),  # G = 3 does not divide dim = 4
        ("B", torch.zeros(2, 2, 3, 6)),
        ("C", torch.zeros(2, 3, 7)),
        ("D", torch.zeros(3)),
        ("z", torch.zeros(2, 4, 8)),
        ("delta_bias", torch.zeros(4, 1)),
        ("initial_state", torch.zeros(2, 4, 2)),
    ],
)
def test_scan_shape_errors_name_the_argument(name: str, bad: Tensor) -> None:
    with pytest.raises(ValueError, match=rf"selective_scan: {name} must"):
        selective_scan(**{**make_inputs(0, 2, 4, 3, 7, 2), name: bad})


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("state", torch.zeros(2, 4)),
        ("x", torch.zeros(2, 5)),
        ("dt", torch.zeros(1, 4)),
        ("A", torch.zeros(4, 2)),
        ("B", torch.zeros(2, 3, 3)),
        ("C", torch.zeros(2, 2, 3)),
        ("D", torch.zeros(2)),
        ("z", torch.zeros(2, 3)),
        ("dt_bias", torch.zeros(5)),
    ],
)
def test_state_update_shape_errors_name_the_argument(name: str, bad: Tensor) -> None:
    args = {
        "state": torch.zeros(2, 4, 3),
        "x": torch.zeros(2, 4),
        "dt": torch.zeros(2, 4),
        "A": -torch.ones(4, 3),
        "B": torch.zeros(2, 3),
        "C": torch.zeros(2, 3),
        "D": torch.zeros(4),
        "z": torch.zeros(2, 4),
        "dt_bias": torch.zeros(4),
    }
    args[name] = bad
    with pytest.raises(ValueError, match=rf"selective_state_update: {name} must"):
        selective_state_update(**args)
