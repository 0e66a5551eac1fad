"""Mamba-2 SSD: reference vs formula, chunked vs reference, decoding step vs scan."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from hybridlab_kernels import ssd, ssd_state_update
from hybridlab_kernels.ssd.chunked import ssd_chunked
from hybridlab_kernels.ssd.naive import ssd_ref

# the package's `ssd` attribute is the op, so reach the module through importlib
chunked_module = importlib.import_module("hybridlab_kernels.ssd.chunked")

# float64 inputs: chunked and reference then differ only in summation order (~1e-15 relative), so
# 1e-9 keeps a wide margin while any real error (a wrong decay, a missed chunk) shows at >1e-3.
F64_TOL = {"rtol": 1e-9, "atol": 1e-9}
# float32: the two paths accumulate ~L roundings of 6e-8 in different orders.
F32_TOL = {"rtol": 1e-4, "atol": 1e-4}

OPTIONAL = ("D", "z", "dt_bias", "initial_state")
TENSORS = ("x", "dt", "A", "B", "C", *OPTIONAL)


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
    """Keyword arguments at Mamba-2's magnitudes.

    dt (after bias and softplus) lands log-uniformly in [1e-3, 0.1], Mamba-2's dt init range, with
    `big_dt_fraction` of the steps in [0.5, 1.5] to stress the decay; A = -exp(U[0, log 16]) lies
    in [-16, -1].
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=dtype)

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
    return {**inputs, "dt_softplus": softplus}


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
    # H = 1, P = N = 2, L = 2, every option on, written out from the recurrence's definition:
    # h[p][n] = exp(dt a) h[p][n] + dt x[p] B[n];  y[p] = (sum_n h[p][n] C[n] + D x[p]) silu(z[p])
    x = [[0.7, -1.3], [0.2, 0.5]]
    B = [[1.5, -0.5], [0.3, 0.8]]
    C = [[0.3, 2.0], [-1.0, 0.4]]
    z = [[1.1, -0.4], [0.6, 2.2]]
    dt_raw, a, d, bias = [0.4, -0.2], -2.0, 0.6, 0.25
    h = [[0.9, -0.1], [0.3, 0.0]]
    h_init = [row[:] for row in h]
    expected = []
    for t in range(2):
        dt = math.log1p(math.exp(dt_raw[t] + bias))
        h = [
            [math.exp(dt * a) * h[p][n] + dt * x[t][p] * B[t][n] for n in range(2)]
            for p in range(2)
        ]
        expected.append(
            [
                (sum(h[p][n] * C[t][n] for n in range(2)) + d * x[t][p])
                * z[t][p]
                / (1 + math.exp(-z[t][p]))
                for p in range(2)
            ]
        )

    def t(values: list) -> Tensor:
        return torch.tensor(values, dtype=torch.float64)

    y, state = ssd_ref(
        t(x).view(1, 2, 1, 2),
        t(dt_raw).view(1, 2, 1),
        t([a]),
        t(B).view(1, 2, 1, 2),
        t(C).view(1, 2, 1, 2),
        D=t([d]),
        z=t(z).view(1, 2, 1, 2),
        dt_bias=t([bias]),
        dt_softplus=True,
        initial_state=t(h_init).view(1, 1, 2, 2),
        return_final_state=True,
    )
    assert y.flatten().tolist() == pytest.approx([v for row in expected for v in row], rel=1e-12)
    assert state.flatten().tolist() == pytest.approx([v for row in h for v in row], rel=1e-12)


def test_reference_groups_map_head_h_to_group_h_over_heads_per_group() -> None:
    inputs = make_inputs(0, batch=2, L=5, H=6, P=2, G=3, N=3, optional=())
    y = ssd_ref(**inputs)
    for h in range(6):
        group = h // 2
        y_h = ssd_ref(
            inputs["x"][:, :, h : h + 1],
            inputs["dt"][:, :, h : h + 1],
            inputs["A"][h : h + 1],
            inputs["B"][:, :, group : group + 1],
            inputs["C"][:, :, group : group + 1],
            dt_softplus=True,
        )
        torch.testing.assert_close(y[:, :, h : h + 1], y_h, rtol=1e-12, atol=1e-12)


