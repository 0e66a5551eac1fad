"""Published hybrid layouts as hybridlab architecture files (pattern and sizes, no weights).

Each ``<name>.yaml`` is an ordinary arch file (``hybridlab inspect``, ``train`` and ``export``
take its path) whose header comment names its source (paper, model card) and every change from
the published model, which is what ``hybridlab.export.importing`` records when it imports the
published config with ``lossy``. ``seed_architectures:`` in a search space and
``hybridlab import`` take the names.
"""

from __future__ import annotations

from importlib import resources

from hybridlab.config import ArchConfig, ConfigError

SUFFIX = ".yaml"


def names() -> tuple[str, ...]:
    """The shipped layouts, sorted."""
    return tuple(sorted(entry.name.removesuffix(SUFFIX)
                        for entry in resources.files(__package__).iterdir()
                        if entry.name.endswith(SUFFIX)))


def _text(name: str) -> str:
    if name not in names():
        raise ConfigError("<layout>", f"no published layout {name!r}; shipped: "
                          f"{', '.join(names())}", source=name)
    return (resources.files(__package__) / f"{name}{SUFFIX}").read_text(encoding="utf-8")


def layout(name: str) -> ArchConfig:
    """The architecture of a shipped layout."""
    return ArchConfig.from_yaml(_text(name), source=f"hybridlab.published:{name}")


def describe(name: str) -> str:
    """The layout's header comment: its source and what differs from the published model."""
    lines = []
    for line in _text(name).splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.removeprefix("#").removeprefix(" "))
    return "\n".join(lines)
