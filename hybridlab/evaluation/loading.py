"""Find the model to evaluate: a checkpoint folder, or the checkpoint a study trial recorded.

A checkpoint folder is a ``step_*`` folder (``model.safetensors`` inside) or the run folder that
holds them (its newest complete step is used); the architecture is ``arch.yaml`` in either, as
``hybridlab train`` writes it, or given explicitly. A study trial's architecture is its
``Candidate.arch`` and its weights the newest ``checkpoint:<task>`` artifact (for a trial that
reused another's genome, that trial's artifact), checked against the recorded sha256.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridlab.checkpoint import MODEL_FILE, latest_checkpoint, load_checkpoint
from hybridlab.config import ArchConfig
from hybridlab.errors import HybridlabError
from hybridlab.model import HybridLM
from hybridlab.store import (
    StorageError,
    load_study,
    open_engine,
    require_database,
    trial_weights,
)
from hybridlab.store import top_trials as store_top_trials

log = logging.getLogger(__name__)

ARCH_FILES = ("arch.yaml", "arch.json")


class EvalError(HybridlabError, ValueError):
    """An evaluation cannot be run as asked; the message says what was wrong."""


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where a model's architecture and weights come from, and what it was trained on."""

    arch: ArchConfig
    checkpoint: Path  # a step folder holding model.safetensors
    study: str | None = None
    trial: int | None = None
    storage_url: str | None = None
    task: str | None = None
    task_fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def seq_len(self) -> int | None:
        """The training window length, when the trial recorded it."""
        value = self.task_fingerprint.get("seq_len")
        return value if isinstance(value, int) else None

    def describe(self) -> str:
        where = f"trial {self.trial} of study {self.study!r}" if self.study else "checkpoint"
        return f"{where}: {self.arch.pattern} ({self.arch.canonical_hash()}) from {self.checkpoint}"


def _step_folder(path: Path) -> Path:
    if (path / MODEL_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise EvalError(f"checkpoint {path}: neither a checkpoint folder ({MODEL_FILE} inside) "
                        "nor a folder of complete step_* checkpoints")
    return found


def resolve_checkpoint(path: str | Path, *, arch: ArchConfig | str | Path | None = None
                       ) -> ModelSource:
    """A checkpoint folder (or run folder) and its architecture (default: arch.yaml beside it)."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"checkpoint {path}: no such folder")
    step = _step_folder(path)
    if isinstance(arch, ArchConfig):
        config = arch
    elif arch is not None:
        config = ArchConfig.load(arch)
    else:
        candidates = [folder / name for folder in (step, step.parent) for name in ARCH_FILES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise EvalError(f"checkpoint {step}: no {' or '.join(ARCH_FILES)} in {step} or "
                            f"{step.parent}; pass the architecture file (--arch / arch=FILE)")
        config = ArchConfig.load(found)
    return ModelSource(arch=config, checkpoint=step)


def resolve_trial(storage_url: str, study: str, trial: int) -> ModelSource:
    """The architecture and verified checkpoint of one trial of a study."""
    try:
        require_database(storage_url)
        with open_engine(storage_url) as engine:
            weights = trial_weights(engine, study, trial)
            checkpoints = weights.checkpoints
            if len(checkpoints) > 1:
                raise EvalError(f"trial {trial} of study {study!r} has checkpoints for several "
                                f"tasks ({', '.join(sorted(checkpoints))}); lm-eval needs a "
                                "single language model, trained on a corpus")
            artifact = weights.checkpoint()
    except StorageError as err:
        raise EvalError(str(err)) from None
    row = weights.candidate
    arch = ArchConfig.from_dict(row.arch, source=f"trial {trial} of study {study!r} "
                                "(hl_candidate.arch)")
    return ModelSource(arch=arch, checkpoint=Path(artifact.path), study=study, trial=trial,
                       storage_url=storage_url, task=row.task,
                       task_fingerprint=dict(row.task_fingerprint or {}))


def top_trials(storage_url: str, study: str, k: int) -> list[int]:
    """The ``k`` best complete trials: by value, or the Pareto front by the first objective."""
    if k < 1:
        raise EvalError(f"--top must be at least 1, got {k}")
    try:
        require_database(storage_url)
        ranked = store_top_trials(load_study(study, storage_url), k)
    except StorageError as err:
        raise EvalError(str(err)) from None
    if not ranked:
        raise EvalError(f"study {study!r} has no complete trials yet")
    return [t.number for t in ranked]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device asked for, CUDA by default where there is one; never a silent fallback."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise EvalError(f"device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device {device!r}: CUDA is not available here; use device cpu")
    return resolved


def load_model(source: ModelSource, *, device: str | torch.device | None = None) -> HybridLM:
    """Build the architecture, load and verify the weights, move to ``device``, eval mode."""
    target = resolve_device(device)
    model = HybridLM(source.arch)
    load_checkpoint(source.checkpoint, model)
    log.info("loaded %s", source.describe())
    return model.to(target).eval()
