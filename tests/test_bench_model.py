"""benchmarks/bench_model.py keeps running and prints every stack, case and target line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quick_run_prints_every_stack_and_the_targets() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_model.py"), "--quick", "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr
    row = re.compile(r"^(train L=\d+|decode b=\d+)\s+(transformer|mamba\d hybrid)\s+(\d+)\s")
    cells = {m.group(1, 2): int(m.group(3)) for m in map(row.match, out.stdout.splitlines()) if m}
    stacks = ("transformer", "mamba2 hybrid", "mamba1 hybrid", "mamba3 hybrid")
    cases = ("train L=64", "train L=128", "decode b=2")
    assert set(cells) == {(c, s) for c in cases for s in stacks}
    assert all(tokens_per_s > 0 for tokens_per_s in cells.values())
    for needle in ("Targets (issue 14)", "mamba2 hybrid L=64", "mamba1 hybrid L=64", "GFLOP/s"):
        assert needle in out.stdout
