"""hybridlab's local lm-eval tasks: YAML configs and the JSONL data they read, all offline.

``TASKS_DIR`` is what lm-eval's ``TaskManager(include_path=...)`` (or ``--include_path``) takes.
The data come from ``generate.py`` (fixed seeds) and stay in the repository, so evaluating never
downloads anything.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
DATA_DIR = TASKS_DIR / "data"
LOCAL_TASKS = ("hybridlab_bpb", "hybridlab_cloze", "hybridlab_mqar", "hybridlab_nextline")
LOCAL_GROUP = "hybridlab_local"
