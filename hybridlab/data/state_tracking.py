"""State-tracking proxy tasks: parity, modular addition, permutation composition (S_n words).

MQAR and MAD measure recall; these measure whether a model can carry a running state that a
diagonal real-valued (non-negative) SSM cannot represent at any width with bounded depth
("The Illusion of State in State-Space Models", Merrill, Petty & Sabharwal, 2024; Mamba-3's
parity and modular-arithmetic results, Lahoti et al., 2026). Each token is one group element;
the target at position t is the running product (sum, composition) of the first t + 1:

- ``state:parity``: bits, the running parity (the group Z_2);
- ``state:modular_addition``: digits 0..modulus-1, the running sum mod ``modulus`` (Z_m);
- ``state:permutation``: permutations of ``n_elements`` items (tokens index them in
  lexicographic order), the running composition; n_elements = 5 is the S5 word problem, whose
  group is not solvable, so no constant-depth circuit of the kind above tracks it.

``score`` (the test set) and ``train_score`` (training batches): "final" scores the last position
only (the task as usually stated), "every" every position (prefixes are the same task at every
length). Training defaults to "every": with the final position alone, no model here learned
parity at length 64 from scratch (Mamba-3 stayed at chance for 3000 steps), one bit of signal per
sequence giving no gradient towards the running state. Seeds, versions, fingerprints and
train/test disjointness come from ``SyntheticTask``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from hybridlab.data.synthetic import Arrays, SyntheticTask, _check_config, _require
from hybridlab.data.task import IGNORE

SCORES = ("final", "every")


def _check_scores(config: object) -> None:
    for knob in ("score", "train_score"):
        value = getattr(config, knob)
        _require(value in SCORES, knob, f"must be one of {list(SCORES)}, got {value!r}")


def _score(config: object, test: bool) -> str:
    return config.score if test else config.train_score  # type: ignore[attr-defined]


def _scored(running: np.ndarray, score: str) -> np.ndarray:
    """Targets from the running states (n, seq_len): all of them, or the last one only."""
    if score == "every":
        return running
    targets = np.full_like(running, IGNORE)
    targets[:, -1] = running[:, -1]
    return targets


@dataclass(frozen=True, kw_only=True)
class ParityConfig:
    """Running parity of a bit string; ``vocab_size`` is 2 (tokens 0 and 1)."""

    seq_len: int = 64
    score: str = "final"
    train_score: str = "every"
    n_train: int | None = None
    n_test: int = 1000
    vocab_size: int = 2

    def __post_init__(self) -> None:
        _check_config(self)
        _check_scores(self)
        _require(self.vocab_size == 2, "vocab_size", f"parity has 2 tokens, got {self.vocab_size}")


class Parity(SyntheticTask):
    name = "state:parity"
    VERSION = 1
    config_class = ParityConfig

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        bits = rng.integers(0, 2, size=(n, self.config.seq_len), dtype=np.int64)
        return bits, _scored(np.cumsum(bits, axis=1) % 2, _score(self.config, test))


@dataclass(frozen=True, kw_only=True)
class ModularAdditionConfig:
    """Running sum mod ``modulus`` of digits 0..modulus-1; ``vocab_size`` equals ``modulus``."""

    modulus: int = 5
    seq_len: int = 64
    score: str = "final"
    train_score: str = "every"
    n_train: int | None = None
    n_test: int = 1000
    vocab_size: int | None = None  # derived: modulus

    def __post_init__(self) -> None:
        _check_config(self)
        _check_scores(self)
        _require(self.modulus >= 2, "modulus", f"must be >= 2, got {self.modulus}")
        if self.vocab_size is None:
            object.__setattr__(self, "vocab_size", self.modulus)
        _require(self.vocab_size == self.modulus, "vocab_size",
                 f"is the modulus ({self.modulus}), got {self.vocab_size}")


class ModularAddition(SyntheticTask):
    name = "state:modular_addition"
    VERSION = 1
    config_class = ModularAdditionConfig

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        c = self.config
        digits = rng.integers(0, c.modulus, size=(n, c.seq_len), dtype=np.int64)
        return digits, _scored(np.cumsum(digits, axis=1) % c.modulus, _score(c, test))


@dataclass(frozen=True, kw_only=True)
class PermutationConfig:
    """Running composition of permutations of ``n_elements`` items; ``vocab_size`` is
    n_elements! (token i is the i-th permutation in lexicographic order)."""

    n_elements: int = 5
    seq_len: int = 64
    score: str = "final"
    train_score: str = "every"
    n_train: int | None = None
    n_test: int = 1000
    vocab_size: int | None = None  # derived: n_elements!

    def __post_init__(self) -> None:
        _check_config(self)
        _check_scores(self)
        _require(2 <= self.n_elements <= 6, "n_elements",
                 f"must be in 2..6 (the vocabulary is n_elements!), got {self.n_elements}")
        size = math.factorial(self.n_elements)
        if self.vocab_size is None:
            object.__setattr__(self, "vocab_size", size)
        _require(self.vocab_size == size, "vocab_size",
                 f"is n_elements! = {size}, got {self.vocab_size}")


class Permutation(SyntheticTask):
    """The word problem of S_n: after g_1 .. g_t, the state is g_t ∘ ... ∘ g_1 (apply g_1
    first), i.e. the permutation p with p[i] = g_t[...g_1[i]]."""

    name = "state:permutation"
    VERSION = 1
    config_class = PermutationConfig

    def __init__(self, config: PermutationConfig | None = None, *, seed: int) -> None:
        super().__init__(config, seed=seed)
        perms = np.array(list(itertools.permutations(range(self.config.n_elements))))
        self.perms = perms  # (n!, n), lexicographic
        # compose[a, b] = index of b ∘ a (a first): row a, column b
        index = {tuple(p): i for i, p in enumerate(perms)}
        self.compose = np.array(
            [[index[tuple(b[a])] for b in perms] for a in perms], dtype=np.int64
        )

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        c = self.config
        words = rng.integers(0, len(self.perms), size=(n, c.seq_len), dtype=np.int64)
        running = np.empty_like(words)
        running[:, 0] = words[:, 0]
        for t in range(1, c.seq_len):
            running[:, t] = self.compose[running[:, t - 1], words[:, t]]
        return words, _scored(running, _score(c, test))


STATE_TASKS: dict[str, type[SyntheticTask]] = {
    "parity": Parity,
    "modular_addition": ModularAddition,
    "permutation": Permutation,
}
