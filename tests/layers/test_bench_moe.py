"""benchmarks/bench_moe.py keeps running, and its baselines compute the routed layer's function."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_moe
        yield bench_moe
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("seed", [0, 1])
def test_baselines_equal_the_routed_layer(bench, seed):
    sizes = bench.Sizes(d_model=24, n_experts=5, top_k=2, tokens=(13,), loop_tokens=13)
    layer = bench.make_layer(sizes, seed)
    x = torch.randn(13, 24, generator=torch.Generator().manual_seed(seed + 10))
    with torch.no_grad():
        want = layer(x)
        torch.testing.assert_close(bench.per_token(layer, x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bench.all_experts(layer, x), want, rtol=1e-5, atol=1e-5)
    mlp = bench.dense_equal_active(sizes, layer, seed)
    active = 3 * 24 * layer.d_hidden * sizes.top_k
    assert sum(p.numel() for p in mlp.parameters()) == active


def test_quick_run_prints_every_cell():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_moe.py"), "--quick",
                          "--threads", "1"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    cells = {(r[0], r[1], r[2]) for r in rows if len(r) == 8 and r[0].isdigit()}
    assert cells == {(t, p, i) for t in ("64", "256") for p in ("fwd", "fwd+bwd")
                     for i in ("routed", "per-token", "all-experts", "dense-mlp")}
    assert "load average after" in out.stdout
