"""Training checkpoints that are either whole and verified, or never loaded.

A checkpoint is a folder ``step_00000123/`` with ``model.safetensors`` (weights),
``train_state.pt`` (optimizer, data-RNG state, counters; tensors and plain containers only, read
with ``weights_only=True``), ``meta.json`` (the step and the sha256 of each file) and, written last,
a ``COMPLETE`` marker holding the sha256 of ``meta.json``. It is assembled in a temporary folder and
renamed into place, so a crash mid-write leaves a folder without a marker, which is ignored; a
folder with a marker whose hashes don't match is corrupted and refused.
"""

from __future__ import annotations

import json
import os
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


class CheckpointError(HybridlabError, RuntimeError):
    """A checkpoint exists but cannot be trusted; says which one and why."""




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


def _complete(directory: Path) -> list[Path]:
    found = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def _prune(directory: Path, keep: int) -> None:
    for old in _complete(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for partial in directory.glob(f"{PREFIX}*"):
        if partial.is_dir() and not (partial / MARKER).exists():
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
        raise CheckpointError(f"{path}: no {MARKER} marker, the checkpoint was never finished")
    meta_path = path / META_FILE
    if not meta_path.is_file() or sha256_file(meta_path) != marker.read_text().strip():
        raise CheckpointError(f"{path}: {META_FILE} is missing or does not match the marker")
    meta = json.loads(meta_path.read_text())
    for name, expected in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise CheckpointError(
                f"{path}: {name} is corrupted (sha256 {actual[:12]}..., expected "
                f"{expected[:12]}...); delete this checkpoint to resume from an earlier one"
            )
    return meta


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Verify, load the weights into ``model`` and return the train state."""
    path = Path(path)
    verify_checkpoint(path)
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit this model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    # CPU: the data generator's state must stay a CPU tensor; the optimizer moves its own state.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
