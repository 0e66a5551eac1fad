"""How hybridlab writes sizes: bytes in binary units (KiB, MiB, GiB), counts in k, M, G.

One rule for every view. ``hybridlab status`` and ``hybridlab inspect`` format here; the
dashboard receives ``UNIT_RULES`` in its JSON and ``static/units.js`` runs the same steps:
below the base a value is written whole; otherwise it is divided by the base until it rounds
below it, and written to one decimal without a trailing ".0". Rounding is half up, written out
as ``floor(x + 0.5)`` because Python's own formatting rounds half to even and JavaScript's
``toFixed`` half up, which would split the two views on exact ties such as 1.25 KiB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class UnitRule:
    base: int
    units: tuple[str, ...]  # the unit of base**0, base**1, ...
    separator: str  # between the number and the unit


BYTES = UnitRule(base=1024, units=("B", "KiB", "MiB", "GiB", "TiB"), separator=" ")
COUNT = UnitRule(base=1000, units=("", "k", "M", "G", "T"), separator="")
# What the dashboard's page formats with, as JSON.
UNIT_RULES = {name: {**asdict(rule), "units": list(rule.units)}
              for name, rule in (("bytes", BYTES), ("count", COUNT))}


def format_scaled(n: float, rule: UnitRule) -> str:
    """``n`` in the largest unit of ``rule`` that keeps it at or above 1 after rounding."""
    if not math.isfinite(n):
        return str(n)
    step = 0
    shown: float = math.floor(n + 0.5)
    while abs(shown) >= rule.base and step < len(rule.units) - 1:
        n /= rule.base
        step += 1
        shown = math.floor(n * 10 + 0.5) / 10
    text = f"{shown:.1f}".removesuffix(".0") if step else str(shown)
    return f"{text}{rule.separator}{rule.units[step]}"


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    return format_scaled(n, BYTES)


def format_count(n: float) -> str:
    """Parameters, FLOPs, tokens per second: ``1_500_000`` -> ``"1.5M"``."""
    return format_scaled(n, COUNT)
