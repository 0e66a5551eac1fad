"""A space's lm_eval task files are found relative to the space file."""

from pathlib import Path

import pytest

from hybridlab.config import ConfigError
from hybridlab.search.space import load_space

SPACE = Path(__file__).with_name("tiny_space.yaml")


def _space_with(tmp_path: Path, tasks: str) -> Path:
    folder = tmp_path / "spaces"
    folder.mkdir()
    path = folder / "s.yaml"
    path.write_text(SPACE.read_text() + f"lm_eval: {{tasks: {tasks}}}\n")
    return path


def test_task_yaml_is_resolved_against_the_space_folder(tmp_path, monkeypatch):
    path = _space_with(tmp_path, "[tasks/mine.yaml, hybridlab_local]")
    (path.parent / "tasks").mkdir()
    (path.parent / "tasks" / "mine.yaml").write_text("task: mine\n")
    monkeypatch.chdir(tmp_path)
    space = load_space(path.relative_to(tmp_path))
    assert space.lm_eval.tasks == (str(path.parent / "tasks" / "mine.yaml"), "hybridlab_local")


def test_missing_task_yaml_names_the_field(tmp_path):
    path = _space_with(tmp_path, "[hybridlab_local, nope.yaml]")
    with pytest.raises(ConfigError, match=r"lm_eval\.tasks\[1\]: no task file .*nope\.yaml"):
        load_space(path)
