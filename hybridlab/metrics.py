"""The metrics a search can optimise: one registry read by the search space and the dashboard.

A task metric comes from evaluating the trained candidate; a cost metric from the architecture
(``cost.py``) or a throughput measurement. Each entry carries what a reader needs to judge and
show a value: its default direction, its unit and a short label.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

MetricKind = Literal["task", "cost"]
Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True, kw_only=True)
class Metric:
    name: str
    kind: MetricKind
    direction: Direction
    # Format hint: "fraction", "nats", "bits/byte", "count", "FLOPs", "bytes" or "tokens/s".
    unit: str
    label: str
    # Costs span orders of magnitude across a space; plot them on a log axis.
    log_scale: bool = False
    # None: every candidate reports it; else which tasks do (those whose own metric it is).
    only_from: str | None = None


METRICS: dict[str, Metric] = {metric.name: metric for metric in (
    Metric(name="accuracy", kind="task", direction="maximize", unit="fraction",
           label="test accuracy"),
    Metric(name="loss", kind="task", direction="minimize", unit="nats",
           label="test loss (cross-entropy per token)"),
    Metric(name="bits_per_byte", kind="task", direction="minimize", unit="bits/byte",
           label="held-out bits per byte", only_from="corpus tasks"),
    Metric(name="params", kind="cost", direction="minimize", unit="count",
           label="parameters", log_scale=True),
    Metric(name="active_params", kind="cost", direction="minimize", unit="count",
           label="active parameters (a token's routed experts, not all)", log_scale=True),
    Metric(name="flops_per_token", kind="cost", direction="minimize", unit="FLOPs",
           label="FLOPs per token", log_scale=True),
    Metric(name="state_bytes", kind="cost", direction="minimize", unit="bytes",
           label="inference state at L (bytes)", log_scale=True),
    Metric(name="tokens_per_second", kind="cost", direction="maximize", unit="tokens/s",
           label="measured throughput (tokens/s)", log_scale=True),
)}

# The objective of a space that names none.
DEFAULT_OBJECTIVE = "accuracy"


def metric_names(kind: MetricKind | None = None) -> tuple[str, ...]:
    """Registered metric names, in registry order; only those of ``kind`` when given."""
    return tuple(name for name, metric in METRICS.items() if kind is None or metric.kind == kind)


def registry_as_json() -> dict[str, dict[str, Any]]:
    """The registry as plain dicts keyed by name, for the dashboard's API."""
    return {name: dataclasses.asdict(metric) for name, metric in METRICS.items()}
