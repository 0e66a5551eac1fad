"""Mamba-3 on Triton (the SSD stage kernels with per-step decays, and the decoding-step kernel)
against the sequential reference: values, final states, every gradient, decoding.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before
triton is first imported.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hybridlab_kernels import Mamba3State, mamba3_scan, mamba3_state_update
from hybridlab_kernels.mamba3 import zero_state
from hybridlab_kernels.ssd import triton_common
from tests.kernels.mamba3_inputs import make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float64: kernels and reference differ only in summation order (measured <= 1e-13 here).
F64_TOL = {"rtol": 1e-9, "atol": 1e-9}

# (batch, L, H, P, N, G, R, S): SISO with groups, odd length over several chunks; MIMO rank 2
SHAPES = [(2, 37, 4, 8, 16, 2, 1, 4), (1, 21, 2, 4, 8, 1, 2, 2)]


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs and grad buffers start as NaN, so memory a kernel fails to write shows."""
    monkeypatch.setattr(triton_common, "DEBUG_POISON", True)


def _on_device(tensors, kwargs):
    tensors = [t.to(DEVICE) for t in tensors]
    kwargs = {k: (Mamba3State(*(t.to(DEVICE) for t in v)) if k == "initial_state" else v.to(DEVICE))
              for k, v in kwargs.items()}
    return tensors, kwargs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("initial_state", [False, True])
def test_triton_scan_matches_reference(shape, initial_state):
    tensors, kwargs = _on_device(*make_inputs(31 + shape[1], *shape, initial_state=initial_state))
    tensors = [t.requires_grad_() for t in tensors]
    y_ref, s_ref = mamba3_scan(*tensors, **kwargs, return_final_state=True, backend="ref")
    y, s = mamba3_scan(*tensors, **kwargs, chunk_size=16, return_final_state=True,
                       backend="triton")
    torch.testing.assert_close(y, y_ref, **F64_TOL)
    for name, got, want in zip(Mamba3State._fields, s, s_ref, strict=True):
        torch.testing.assert_close(got, want, **F64_TOL, msg=f"final state {name}")
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype).to(DEVICE)
    grads_ref = torch.autograd.grad((y_ref * w).sum() + (s_ref.ssm ** 2).sum(), tensors)
    grads = torch.autograd.grad((y * w).sum() + (s.ssm ** 2).sum(), tensors)
    for i, (got, want) in enumerate(zip(grads, grads_ref, strict=True)):
        assert not got.isnan().any(), f"gradient of input {i} has unwritten entries"
        torch.testing.assert_close(got, want, **F64_TOL, msg=f"gradient of input {i}")


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_decoding_steps_equal_the_scan(shape):
    tensors, kwargs = _on_device(*make_inputs(37, *shape))
    batch, L, H, P, N, _, R, S = shape
    y = mamba3_scan(*tensors, **kwargs, backend="ref")
    state = zero_state(batch, H, P, N, R, S, device=torch.device(DEVICE), dtype=torch.float64)
    state = Mamba3State(*(t.double() for t in state))
    steps = []
    with torch.no_grad():
        for t in range(L):
            per_step = [x[:, t] if x.dim() >= 3 and x.shape[1] == L else x for x in tensors]
            kw = {k: (v[:, t] if k == "z" else v) for k, v in kwargs.items()}
            steps.append(mamba3_state_update(state, *per_step, **kw, backend="triton"))
    torch.testing.assert_close(torch.stack(steps, 1), y, **F64_TOL)


def test_triton_step_is_inference_only():
    tensors, kwargs = _on_device(*make_inputs(41, 1, 1, 2, 4, 8, 1, 1, 2))
    per_step = [t[:, 0] for t in tensors[:6]] + tensors[6:8] + [tensors[8][:, 0]]
    per_step[2].requires_grad_()
    state = Mamba3State(*(t.double() for t in zero_state(
        1, 2, 4, 8, 1, 2, device=torch.device(DEVICE), dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="inference only"):
        mamba3_state_update(state, *per_step, D=kwargs["D"], z=kwargs["z"][:, 0],
                            backend="triton")
