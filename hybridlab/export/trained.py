"""Export what ``hybridlab train`` wrote: its folder (``arch.yaml``, ``run.json``, ``step_*/``
checkpoints) or one checkpoint inside it.

The newest complete checkpoint is taken unless one is named; its hashes are verified before
anything is written. ``run.json`` says which task trained it, so the export carries that task's
tokenizer and its trained sequence length.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_model

from hybridlab.checkpoint import MODEL_FILE, CheckpointError, latest_checkpoint, verify_checkpoint
from hybridlab.config import ArchConfig, ConfigError
from hybridlab.data.tokenizer import tokenizer_of
from hybridlab.export.card import Provenance
from hybridlab.export.common import ExportError
from hybridlab.export.writer import ARCH_FILE, ExportResult, export_model
from hybridlab.files import sha256_file
from hybridlab.model import HybridLM

RUN_FILE = "run.json"


def _locate(path: Path) -> tuple[Path, Path]:
    """(the training folder, the checkpoint to export) for a training folder or a checkpoint."""
    if (path / MODEL_FILE).is_file():
        return path.parent, path
    newest = latest_checkpoint(path)
    if newest is None:
        raise ExportError(f"--checkpoint {path}: no complete checkpoint (step_*/ with a "
                          "COMPLETE marker); pass the folder `hybridlab train` wrote, or one "
                          "of its step_* folders")
    return path, newest


def export_checkpoint(path: str | Path, *, fmt: str, out: str | Path,
                      lossy: bool = False) -> ExportResult:
    """Export the model of a ``hybridlab train`` folder (or one of its checkpoints) in ``fmt``."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"--checkpoint {path}: not a folder")
    folder, checkpoint = _locate(path)
    if not (folder / ARCH_FILE).is_file():
        raise ExportError(f"--checkpoint {path}: no {ARCH_FILE} in {folder} (`hybridlab train` "
                          "writes it beside its checkpoints)")
    try:
        arch = ArchConfig.load(folder / ARCH_FILE)
        meta = verify_checkpoint(checkpoint)
    except (CheckpointError, ConfigError) as err:
        raise ExportError(f"--checkpoint {path}: {err}") from None
    run = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else {}
    notes = [] if run else [f"no {RUN_FILE} beside the checkpoints: the training task, its "
                            "tokenizer and sequence length are unknown"]
    tokenizer, note = tokenizer_of(run.get("task_fingerprint"),
                                   (run.get("task_options") or {}).get("tokenizer"))
    if run and note is not None:
        notes.append(note)
    model = HybridLM(arch)
    missing, unexpected = load_model(model, str(checkpoint / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise ExportError(f"--checkpoint {checkpoint}: the weights do not fit {ARCH_FILE} "
                          f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    provenance = Provenance(
        task=run.get("task"), task_fingerprint=run.get("task_fingerprint"),
        corpus_hash=(run.get("task_fingerprint") or {}).get("corpus_hash"),
        code_version=run.get("code_version"), checkpoint=str(checkpoint),
        checkpoint_sha256=sha256_file(checkpoint / MODEL_FILE), checkpoint_step=meta.get("step"),
    )
    return export_model(model.eval(), fmt, out, lossy=lossy, provenance=provenance,
                        tokenizer=tokenizer, notes=notes)

