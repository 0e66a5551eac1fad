"""A small HybridLM trained in bf16 on CUDA: the path every GPU trial takes.

Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import importlib
import math
import statistics

import pytest
import torch

from hybridlab.config import ArchConfig, AttentionSpec, Mamba1Spec, Mamba2Spec
from hybridlab.data.tasks import make_task
from hybridlab.model import HybridLM
from hybridlab.train import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
pytest.importorskip("triton")

from hybridlab_kernels.ssd import triton_ssd  # noqa: E402 (after the skip: it needs triton)

# `hybridlab_kernels.selective_scan` is the function; its folder is reached as a module here
triton_scan = importlib.import_module("hybridlab_kernels.selective_scan.triton_scan")

# Every layer type once; Mamba-2 chunks of 32 over sequences of 64.
CONFIG = ArchConfig.from_pattern(
    "mM*-", d_model=64, vocab_size=64, mamba1=Mamba1Spec(d_state=16),
    mamba2=Mamba2Spec(d_state=32, headdim=32, chunk_size=32), attention=AttentionSpec(n_heads=4),
)
TASK = {"vocab_size": 64, "seq_len": 64, "num_kv_pairs": 4, "n_test": 256}
STEPS = 20
TRAIN = {"steps": STEPS, "batch_size": 32, "lr": 3e-3, "warmup_steps": 2, "eval_every": STEPS,
         "eval_batch_size": 128, "log_every": 1, "seed": 0}
SSM_PARAMETERS = ("A_log", ".D", "dt_bias", "dt_proj.bias")

# MQAR answers are values, half the vocabulary: learning only that takes ln 2 = 0.69 nats off
# the loss (on CPU the last five steps average 3.60 against 4.12 for the first five).
MIN_LOSS_DROP = 0.2
# The same run in fp32 on the CPU: bf16 autocast on the CPU stayed within 6.4e-4 of it at every
# step of these 20; 2e-2 allows CUDA's other bf16 kernels, while a wrong gradient in a scan or
# attention kernel sends the run elsewhere.
CURVE_TOL = 2e-2


def train_losses(device: str, precision: str) -> tuple[HybridLM, list[float]]:
    model = HybridLM(CONFIG, seed=0)
    task = make_task("mqar", seed=0, **TASK)
    result = train(model, task, TrainConfig(**TRAIN, device=device, precision=precision))
    assert (result.status, result.steps) == ("completed", STEPS), result.reason
    return model, [c["value"] for c in result.curve if c["split"] == "train"]


def test_bf16_training_step_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDLAB_KERNELS", raising=False)
    seen: list[tuple[str, torch.dtype, set[torch.dtype]]] = []  # (kernel, activations, params)

    def record(module: object, name: str, positional: tuple[str, ...], parameters: set[str]):
        """Log (op, activation dtype, SSM parameter dtypes) of each call; the public ops pass
        the leading tensors positionally."""
        real = getattr(module, name)

        def recorded(*args: object, **kwargs: object) -> object:
            given = {**dict(zip(positional, args, strict=False)), **kwargs}
            dtypes = {given[p].dtype for p in parameters if given.get(p) is not None}
            seen.append((name, given[positional[0]].dtype, dtypes))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)

    record(triton_scan, "selective_scan_triton", ("u", "delta", "A", "B", "C", "D", "z"),
           {"A", "D", "delta_bias"})
    record(triton_ssd, "ssd_triton", ("x", "dt", "A", "B", "C"), {"A", "D", "dt_bias"})

    model, losses = train_losses("cuda", "bf16")
    assert model.device.type == "cuda"
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last <= first - MIN_LOSS_DROP, losses

    # Both scans ran the compiled Triton kernels on bf16 activations with fp32 SSM parameters.
    assert {kernel for kernel, _, _ in seen} == {"selective_scan_triton", "ssd_triton"}
    assert {activations for _, activations, _ in seen} == {torch.bfloat16}, seen
    assert set().union(*(params for _, _, params in seen)) == {torch.float32}, seen
    for name, param in model.named_parameters():
        if name.endswith(SSM_PARAMETERS):
            assert param.dtype == torch.float32, name
            assert param.grad is not None and param.grad.dtype == torch.float32, name

    _, reference = train_losses("cpu", "fp32")
    gaps = [abs(a - b) for a, b in zip(losses, reference, strict=True)]
    assert max(gaps) <= CURVE_TOL, list(zip(losses, reference, strict=True))
