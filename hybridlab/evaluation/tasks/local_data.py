"""lm-eval's ``custom_dataset`` hook for the local tasks: JSONL files named relative to the YAML.

lm-eval 0.4.13 hands ``dataset_kwargs: {data_files: ...}`` to ``datasets.load_dataset`` as they
are, and ``datasets`` resolves relative paths against the working directory, not the YAML file,
so ``dataset_path: json`` with relative ``data_files`` only works when lm-eval runs from this
folder. Each local YAML therefore keeps ``dataset_path: json`` and its ``data_files`` relative to
itself and names this loader as ``custom_dataset``, which lm-eval calls with the task's
``metadata`` and ``dataset_kwargs`` as keyword arguments. Reading the files here also keeps
``datasets`` from writing Arrow copies of them into its cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata: Any) -> datasets.DatasetDict:
    """One split per entry of ``data_files`` (split -> JSONL path relative to this folder)."""
    splits = {}
    for split, name in data_files.items():
        path = HERE / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: local task data missing; regenerate with "
                "python -m hybridlab.evaluation.tasks.generate")
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
