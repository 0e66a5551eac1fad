"""Mamba-3 scan: chunked vs the sequential reference, decoding steps, Mamba-2 as a special case,
and the reference's step against mamba_ssm's own reference step."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from hybridlab_kernels import Mamba3State, mamba3_scan, mamba3_state_update
from hybridlab_kernels.mamba3 import zero_state
from hybridlab_kernels.ssd.naive import ssd_ref
from tests.kernels.mamba3_inputs import make_inputs

# float64: the paths differ only in summation order (measured <= 2e-13 on these shapes).
F64_TOL = {"rtol": 1e-9, "atol": 1e-9}
F32_TOL = {"rtol": 1e-4, "atol": 1e-4}

# (batch, L, H, P, N, G, R, S): SISO and MIMO, one group or one per head, odd lengths, L < chunk
SHAPES = [
    (2, 37, 4, 8, 16, 2, 1, 4),
    (1, 70, 2, 4, 8, 1, 1, 2),
    (1, 5, 2, 4, 8, 2, 1, 4),
    (2, 33, 4, 8, 16, 4, 2, 4),
    (1, 20, 2, 4, 8, 1, 3, 2),
]


def _loss_weights(y, seed):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_matches_reference_values_states_and_gradients(shape, initial_state, chunk_size):
    tensors, kwargs = make_inputs(sum(shape) + chunk_size, *shape, initial_state=initial_state)
    tensors = [t.requires_grad_() for t in tensors]
    leaves = list(tensors)
    if initial_state:
        state = Mamba3State(*(t.requires_grad_() for t in kwargs["initial_state"]))
        kwargs["initial_state"] = state
        leaves += list(kwargs["initial_state"])
    y_ref, s_ref = mamba3_scan(*tensors, **kwargs, return_final_state=True, backend="ref")
    y, s = mamba3_scan(*tensors, **kwargs, chunk_size=chunk_size, return_final_state=True,
                       backend="torch")
    torch.testing.assert_close(y, y_ref, **F64_TOL)
    for name, got, want in zip(Mamba3State._fields, s, s_ref, strict=True):
        torch.testing.assert_close(got, want, **F64_TOL, msg=f"final state {name}")
    w = _loss_weights(y, 1)
    loss_ref = (y_ref * w).sum() + (s_ref.ssm ** 2).sum() + s_ref.k.sum()
    loss = (y * w).sum() + (s.ssm ** 2).sum() + s.k.sum()
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    grads = torch.autograd.grad(loss, leaves)
    for i, (got, want) in enumerate(zip(grads, grads_ref, strict=True)):
        torch.testing.assert_close(got, want, **F64_TOL, msg=f"gradient of input {i}")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]])
def test_float32_matches_float64_reference(shape):
    tensors, kwargs = make_inputs(7, *shape)
    y_ref = mamba3_scan(*tensors, **kwargs, backend="ref")
    y = mamba3_scan(*(t.float() for t in tensors), **{k: v.float() for k, v in kwargs.items()},
                    backend="torch")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, **F32_TOL)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]])
def test_scan_resumes_from_its_final_state(shape):
    tensors, kwargs = make_inputs(11, *shape)
    L, cut = shape[1], shape[1] // 3
    whole, end = mamba3_scan(*tensors, **kwargs, return_final_state=True)

    def part(sl):
        kw = {k: (v[:, sl] if k == "z" else v) for k, v in kwargs.items()}
        return [t[:, sl] if t.dim() >= 3 and t.shape[1] == L else t for t in tensors], kw

    first, first_kw = part(slice(0, cut))
    y1, mid = mamba3_scan(*first, **first_kw, return_final_state=True)
    second, second_kw = part(slice(cut, L))
    y2, end2 = mamba3_scan(*second, **second_kw, initial_state=mid, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole, **F64_TOL)
    for got, want in zip(end2, end, strict=True):
        torch.testing.assert_close(got, want, **F64_TOL)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]])
def test_decoding_steps_equal_the_scan(shape):
    tensors, kwargs = make_inputs(13, *shape)
    batch, L, H, P, N, _, R, S = shape
    y, end = mamba3_scan(*tensors, **kwargs, return_final_state=True)
    state = zero_state(batch, H, P, N, R, S, device=torch.device("cpu"), dtype=torch.float64)
    state = Mamba3State(*(t.double() for t in state))
    steps = []
    for t in range(L):
        per_step = [x[:, t] if x.dim() >= 3 and x.shape[1] == L else x for x in tensors]
        kw = {k: (v[:, t] if k == "z" else v) for k, v in kwargs.items()}
        steps.append(mamba3_state_update(state, *per_step, **kw))
    torch.testing.assert_close(torch.stack(steps, 1), y, **F64_TOL)
    for got, want in zip(state, end, strict=True):
        torch.testing.assert_close(got, want, **F64_TOL)


def test_full_trapezoid_without_rotation_is_mamba2():
    """lam = 1 (trap -> +inf), no angles, zero biases, A fixed per head: Mamba-2's SSD."""
    batch, L, H, P, N, G = 2, 29, 4, 8, 16, 2
    tensors, kwargs = make_inputs(17, batch, L, H, P, N, G, 1, 2)
    q, k, v, _, dt, _, _, _, _ = tensors
    A = -torch.rand(H, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    zeros = torch.zeros(H, 1, N, dtype=torch.float64)
    y = mamba3_scan(
        q, k, v, A * dt, dt, torch.full_like(dt, 60.0), zeros, zeros,
        torch.zeros(batch, L, 2, dtype=torch.float64), **kwargs,
    )
    want = ssd_ref(v, dt, A, k[:, :, 0], q[:, :, 0], D=kwargs["D"], z=kwargs["z"])
    torch.testing.assert_close(y, want, **F64_TOL)


def test_half_trapezoid_averages_two_inputs_by_hand():
    """One head, P = N = 2, two steps, lam = 1/2: the state after step 2 by hand."""
    one = torch.ones(1, 2, 1, 1, 2, dtype=torch.float64)
    q = one.clone()
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 2, 1, 1, 2)
    v = torch.tensor([[2.0, 3.0], [5.0, 7.0]], dtype=torch.float64).view(1, 2, 1, 2)
    dt = torch.full((1, 2, 1), 0.5, dtype=torch.float64)
    adt = torch.full((1, 2, 1), math.log(0.8), dtype=torch.float64)
    zeros = torch.zeros(1, 1, 2, dtype=torch.float64)
    _, state = mamba3_scan(
        q, k, v, adt, dt, torch.zeros_like(dt), zeros, zeros,
        torch.zeros(1, 2, 1, dtype=torch.float64), return_final_state=True,
    )
    u1 = torch.outer(v[0, 0, 0], k[0, 0, 0, 0])
    u2 = torch.outer(v[0, 1, 0], k[0, 1, 0, 0])
    h1 = 0.25 * u1
    h2 = 0.8 * h1 + 0.8 * 0.25 * u1 + 0.25 * u2
    torch.testing.assert_close(state.ssm[0, 0], h2)


