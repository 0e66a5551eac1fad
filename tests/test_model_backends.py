"""The whole model through every scan backend: same logits and gradients, decoding still matches.

Each backend is checked against something other than itself: torch (chunked) and triton against
the sequential reference, and the reference's gradients against finite differences of its own
forward pass, in float64.
"""

import importlib

import pytest
import torch
from torch.func import functional_call

from hybridlab.config import ArchConfig, AttentionSpec, Mamba1Spec, Mamba2Spec
from hybridlab.model import HybridLM

BACKENDS = ["ref", "torch", "triton"]

# The function each backend runs, by (module, name); the model must reach exactly these.
IMPLEMENTATIONS = {
    "ref": [("hybridlab_kernels.selective_scan", "selective_scan_ref"),
            ("hybridlab_kernels.ssd", "ssd_ref")],
    "torch": [("hybridlab_kernels.selective_scan", "selective_scan_chunked"),
              ("hybridlab_kernels.ssd", "ssd_chunked")],
    "triton": [("hybridlab_kernels.selective_scan.triton_scan", "selective_scan_triton"),
               ("hybridlab_kernels.ssd.triton_ssd", "ssd_triton")],
}


def build(seed: int) -> HybridLM:
    config = ArchConfig.from_pattern(
        "m*-M", d_model=32, vocab_size=40, mamba1=Mamba1Spec(d_state=4),
        mamba2=Mamba2Spec(d_state=8, headdim=16, chunk_size=8),
        attention=AttentionSpec(n_heads=2, n_kv_heads=1),
    )
    return HybridLM(config, seed=seed).eval()


def use_backend(name: str, monkeypatch) -> None:
    if name == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", name)


def spy_on_kernels(monkeypatch, backends: list[str]) -> list[str]:
    """Wrap the implementations of ``backends``; the returned list fills with the names run."""
    calls: list[str] = []
    for backend in backends:
        for module_name, attr in IMPLEMENTATIONS[backend]:
            module = importlib.import_module(module_name)
            original = getattr(module, attr)

            def wrapped(*args, _original=original, _name=attr, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, attr, wrapped)
    return calls


def ran_only(calls: list[str], backend: str) -> bool:
    return set(calls) == {attr for _, attr in IMPLEMENTATIONS[backend]}


def gradients(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model = build(seed=3)
    model(ids).float().pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    use_backend(request.param, monkeypatch)
    return request.param


@pytest.mark.parametrize("seqlen", [5, 11])
def test_every_backend_matches_the_reference_and_decodes(backend, seqlen, monkeypatch):
    model = build(seed=seqlen)
    ids = torch.randint(40, (2, seqlen), generator=torch.Generator().manual_seed(seqlen))
    calls = spy_on_kernels(monkeypatch, [b for b in BACKENDS if b != "triton" or
                                         backend == "triton"])
    with torch.no_grad():
        logits = model(ids)
        assert ran_only(calls, backend), calls
        cache = model.allocate_cache(2, seqlen)
        stepped = torch.cat([model(ids[:, :3], cache=cache), model(ids[:, 3:], cache=cache)], 1)
        monkeypatch.setenv("HYBRIDLAB_KERNELS", "ref")
        reference = model(ids)
    # fp32 everywhere; paths differ only in summation order.
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepped, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("seqlen", [9, 17])
def test_training_gradients_agree_with_the_reference(name, seqlen, monkeypatch):
    use_backend(name, monkeypatch)
    ids = torch.randint(40, (2, seqlen), generator=torch.Generator().manual_seed(seqlen))
    calls = spy_on_kernels(monkeypatch, ["ref", name])
    grads = gradients(ids)
    assert ran_only(calls, name), calls
    calls.clear()
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "ref")
    reference = gradients(ids)
    assert ran_only(calls, "ref"), calls
    for key, grad in grads.items():
        torch.testing.assert_close(grad, reference[key], rtol=1e-3, atol=1e-5, msg=key)


def test_reference_gradients_match_finite_differences(monkeypatch):
    """Autograd through the reference vs central differences of the loss along random directions.

    One unit direction per parameter tensor, so a wrong gradient is traced to its parameter. The
    model runs in float64 except for a few deliberate float32 casts (rotary, A_log), whose
    rounding limits how small the step can be; at 1e-2 the measured error is ~50x below the bound.
    """
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "ref")
    model = build(seed=5).double()
    ids = torch.randint(40, (2, 11), generator=torch.Generator().manual_seed(7))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, values, (ids,)).pow(2).mean()

    calls = spy_on_kernels(monkeypatch, ["ref", "torch"])
    at = loss(dict(model.named_parameters()))
    at.backward()
    # The float32 casts round the loss by about its size times float32's epsilon; divided by the
    # step, that is the floor of what central differences resolve (it dominates for A_log, whose
    # gradient is small next to a loss of order one).
    floor = torch.finfo(torch.float32).eps * abs(float(at)) / 1e-2
    assert ran_only(calls, "ref"), calls
    grads = {n: p.grad for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(11)
    eps = 1e-2
    for name, value in params.items():
        direction = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        direction /= direction.norm()
        with torch.no_grad():
            up = loss({**params, name: value + eps * direction})
            down = loss({**params, name: value - eps * direction})
        numeric = float((up - down) / (2 * eps))
        analytic = float((grads[name] * direction).sum())
        bound = 1e-3 * float(grads[name].norm()) + floor + 1e-9
        assert abs(analytic - numeric) <= bound, (name, analytic, numeric)
