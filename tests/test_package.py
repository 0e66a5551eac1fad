"""The package layout holds: kernels resolve and ship, imports flow one way."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hybridlab_kernels

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_BELOW_SEARCH = {"ray", "optuna", "sqlalchemy"}


def test_kernels_package_resolves_from_kernels_folder():
    assert Path(hybridlab_kernels.__file__).resolve().parent == ROOT / "kernels/hybridlab_kernels"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


CORE = ["hybridlab/config.py", "hybridlab/cache.py", "hybridlab/cost.py", "hybridlab/model.py",
        "hybridlab/layers"]


@pytest.mark.parametrize("part", CORE)
def test_model_and_layers_never_import_search_stack(part):
    path = ROOT / part
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    for file in files:
        assert not imported_modules(file) & (FORBIDDEN_BELOW_SEARCH | {"triton"}), file


def test_kernel_references_are_torch_only():
    for naive in sorted((ROOT / "kernels/hybridlab_kernels").rglob("naive.py")):
        allowed = {"torch", "__future__", "math", "hybridlab_kernels"}
        assert imported_modules(naive) <= allowed, naive


@pytest.mark.slow
def test_wheel_ships_all_packages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("hybridlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hybridlab_kernels/__init__.py" in names
    assert "hybridlab_dashboard/__init__.py" in names
    assert "hybridlab/model.py" in names
    assert not any(name.startswith(("tests/", "kernels/", "dashboards/")) for name in names)
