"""Fail fast when a hub task's dataset can be neither found in the cache nor downloaded.

Offline, lm-eval's hub tasks (lambada_openai, hellaswag, piqa, arc_easy, ...) reach
``datasets.load_dataset``, which either fails at once (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set)
or retries the Hub for about 20 seconds, and both only after lm-eval has indexed its ~14,000 task
files. ``check_hub_tasks`` decides beforehand, in about a second and without importing
lm-eval or ``datasets``: it reads the task's YAML for its dataset, looks for that dataset in the
``datasets`` cache, and when it is missing refuses with a message naming the task, unless the
Hub is reachable and downloading allowed. A name that no task file mentions is refused as unknown;
groups and tags of hub tasks are left to lm-eval.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from hybridlab.evaluation.loading import EvalError
from hybridlab.evaluation.tasks import TASKS_DIR

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_NAME_LINE = re.compile(r"^(?:task|group):\s*['\"]?([\w.\-]+)['\"]?\s*$", re.MULTILINE)


class HubDatasetUnavailable(EvalError):
    """A hub task's dataset is not cached and cannot be downloaded now."""


def local_task_names(folders: Sequence[Path] = (TASKS_DIR,)) -> set[str]:
    """Task and group names defined by the YAML files of local task folders."""
    names: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.yaml"):
            names.update(_NAME_LINE.findall(path.read_text(encoding="utf-8")))
    return names


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML without importing what ``!function`` tags name."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML with its ``include`` files merged under it, as lm-eval merges them."""
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader) or {}
    includes = data.pop("include", None) or []
    merged: dict[str, Any] = {}
    for include in [includes] if isinstance(includes, str) else includes:
        merged.update(_read_task_yaml(path.parent / include))
    return merged | data


def require_lm_eval() -> Path:
    """lm-eval's package folder, found without importing it; an error when not installed."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError("lm-eval is not installed: pip install 'hybridlab[eval]'")
    return Path(next(iter(spec.submodule_search_locations)))


def scan_lm_eval_tasks(tasks: Iterable[str], tasks_dir: Path | None = None
                       ) -> tuple[dict[str, tuple[str, str | None]], set[str]]:
    """task -> (dataset_path, dataset_name) for the names lm-eval defines as a ``task:``, and
    the names that no lm-eval task file mentions at all (so lm-eval cannot know them)."""
    wanted = set(tasks)
    found: dict[str, tuple[str, str | None]] = {}
    mentioned: set[str] = set()
    for path in (tasks_dir or require_lm_eval() / "tasks").rglob("*.yaml"):
        if len(found) == len(wanted):
            break
        raw = path.read_bytes()
        here = {name for name in wanted if name.encode() in raw}
        if not here:
            continue
        mentioned |= here
        names = [n for n in _NAME_LINE.findall(raw.decode("utf-8", errors="replace"))
                 if n in here and n not in found]
        if not names:
            continue
        try:
            config = _read_task_yaml(path)
        except (OSError, yaml.YAMLError):
            # A file this reader cannot follow is left to lm-eval, which reports it properly.
            continue
        if config.get("dataset_path"):
            for name in names:
                found[name] = (str(config["dataset_path"]), config.get("dataset_name"))
    return found, wanted - mentioned


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.upper() in _TRUE


def offline_mode() -> bool:
    """``datasets``' rule: HF_DATASETS_OFFLINE when set, else HF_HUB_OFFLINE."""
    flag = _env_flag("HF_DATASETS_OFFLINE")
    if flag is not None:
        return flag
    return bool(_env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"))


def _hf_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return Path(os.path.expanduser(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))))


def datasets_cache() -> Path:
    return Path(os.path.expanduser(os.environ.get("HF_DATASETS_CACHE",
                                                  str(_hf_home() / "datasets"))))


def hub_cache() -> Path:
    default = os.environ.get("HUGGINGFACE_HUB_CACHE", str(_hf_home() / "hub"))
    return Path(os.path.expanduser(os.environ.get("HF_HUB_CACHE", default)))


def _snake(name: str) -> str:
    """``datasets.naming.camelcase_to_snakecase``: how the cache folder spells a dataset."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def is_cached(path: str, name: str | None) -> bool:
    """Whether ``datasets`` has the dataset prepared, or the Hub cache holds its files."""
    *namespace, dataset = path.split("/")
    prepared = datasets_cache() / "___".join([*namespace, _snake(dataset)])
    if any(prepared.glob(f"{name or '*'}/*/*/dataset_info.json")):
        return True
    return any((hub_cache() / f"datasets--{path.replace('/', '--')}").glob("snapshots/*"))


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached, or None when a TCP connection to it opens.

    Behind a proxy the proxy decides, so that case is left to ``datasets``. The probe runs in a
    thread so that a slow DNS lookup cannot hold the caller past ``timeout``.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {timeout:.0f} s"


def check_hub_tasks(tasks: Sequence[str], folders: Sequence[Path] = (TASKS_DIR,)) -> list[str]:
    """Raise for an unknown task or a hub task that cannot run here; returns the hub tasks.

    Tasks defined in ``folders`` (the local tasks and any include path) and task files are local.
    """
    local = local_task_names(folders)
    hub = [t for t in tasks if t not in local and not Path(t).is_file()]
    if not hub:
        return []
    datasets, unmentioned = scan_lm_eval_tasks(hub)
    unknown = [t for t in hub if t in unmentioned]
    if unknown:
        raise EvalError(f"unknown task {', '.join(map(repr, unknown))}: neither a local task "
                        f"({', '.join(sorted(local))}) nor in lm-eval's task files "
                        "(lm-eval ls tasks lists them)")
    missing = {task: ds for task, ds in datasets.items() if not is_cached(*ds)}
    if not missing:
        return hub
    task, (path, name) = next(iter(missing.items()))
    dataset = path if name is None else f"{path} ({name})"
    others = f" (also not cached: {', '.join(list(missing)[1:])})" if len(missing) > 1 else ""
    if offline_mode():
        why = "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)"
    else:
        why = hub_unreachable()
        if why is None:
            return hub
        why = f"the Hugging Face Hub cannot be reached ({why})"
    raise HubDatasetUnavailable(
        f"task {task!r} needs the Hugging Face dataset {dataset}, which is not cached under "
        f"{datasets_cache()}, and {why}{others}; run it once where the network allows to fill "
        f"the cache, or use the local tasks ({', '.join(sorted(local))})")
