"""Backend dispatch: argument, then $HYBRIDLAB_KERNELS, then the default; loud on bad names."""

from __future__ import annotations

import importlib
import logging
import typing
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

import hybridlab_kernels
from hybridlab_kernels import KernelBackend, kernel_backend
from hybridlab_kernels import dispatch as dispatch_module

# `hybridlab_kernels.selective_scan` is the function; the op folders are reached as modules here
selective_scan_module = importlib.import_module("hybridlab_kernels.selective_scan")
ssd_module = importlib.import_module("hybridlab_kernels.ssd")

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDLAB_KERNELS", raising=False)
    monkeypatch.setattr(dispatch_module, "_logged", set())


def scan_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 2, 3, 5, generator=g)
    A = -torch.rand(3, 4, generator=g) - 0.5
    B, C = torch.randn(2, 2, 4, 5, generator=g)
    return u, delta, A, B, C


def ssd_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 2, 3, generator=g)
    dt = torch.rand(2, 5, 2, generator=g)
    A = -torch.rand(2, generator=g) - 0.5
    B, C = torch.randn(2, 2, 5, 1, 4, generator=g)
    return x, dt, A, B, C


def test_public_api() -> None:
    assert set(hybridlab_kernels.__all__) == {
        "KernelBackend",
        "Mamba3State",
        "kernel_backend",
        "mamba3_scan",
        "mamba3_state_update",
        "selective_scan",
        "selective_state_update",
        "ssd",
        "ssd_state_update",
    }
    assert typing.get_args(KernelBackend) == ("ref", "torch", "triton")


def test_default_is_torch() -> None:
    assert kernel_backend(CPU) == "torch"


def test_env_var_selects_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDLAB_KERNELS", " REF ")
    assert kernel_backend(CPU) == "ref"
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "")
    assert kernel_backend(CPU) == "torch"


def test_argument_beats_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "ref")
    assert kernel_backend(CPU, "torch") == "torch"
    assert kernel_backend("cpu", "ref") == "ref"


def test_bad_env_value_names_variable_and_allowed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"HYBRIDLAB_KERNELS='cuda'.*ref, torch, triton"):
        kernel_backend(CPU)


def test_bad_argument_names_argument_and_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"backend='fast'.*ref, torch, triton"):
        hybridlab_kernels.selective_scan(*scan_inputs(), backend="fast")


@pytest.mark.parametrize("via_env", [True, False])
def test_triton_on_cpu_needs_the_interpreter(
    monkeypatch: pytest.MonkeyPatch, via_env: bool
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if via_env:
        monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="only runs under TRITON_INTERPRET=1"):
        hybridlab_kernels.ssd(*ssd_inputs(), backend=None if via_env else "triton")


def test_triton_without_the_package_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        kernel_backend(torch.device("cuda"), "triton")


def test_default_on_cuda_is_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_backend(torch.device("cuda")) == "triton"


class Spy:
    """Wraps an implementation and counts calls."""

    def __init__(self, fn: Callable[..., typing.Any]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize(
    ("module", "op", "ref", "fast", "inputs"),
    [
        (
            selective_scan_module,
            "selective_scan",
            "selective_scan_ref",
            "selective_scan_chunked",
            scan_inputs,
        ),
        (ssd_module, "ssd", "ssd_ref", "ssd_chunked", ssd_inputs),
    ],
    ids=["selective_scan", "ssd"],
)
def test_backend_routes_to_implementation(
    monkeypatch: pytest.MonkeyPatch,
    module: ModuleType,
    op: str,
    ref: str,
    fast: str,
    inputs: Callable[[], tuple[torch.Tensor, ...]],
) -> None:
    ref_spy, fast_spy = Spy(getattr(module, ref)), Spy(getattr(module, fast))
    monkeypatch.setattr(module, ref, ref_spy)
    monkeypatch.setattr(module, fast, fast_spy)
    public = getattr(hybridlab_kernels, op)

    y_ref = public(*inputs(), backend="ref")
    assert (ref_spy.calls, fast_spy.calls) == (1, 0)
    y_fast = public(*inputs())
    assert (ref_spy.calls, fast_spy.calls) == (1, 1)
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "ref")
    public(*inputs())
    assert (ref_spy.calls, fast_spy.calls) == (2, 1)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)


def test_choice_is_logged_once_per_op_device_and_backend(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hybridlab.kernels")
    for _ in range(3):
        hybridlab_kernels.selective_scan(*scan_inputs())
    hybridlab_kernels.selective_scan(*scan_inputs(), backend="ref")
    hybridlab_kernels.ssd(*ssd_inputs())
    messages = [r.getMessage() for r in caplog.records if r.name == "hybridlab.kernels"]
    assert messages == [
        "selective_scan on cpu uses the 'torch' kernel backend (default on cpu)",
        "selective_scan on cpu uses the 'ref' kernel backend (backend= argument)",
        "ssd on cpu uses the 'torch' kernel backend (default on cpu)",
    ]
