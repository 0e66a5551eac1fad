"""lm-eval's task manager, with the data files a task YAML names read relative to that YAML.

lm-eval hands ``dataset_kwargs`` (``data_files``, ``data_dir``) and ``dataset_path`` to
``datasets.load_dataset`` as written, and ``datasets`` resolves relative paths against the working
directory, so a user's task with ``data_files: data/rows.jsonl`` only ran from the YAML's own
folder. Here every relative local path in a task's config is made absolute against the folder of
the YAML that defines the task, whichever folder the command runs from. Imported only when an
evaluation runs (it imports lm-eval).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory
from lm_eval.tasks._index import Entry

# Hub names ("org/name") and builder names ("json") are never explicitly relative; these are.
_RELATIVE_PREFIXES = ("./", "../")


def _local(name: str, folder: Path) -> str:
    if "://" in name or Path(name).expanduser().is_absolute():
        return name
    return str(folder / name)


def _local_files(value: Any, folder: Path) -> Any:
    """``data_files`` as ``datasets`` takes it: a path, a list of paths, or split -> either."""
    if isinstance(value, str):
        return _local(value, folder)
    if isinstance(value, list):
        return [_local_files(v, folder) for v in value]
    if isinstance(value, dict):
        return {split: _local_files(v, folder) for split, v in value.items()}
    return value


def resolve_data_paths(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The task config with its relative local data paths made absolute against ``folder``."""
    resolved = dict(config)
    path = config.get("dataset_path")
    if isinstance(path, str) and path.startswith(_RELATIVE_PREFIXES):
        resolved["dataset_path"] = str(folder / path)
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        kwargs = dict(kwargs)
        if "data_files" in kwargs:
            kwargs["data_files"] = _local_files(kwargs["data_files"], folder)
        if isinstance(kwargs.get("data_dir"), str):
            kwargs["data_dir"] = _local(kwargs["data_dir"], folder)
        resolved["dataset_kwargs"] = kwargs
    return resolved


class _TaskFactory(TaskFactory):
    def _load_full_config(self, entry: Entry, overrides: dict[str, Any] | None = None
                          ) -> dict[str, Any]:
        config = super()._load_full_config(entry, overrides)
        if entry.yaml_path is None:
            return config
        return resolve_data_paths(config, Path(entry.yaml_path).resolve().parent)


class TaskFileManager(TaskManager):
    """``lm_eval.tasks.TaskManager`` whose tasks read their data relative to their YAML."""

    def __init__(self, *, include_path: list[str], include_defaults: bool) -> None:
        super().__init__(include_path=include_path, include_defaults=include_defaults)
        # lm-eval (<0.5) builds every task and group member's config in
        # TaskFactory._load_full_config, the one place that still knows the task's YAML file.
        self._factory = _TaskFactory(meta=self.metadata)
