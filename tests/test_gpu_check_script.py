"""benchmarks/gpu_check.sh on a host it cannot run on: it says why, runs nothing, exits 2."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(tmp_path: Path, python: str) -> subprocess.CompletedProcess[str]:
    # TMPDIR is where a run would put its logs: it must stay empty when nothing runs.
    env = {**os.environ, "PYTHON": python, "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def assert_refused(done: subprocess.CompletedProcess[str], tmp_path: Path, reason: str) -> None:
    assert done.returncode == 2, done
    assert re.search(reason, done.stderr), done.stderr
    assert "nothing was run" in done.stderr
    assert "====" not in done.stdout, "a step started"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gpu_check.")]


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    # the Python it feeds through heredocs is code too
    for body in re.findall(r"<<'EOF'\n(.*?)\nEOF\n", SCRIPT.read_text(), flags=re.S):
        compile(body, f"{SCRIPT.name} heredoc", "exec")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA: the check would run")
def test_refuses_without_cuda(tmp_path: Path) -> None:
    done = run_script(tmp_path, sys.executable)
    assert_refused(done, tmp_path, r"no CUDA device: torch \S+ in .*is_available\(\) False")


def test_refuses_a_python_without_torch(tmp_path: Path) -> None:
    done = run_script(tmp_path, str(tmp_path / "no-such-python"))
    assert_refused(done, tmp_path, "cannot import torch")


def test_refuses_when_packages_are_missing(tmp_path: Path) -> None:
    # A stand-in interpreter that reports a CUDA device, then two missing packages.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$2" in\n  *is_available*) echo "1 9.9";;\n'
                    '  *) echo "triton hybridlab_kernels";;\nesac\n')
    fake.chmod(0o755)
    done = run_script(tmp_path, str(fake))
    assert_refused(done, tmp_path, r"lacks: triton hybridlab_kernels \(install with")
