"""The base of every error hybridlab raises for bad input or an unusable resource.

The CLI catches ``HybridlabError`` and prints its message in one line; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class HybridlabError(Exception):
    """A user-facing failure whose message says what was wrong and where."""


class ConfigError(HybridlabError, ValueError):
    """A config value is wrong; names the field, and the file and line when known."""

    def __init__(
        self, field: str, message: str, *, source: str | None = None, line: int | None = None
    ) -> None:
        self.field = field
        self.message = message
        self.source = source
        self.line = line
        where = ""
        if source is not None:
            where = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(f"{where}{field}: {message}")