def test_bad_shapes_name_the_argument():
    tensors, kwargs = make_inputs(1, 1, 8, 2, 4, 8, 1, 1, 2)
    bad = list(tensors)
    bad[3] = bad[3][:, :, :1]
    with pytest.raises(ValueError, match="adt must have shape"):
        mamba3_scan(*bad, **kwargs)
    bad = list(tensors)
    bad[8] = torch.zeros(1, 8, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="angles must have shape"):
        mamba3_scan(*bad, **kwargs)
    with pytest.raises(ValueError, match="mimo_x is for MIMO"):
        mamba3_scan(*tensors, **kwargs, mimo_x=torch.ones(2, 1, 4, dtype=torch.float64))
    mimo, mimo_kw = make_inputs(1, 1, 8, 2, 4, 8, 1, 2, 2)
    mimo_kw.pop("mimo_o")
    with pytest.raises(ValueError, match="needs mimo_o"):
        mamba3_scan(*mimo, **mimo_kw)


# --- mamba_ssm's own reference step ------------------------------------------------------------
# mamba_ssm ships, beside its CUDA/Triton Mamba-3 kernels, two pure-torch references its tests
# check them against: apply_rotary_qk_inference_reference (bias, angle update, rotation) and
# selective_state_update_fused_ref_v2 (the trapezoidal state update and read-out). Their modules
# import CUDA-only packages, so the two functions are read out of the installed sources.

def _mamba_ssm_reference(path: str, name: str):
    import importlib.util

    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or spec.origin is None:
        pytest.skip("mamba_ssm is not installed (.ci/mamba-ssm-cpu.sh installs it)")
    source_path = Path(spec.origin).parent / path
    tree = ast.parse(source_path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"torch": torch, "math": math, "Optional": None}
    exec(compile(ast.Module([node], []), str(source_path), "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("R", [1, 2])
def test_step_matches_mamba_ssm_reference_step(R):
    rotary = _mamba_ssm_reference(
        "ops/triton/mamba3/mamba3_mimo_rotary_step.py", "apply_rotary_qk_inference_reference"
    )
    update = _mamba_ssm_reference(
        "ops/cute/mamba3/mamba3_step_fn.py", "selective_state_update_fused_ref_v2"
    )
    batch, H, P, N, S = 2, 4, 8, 16, 4
    tensors, kwargs = make_inputs(23, batch, 1, H, P, N, H, R, S, initial_state=True)
    q, k, v, adt, dt, trap, angles = (t[:, 0] for t in tensors[:6] + tensors[8:])
    q_bias, k_bias = tensors[6:8]
    z = kwargs["z"][:, 0]
    state = kwargs["initial_state"]
    ones = torch.ones(H, R, P, dtype=torch.float64)
    mimo_x, mimo_z, mimo_o = (kwargs.get(n, ones) for n in ("mimo_x", "mimo_z", "mimo_o"))

    # mamba_ssm's decode path (Mamba3.step): biases, angles and rotation, then the update
    q_up, k_up, angle_up = rotary(
        q, k, state.angle, angles[:, None, :].expand(batch, H, S), dt,
        bias_q=q_bias.transpose(0, 1), bias_k=k_bias.transpose(0, 1),
        rotate_pairwise=R == 1,
    )
    out_up, ssm_up = update(
        state.ssm, adt / dt, k_up, q_up, mimo_x.permute(1, 0, 2),
        v, mimo_z.permute(1, 0, 2), z, dt, state.k, state.v, torch.sigmoid(trap),
        kwargs["D"], mimo_o.permute(1, 0, 2), compute_dtype=torch.float64,
    )

    mine = Mamba3State(*(t.clone() for t in state))
    proj = {n: kwargs[n] for n in ("mimo_x", "mimo_z", "mimo_o") if n in kwargs}
    out = mamba3_state_update(
        mine, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=kwargs["D"], z=z, **proj
    )
    torch.testing.assert_close(out, out_up, **F64_TOL)
    torch.testing.assert_close(mine.ssm, ssm_up, **F64_TOL)
    torch.testing.assert_close(mine.k, k_up, **F64_TOL)
    torch.testing.assert_close(mine.angle, torch.remainder(angle_up, 2 * math.pi), **F64_TOL)
