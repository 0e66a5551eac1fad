"""The base of every error hybridlab raises for bad input or an unusable resource.

The CLI catches ``HybridlabError`` and prints its message in one line; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class HybridlabError(Exception):
    """A user-facing failure whose message says what was wrong and where."""
