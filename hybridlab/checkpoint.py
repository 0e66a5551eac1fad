"""Training checkpoints that are either whole and verified, or never loaded.

A checkpoint is a folder ``step_00000123/`` with ``model.safetensors`` (weights),
``train_state.pt`` (optimizer, data-RNG state, counters; tensors and plain containers only, read
with ``weights_only=True``), ``meta.json`` (the step and the sha256 of each file) and, written last,
a ``COMPLETE`` marker holding the sha256 of ``meta.json``. It is assembled in a temporary folder and
renamed into place, so a crash mid-write leaves a folder without a marker, which is ignored; a
folder with a marker whose hashes don't match is corrupted and refused. Resuming
(``load_latest_checkpoint``) sets a newest checkpoint that fails verification aside as
``<name>.corrupt-<n>``, kept for inspection and never picked again, and falls back to the one
before it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from hybridlab.errors import HybridlabError
from hybridlab.files import sha256_file

MARKER = "COMPLETE"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
PREFIX = "step_"
# Only exact names: a folder set aside as ``step_00000300.corrupt-1`` must never match.
_NAME = re.compile(rf"{PREFIX}(\d+)")


class CheckpointError(HybridlabError, RuntimeError):
    """A checkpoint exists but cannot be trusted; says which one and why."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model: nn.Module,
    train_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint for ``step`` atomically; keep the newest ``keep`` complete ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(train_state, tmp / STATE_FILE)
    files = {name: sha256_file(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
    (tmp / META_FILE).write_text(json.dumps({"step": step, "files": files}, indent=2))
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        _fsync(tmp / name)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    marker = final / MARKER
    marker_tmp = final / f".{MARKER}.tmp"
    marker_tmp.write_text(sha256_file(final / META_FILE))
    _fsync(marker_tmp)
    marker_tmp.rename(marker)
    _prune(directory, keep)
    return final


def _checkpoints(directory: Path) -> list[Path]:
    """Every checkpoint folder, finished or not, oldest first."""
    found = [(int(m[1]), p) for p in directory.iterdir()
             if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _complete(directory: Path) -> list[Path]:
    return [p for p in _checkpoints(directory) if (p / MARKER).is_file()]


def _prune(directory: Path, keep: int) -> None:
    for old in _complete(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for partial in _checkpoints(directory):
        if not (partial / MARKER).exists():
            shutil.rmtree(partial, ignore_errors=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint with a completion marker, or None; partial folders are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    complete = _complete(directory)
    return complete[-1] if complete else None


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check marker and hashes; return meta.json's contents or raise CheckpointError."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(path, f"no {MARKER} marker, the checkpoint was never finished")
    meta_path = path / META_FILE
    if not meta_path.is_file() or sha256_file(meta_path) != marker.read_text().strip():
        raise CheckpointError(path, f"{META_FILE} is missing or does not match the marker")
    meta = json.loads(meta_path.read_text())
    for name, expected in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(path, f"{name} is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise CheckpointError(
                path, f"{name} is corrupted (sha256 {actual[:12]}..., expected {expected[:12]}...)"
            )
    return meta


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Verify, load the weights into ``model`` and return the train state."""
    path = Path(path)
    verify_checkpoint(path)
    return _load_verified(path, model)


def _load_verified(path: Path, model: nn.Module) -> dict[str, Any]:
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            path, f"weights do not fit this model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    # CPU: the data generator's state must stay a CPU tensor; the optimizer moves its own state.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that failed verification to ``<name>.corrupt-<n>``, the first n free."""
    n = 1
    while (target := path.with_name(f"{path.name}.corrupt-{n}")).exists():
        n += 1
    path.rename(target)
    return target


def load_latest_checkpoint(
    directory: str | Path, model: nn.Module
) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """Load the newest checkpoint that verifies: (its path, train state, notes) or (None, None,
    notes) when none does.

    Every newer checkpoint that fails verification, unfinished ones included, is set aside and
    gets one note naming it, why it failed and what the run resumed from, for the caller to
    record. Weights that do not fit ``model`` are not corruption: that CheckpointError is raised.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None, None, []
    failed: list[str] = []
    for path in reversed(_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            aside = set_aside(path)
            failed.append(f"checkpoint {path.name} failed verification ({err.reason}), set aside "
                          f"as {aside.name}")
            continue
        return path, _load_verified(path, model), [f"{n}; resumed from {path.name}" for n in failed]
    return None, None, [f"{n}; started fresh" for n in failed]
