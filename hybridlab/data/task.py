"""What a trainer needs from any data source: seeded training batches and a fixed test set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

IGNORE = -100  # target id of positions that carry no loss (torch's cross_entropy default)


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (B, L) int64 token ids
    targets: torch.Tensor  # (B, L) int64 next-token targets; IGNORE where nothing is scored

    @property
    def mask(self) -> torch.Tensor:
        """(B, L) bool: the positions that count for loss and accuracy."""
        return self.targets != IGNORE

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device))


class TaskData(Protocol):
    """A training task: a synthetic proxy task or a tokenised corpus.

    ``fingerprint`` identifies the exact data (task name, version, hash of every parameter, and
    for corpora the corpus hash) and is stored with every result. ``metric`` names what
    evaluation reports: "accuracy" at the scored positions, or "bits_per_byte" for corpora, for
    which ``bytes_per_token`` converts the per-token loss.
    """

    name: str
    vocab_size: int
    seq_len: int
    metric: Literal["accuracy", "bits_per_byte"]
    bytes_per_token: float

    def fingerprint(self) -> dict[str, Any]: ...

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A training batch drawn with ``generator`` (fresh samples, or from a fixed train set)."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The fixed held-out set, the same on every call, disjoint from training by seed/split."""
        ...
