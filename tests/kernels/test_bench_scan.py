"""benchmarks/bench_scan.py keeps running, and its paper-style baseline computes the SSD."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from hybridlab_kernels.ssd.naive import ssd_ref

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_baseline() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ssd_minimal", BENCHMARKS / "ssd_minimal.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("initial_state", [False, True])
def test_paper_minimal_ssd_matches_reference(initial_state: bool) -> None:
    g = torch.Generator().manual_seed(0)
    batch, L, H, P, G, N = 2, 24, 4, 3, 2, 5

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    kwargs = {
        "x": randn(batch, L, H, P),
        "dt": randn(batch, L, H),
        "A": -torch.rand(H, generator=g, dtype=torch.float64) * 4,
        "B": randn(batch, L, G, N),
        "C": randn(batch, L, G, N),
        "D": randn(H),
        "dt_bias": randn(H),
        "dt_softplus": True,
        "initial_state": randn(batch, H, P, N) if initial_state else None,
        "return_final_state": True,
    }
    y, state = load_baseline().ssd_paper(**kwargs, chunk_size=8)
    y_ref, state_ref = ssd_ref(**kwargs)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state, state_ref, rtol=1e-9, atol=1e-9)


def test_quick_run_prints_every_case_and_the_acceptance_lines() -> None:
    # one torch thread: two threads on a shared 2-core machine slow tiny ops down erratically
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_scan.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    ops = ("mamba1", "mamba2", "mamba3", "attention")
    cells = {(r[0], r[1]) for r in rows if len(r) > 2 and r[0] in ops}
    assert cells == {(op, L) for op in ops for L in ("32", "64")}
    for needle in ("paper minimal SSD", "selective_scan_ref", "mamba3_ref", "GFLOP/s",
                   "Acceptance", "4. mamba2", "5. mamba3", "7. mamba3 vs mamba2"):
        assert needle in out.stdout