SHAPES = [
    # batch, L, H, P, G, N, chunk_size
    (2, 1, 2, 3, 1, 4, 16),
    (2, 7, 4, 3, 2, 5, 16),
    (1, 63, 6, 2, 3, 4, 16),
    (2, 64, 2, 4, 1, 8, 32),
    (2, 130, 4, 2, 2, 3, 32),
    (1, 130, 3, 2, 3, 4, 64),
]
OPTION_SETS = [
    # optional inputs, dt_softplus, D of shape (H, P) rather than (H,)
    ((), False, False),
    (OPTIONAL, True, True),
    (("initial_state", "dt_bias"), False, False),
    (("D", "z"), True, False),
]


@pytest.mark.parametrize(("optional", "softplus", "D_per_channel"), OPTION_SETS)
@pytest.mark.parametrize(("batch", "L", "H", "P", "G", "N", "chunk_size"), SHAPES)
def test_chunked_matches_reference(
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
        L + H,
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
    actual = run(ssd_chunked, inputs, chunk_size=chunk_size)
    assert_match(expected, actual, F64_TOL)


def test_chunked_matches_reference_in_float32() -> None:
    inputs = make_inputs(7, 2, 100, 4, 3, 2, 8, dtype=torch.float32)
    assert_match(run(ssd_ref, inputs), run(ssd_chunked, inputs, chunk_size=32), F32_TOL)


def test_strong_decay_over_long_sequence_stays_finite_and_correct() -> None:
    # dt near 1..1.5 on a third of the steps with A down to -16: cumulative log decays reach ~-1e4,
    # far past exp's float32 range (-87), which a factored exp(S_t) * exp(-S_s) would overflow.
    inputs = make_inputs(3, 1, 2048, 2, 2, 1, 4, dtype=torch.float32, big_dt_fraction=0.3)
    expected = run(ssd_ref, inputs)
    actual = run(ssd_chunked, inputs, chunk_size=64)
    for tensor in (actual[0], actual[1], *actual[2].values()):
        assert torch.isfinite(tensor).all()
    assert_match(expected, actual, F32_TOL)


def test_public_op_accepts_non_contiguous_inputs() -> None:
    inputs = make_inputs(5, 2, 37, 4, 3, 2, 4)
    # x, B and C as Mamba-2 slices them out of one projection along the last dim
    packed = torch.cat([inputs["x"].flatten(2), inputs["B"].flatten(2), inputs["C"].flatten(2)], -1)
    x, B, C = packed.split([12, 8, 8], dim=-1)
    strided = {**inputs, "x": x.unflatten(-1, (4, 3)), "B": B.unflatten(-1, (2, 4))}
    strided["C"] = C.unflatten(-1, (2, 4))
    assert not strided["x"].is_contiguous() and not strided["B"].is_contiguous()
    torch.testing.assert_close(ssd(**strided, chunk_size=16), ssd_ref(**inputs), **F64_TOL)


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


def blocks_of(monkeypatch: pytest.MonkeyPatch, chunks: int, H: int, T: int) -> None:
    """Make the chunked path process `chunks` chunks per block (batch rows laid end to end)."""
    monkeypatch.setattr(chunked_module, "BLOCK_ELEMENTS", chunks * H * T * T)


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("chunks_per_block", [1, 2, 3, 100])
@pytest.mark.parametrize(
    ("batch", "L", "H", "G", "chunk_size"), [(3, 37, 4, 2, 8), (2, 32, 2, 1, 8)]
)
def test_chunked_blocks_across_batch_rows_write_every_element(
    monkeypatch: pytest.MonkeyPatch,
    chunks_per_block: int,
    batch: int,
    L: int,
    H: int,
    G: int,
    chunk_size: int,
) -> None:
    # 5 or 4 chunks per row: blocks of 2 and 3 chunks straddle rows, 100 spans everything
    blocks_of(monkeypatch, chunks_per_block, H, chunk_size)
    inputs = make_inputs(L + chunks_per_block, batch, L, H, 3, G, 4, D_per_channel=True)
    expected = run(ssd_ref, inputs)
    assert_match(expected, run(ssd_chunked, inputs, chunk_size=chunk_size), F64_TOL)


@pytest.mark.parametrize("chunk_size", [1, 3, 40, 1000])
def test_chunked_result_does_not_depend_on_chunk_size(chunk_size: int) -> None:
    inputs = make_inputs(8, 2, 40, 4, 3, 2, 5)
    expected = run(ssd_ref, inputs)
    assert_match(expected, run(ssd_chunked, inputs, chunk_size=chunk_size), F64_TOL)


@pytest.mark.parametrize(("G", "D_per_channel"), [(1, False), (2, True)])
def test_chunked_backward_passes_gradcheck(
    monkeypatch: pytest.MonkeyPatch, G: int, D_per_channel: bool
) -> None:
    # the hand-written backward against finite differences, every option on, ragged chunks
    # and a block straddling the two batch rows
    blocks_of(monkeypatch, 2, 4, 2)
    inputs = make_inputs(9, 2, 5, 4, 2, G, 3, D_per_channel=D_per_channel)
    names = [k for k in inputs if k in TENSORS]

    def fn(*tensors: Tensor) -> tuple[Tensor, Tensor]:
        kwargs = dict(zip(names, tensors, strict=True))
        return ssd_chunked(**kwargs, dt_softplus=True, return_final_state=True, chunk_size=2)

    leaves = tuple(inputs[k].detach().clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("output", ["y", "final state"])
def test_chunked_gradients_through_one_output(output: str) -> None:
    inputs = make_inputs(10, 2, 21, 4, 3, 2, 5)

    def grads(fn: Callable[..., tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k in TENSORS}
        y, state = fn(**leaves, dt_softplus=True, chunk_size=8, return_final_state=True)
        loss = (y.sin() if output == "y" else state.sin()).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        # an input that cannot reach the used output has gradient None or zeros
        return tuple(
            torch.zeros_like(x) if g is None else g
            for x, g in zip(leaves.values(), grads, strict=True)
        )

    for expected, actual in zip(grads(ssd_ref), grads(ssd_chunked), strict=True):
        torch.testing.assert_close(actual, expected, **F64_TOL)


def test_chunked_gradients_when_only_some_inputs_require_grad() -> None:
    inputs = make_inputs(12, 2, 19, 4, 3, 1, 5)

    def grads(fn: Callable[..., Tensor]) -> tuple[Tensor, ...]:
        x, A = inputs["x"].clone().requires_grad_(), inputs["A"].clone().requires_grad_()
        y = fn(**{**inputs, "x": x, "A": A}, chunk_size=8)
        return torch.autograd.grad(y.square().sum(), [x, A])

    for expected, actual in zip(grads(ssd_ref), grads(ssd_chunked), strict=True):
        torch.testing.assert_close(actual, expected, **F64_TOL)


@pytest.mark.parametrize("optional", [(), ("D",)])
def test_chunked_output_modified_in_place_is_never_silently_wrong(
    optional: tuple[str, ...],
) -> None:
    # without D or z the output is the scan's own result, which the backward reads back:
    # autograd must refuse an in-place change to it; with D the output is a copy and may change
    inputs = make_inputs(13, 2, 16, 4, 3, 2, 5, optional=optional)

    def grads(fn: Callable[..., Tensor]) -> tuple[Tensor, ...]:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k in TENSORS}
        y = fn(**leaves, dt_softplus=True, chunk_size=8)
        y.mul_(2.0)
        return torch.autograd.grad(y.square().sum(), list(leaves.values()))

    expected = grads(ssd_ref)
    if optional:
        for e, a in zip(expected, grads(ssd_chunked), strict=True):
            torch.testing.assert_close(a, e, **F64_TOL)
    else:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            grads(ssd_chunked)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_autocast_and_low_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    inputs = make_inputs(11, 2, 40, 4, 3, 2, 4, dtype=torch.float32)
    # activations arrive in low precision, SSM parameters (A, D, dt_bias) stay float32
    low = {k: v.to(dtype) if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}
    upcast = {k: v.float() if k in TENSORS else v for k, v in low.items()}
    expected = ssd_ref(**upcast, return_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = ssd(**low, chunk_size=16, return_final_state=True)
    assert y.dtype == dtype
    assert state.dtype == torch.float32
    # low-precision y is rounded once at the end; float32 y must be unaffected by autocast
    y_tol = F32_TOL if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(y.float(), expected[0], **y_tol)
    torch.testing.assert_close(state, expected[1], **F32_TOL)


@pytest.mark.parametrize(("G", "D_per_channel"), [(1, False), (2, True), (4, False)])
def test_state_update_reproduces_scan(G: int, D_per_channel: bool) -> None:
    inputs = make_inputs(21, 2, 9, 4, 3, G, 5, D_per_channel=D_per_channel)
    y_ref, state_ref = ssd_ref(**inputs, return_final_state=True)
    state = inputs["initial_state"].clone()
    state_id = id(state)
    ys = [
        ssd_state_update(
            state,
            inputs["x"][:, t],
            inputs["dt"][:, t],
            inputs["A"],
            inputs["B"][:, t],
            inputs["C"][:, t],
            inputs["D"],
            inputs["z"][:, t],
            dt_bias=inputs["dt_bias"],
            dt_softplus=True,
        )
        for t in range(9)
    ]
    assert id(state) == state_id
    torch.testing.assert_close(torch.stack(ys, dim=1), y_ref, **F64_TOL)
    torch.testing.assert_close(state, state_ref, **F64_TOL)


def test_state_update_works_with_grad_enabled() -> None:
    inputs = make_inputs(22, 1, 3, 2, 3, 1, 4)
    A = inputs["A"].clone().requires_grad_()
    state = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    x, dt, B, C = (inputs[k] for k in ("x", "dt", "B", "C"))
    total = sum(
        ssd_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t]).sum() for t in range(3)
    )
    total.backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("x", torch.zeros(2, 7, 4)),
        ("dt", torch.zeros(2, 7, 3)),
        ("A", torch.zeros(4, 1)),
        ("B", torch.zeros(2, 7, 3, 5)),  # G = 3 does not divide H = 4
        ("B", torch.zeros(2, 6, 2, 5)),
        ("C", torch.zeros(2, 7, 2, 4)),
        ("D", torch.zeros(4, 2)),
        ("z", torch.zeros(2, 7, 4, 2)),
        ("dt_bias", torch.zeros(3)),
        ("initial_state", torch.zeros(2, 4, 3, 4)),
        ("chunk_size", 0),
    ],
)
def test_scan_shape_errors_name_the_argument(name: str, bad: Tensor | int) -> None:
    with pytest.raises(ValueError, match=rf"ssd: {name} must"):
        ssd(**{**make_inputs(0, 2, 7, 4, 3, 2, 5), name: bad})


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("state", torch.zeros(2, 4, 3)),
        ("x", torch.zeros(2, 4, 2)),
        ("dt", torch.zeros(2, 3)),
        ("A", torch.zeros(4, 3)),
        ("B", torch.zeros(2, 3, 5)),
        ("C", torch.zeros(2, 2, 4)),
        ("D", torch.zeros(3, 3)),
        ("z", torch.zeros(1, 4, 3)),
        ("dt_bias", torch.zeros(2)),
    ],
)
def test_state_update_shape_errors_name_the_argument(name: str, bad: Tensor) -> None:
    args = {
        "state": torch.zeros(2, 4, 3, 5),
        "x": torch.zeros(2, 4, 3),
        "dt": torch.zeros(2, 4),
        "A": -torch.ones(4),
        "B": torch.zeros(2, 2, 5),
        "C": torch.zeros(2, 2, 5),
        "D": torch.zeros(4),
        "z": torch.zeros(2, 4, 3),
        "dt_bias": torch.zeros(4),
    }
    args[name] = bad
    with pytest.raises(ValueError, match=rf"ssd_state_update: {name} must"):
        ssd_state_update(**args)
