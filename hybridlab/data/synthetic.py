"""Synthetic proxy tasks: MQAR (Zoology) and the six MAD tasks, seeded, versioned and hashed.

Every task is a pure function of its config, a seed and a split. Randomness comes only from
``numpy.random.Generator`` instances seeded explicitly (a training batch's generator is seeded
from one draw of the trainer's ``torch.Generator``); no global RNG is touched.

Streams: the test set is ``generate(n_test, <seed derived from (task, seed, "test")>, test=True)``;
a fixed training set (``n_train`` set) comes from a seed derived with "train"; fresh training
batches (``n_train=None``, the default) come from the trainer's generator. On top of the distinct
seeds, a training example whose inputs equal a test example's is redrawn, so the splits are
disjoint by construction, not just with high probability.

Every sequence is exactly ``seq_len`` long; ``targets`` hold the token the model must output at
each position and ``IGNORE`` where nothing is scored. Training uses the same masked targets as
testing (Zoology's protocol; MAD trains its recall tasks on every next token, which only adds
loss on unpredictable tokens).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from hybridlab.data.task import IGNORE, Batch

_MAX_REDRAWS = 100

Arrays = tuple[np.ndarray, np.ndarray]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of names and numbers (sha256, stable across runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _choose_distinct(rng: np.random.Generator, n: int, low: int, high: int, k: int) -> np.ndarray:
    """(n, k) int64: per row ``k`` distinct values from ``[low, high)``, uniform, random order."""
    population = high - low
    if k * k <= population:
        # Repeats are rare (probability <= 1/2 per row): draw iid rows, redraw those with repeats.
        # Conditioning iid draws on distinctness is uniform over ordered k-subsets.
        out = rng.integers(low, high, size=(n, k))
        while True:
            s = np.sort(out, axis=1)
            repeats = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if not repeats.any():
                return out
            out[repeats] = rng.integers(low, high, size=(int(repeats.sum()), k))
    out = np.empty((n, k), dtype=np.int64)
    # Row chunks bound the (rows, population) random matrix to about 8 MB.
    chunk = max(1, (1 << 20) // population)
    for start in range(0, n, chunk):
        r = rng.random((min(chunk, n - start), population))
        # The k smallest of iid uniforms, sorted, are a uniformly random ordered k-subset.
        idx = np.argpartition(r, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(r, idx, axis=1), axis=1)
        out[start : start + len(r)] = low + np.take_along_axis(idx, order, axis=1)
    return out


def _check_config(config: Any) -> None:
    """Type-check every knob of a task config dataclass (values often come from YAML/CLI)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = str(f.type)
        if kind == "int | None" and value is None:
            continue
        if kind in ("int", "int | None"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        else:
            raise TypeError(f"{type(config).__name__}.{f.name}: unsupported knob type {kind}")
        if not ok:
            raise ValueError(f"{f.name}: expected {kind}, got {value!r}")
    if config.n_train is not None and config.n_train < 1:
        raise ValueError(
            f"n_train: must be None (fresh samples every step) or >= 1, got {config.n_train}")
    if config.n_test < 1:
        raise ValueError(f"n_test: must be >= 1, got {config.n_test}")
    if config.seq_len < 2:
        raise ValueError(f"seq_len: must be >= 2, got {config.seq_len}")


def _require(ok: bool, knob: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{knob}: {message}")


class SyntheticTask(ABC):
    """Shared machinery: seeds, fixed test set, optional fixed training set, fingerprint.

    Subclasses define ``name``, ``VERSION`` (bump it whenever the generated data change),
    ``config_class`` (a frozen dataclass; every field is a knob) and ``_sample``.
    """

    name: ClassVar[str]
    VERSION: ClassVar[int]
    config_class: ClassVar[type]
    metric: Literal["accuracy", "bits_per_byte"] = "accuracy"
    bytes_per_token = 1.0

    def __init__(self, config: Any = None, *, seed: int) -> None:
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name}: expected a {self.config_class.__name__}, got {config!r}")
        self.config = config
        self.seed = seed
        self.vocab_size: int = config.vocab_size
        self.seq_len: int = config.seq_len
        self._test: Batch | None = None
        self._test_rows: set[bytes] | None = None
        self._train_set: Batch | None = None

    @abstractmethod
    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        """``n`` examples: (n, seq_len) int64 inputs and targets (``IGNORE`` where unscored)."""

    def generate(self, n: int, seed: int, *, test: bool = False) -> Batch:
        """``n`` examples from ``seed`` alone (``test`` selects the test-time distribution)."""
        inputs, targets = self._sample(n, np.random.default_rng(seed), test=test)
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets))

    def fingerprint(self) -> dict[str, Any]:
        params = dataclasses.asdict(self.config)
        ident = {"name": self.name, "version": self.VERSION, "seed": self.seed, "params": params}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return {**ident, "hash": digest[:16]}

    def test_set(self) -> Batch:
        """The fixed test set, (n_test, seq_len), built once."""
        if self._test is None:
            seed = derive_seed(self.name, self.seed, "test")
            self._test = self.generate(self.config.n_test, seed, test=True)
            self._test_rows = {row.tobytes() for row in self._test.inputs.numpy()}
        return self._test

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """(batch_size, seq_len): fresh examples, or rows of the fixed training set."""
        if self.config.n_train is not None:
            train = self._fixed_train_set()
            idx = torch.randint(len(train.inputs), (batch_size,), generator=generator)
            return Batch(train.inputs[idx], train.targets[idx])
        draw = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng([derive_seed(self.name, self.seed, "train"), draw])
        return self._disjoint(*self._sample(batch_size, rng, test=False), rng)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        test = self.test_set()
        for start in range(0, len(test.inputs), batch_size):
            end = start + batch_size
            yield Batch(test.inputs[start:end], test.targets[start:end])

    def _fixed_train_set(self) -> Batch:
        if self._train_set is None:
            rng = np.random.default_rng(derive_seed(self.name, self.seed, "train"))
            inputs, targets = self._sample(self.config.n_train, rng, test=False)
            self._train_set = self._disjoint(inputs, targets, rng)
        return self._train_set

    def _disjoint(self, inputs: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> Batch:
        """Redraw the training rows whose inputs occur in the test set."""
        self.test_set()
        assert self._test_rows is not None
        for _ in range(_MAX_REDRAWS):
            clash = [i for i, row in enumerate(inputs) if row.tobytes() in self._test_rows]
            if not clash:
                return Batch(torch.from_numpy(inputs), torch.from_numpy(targets))
            inputs[clash], targets[clash] = self._sample(len(clash), rng, test=False)
        raise ValueError(
            f"{self.name}: training examples keep colliding with the test set; the task is too "
            f"small for {self.config.n_test} test examples (raise vocab_size or seq_len)"
        )


@dataclass(frozen=True, kw_only=True)
class MQARConfig:
    """Multi-query associative recall (Zoology, Arora et al. 2023, arXiv 2312.04927).

    ``power_a``: exponent of the power law over query slots, p(slot i) ∝ i^(power_a - 1) for
    i = 1..(seq_len - 2 num_kv_pairs) / 2; small values put queries close to the context, 1.0 is
    uniform. ``n_train``: None draws fresh examples every step; an int fixes the training set.
    """

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    n_train: int | None = None
    n_test: int = 3000

    def __post_init__(self) -> None:
        _check_config(self)
        half = self.vocab_size // 2
        _require(half - 1 >= self.num_kv_pairs >= 1, "num_kv_pairs",
                 f"must be in 1..{half - 1} (keys are 1..vocab_size/2 - 1), "
                 f"got {self.num_kv_pairs}")
        _require(self.seq_len >= 4 * self.num_kv_pairs, "seq_len",
                 f"must be >= 4 * num_kv_pairs = {4 * self.num_kv_pairs} (context plus queries)")
        _require(self.power_a > 0, "power_a", f"must be > 0, got {self.power_a}")


class MQAR(SyntheticTask):
    """MQAR as generated by Zoology's ``multiquery_ar``.

    Layout (N = num_kv_pairs): ``k1 v1 k2 v2 ... kN vN`` then the query region, where each key
    appears once more at an even offset ``2 * slot`` (slots sampled without replacement from the
    power law, Zoology's scheme; the slot order makes the query order random). Every other
    position holds the filler token 0, which is never a key or a value (Zoology's
    ``random_non_queries=False``). Keys are distinct within an example and drawn from
    ``1..V/2 - 1``; values are distinct and drawn from ``V/2..V - 1``. The target at a query is its
    key's value; everything else is ``IGNORE``.
    """

    name = "mqar"
    VERSION = 1
    config_class = MQARConfig
    FILLER = 0

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        c = self.config
        k, half = c.num_kv_pairs, c.vocab_size // 2
        keys = _choose_distinct(rng, n, 1, half, k)  # (n, k)
        values = _choose_distinct(rng, n, half, c.vocab_size, k)  # (n, k)
        context = 2 * k
        inputs = np.full((n, c.seq_len), self.FILLER, dtype=np.int64)
        inputs[:, 0:context:2] = keys
        inputs[:, 1:context:2] = values
        slots = (c.seq_len - context) // 2
        log_p = (c.power_a - 1) * np.log(np.arange(1, slots + 1))
        # Gumbel top-k draws slots without replacement with probability ∝ p, in draw order
        # (the same law as Zoology's sequential np.random.choice(replace=False, p=p)).
        scores = log_p + rng.gumbel(size=(n, slots))
        slot = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (n, k): slot of key j
        pos = context + 2 * slot
        rows = np.arange(n)[:, None]
        inputs[rows, pos] = keys
        targets = np.full_like(inputs, IGNORE)
        targets[rows, pos] = values
        return inputs, targets


@dataclass(frozen=True, kw_only=True)
class InContextRecallConfig:
    """MAD in-context recall: ``vocab_size`` tokens split into keys (lower half) and values."""

    vocab_size: int = 16
    seq_len: int = 128
    n_train: int | None = None
    n_test: int = 1280

    def __post_init__(self) -> None:
        _check_config(self)
        _check_recall(self.vocab_size, self.seq_len, noise_vocab_size=0, frac_noise=0.0)


@dataclass(frozen=True, kw_only=True)
class NoisyInContextRecallConfig:
    """MAD noisy in-context recall: the top ``noise_vocab_size`` ids are noise tokens; each
    key-value pair is replaced by two noise tokens with probability ``frac_noise``."""

    vocab_size: int = 32
    seq_len: int = 128
    noise_vocab_size: int = 16
    frac_noise: float = 0.2
    n_train: int | None = None
    n_test: int = 1280

    def __post_init__(self) -> None:
        _check_config(self)
        _check_recall(self.vocab_size, self.seq_len, self.noise_vocab_size, self.frac_noise)


def _check_recall(vocab_size: int, seq_len: int, noise_vocab_size: int, frac_noise: float) -> None:
    _require(seq_len % 2 == 0 and seq_len >= 4, "seq_len", f"must be even and >= 4, got {seq_len}")
    _require(noise_vocab_size >= 0, "noise_vocab_size", f"must be >= 0, got {noise_vocab_size}")
    _require(0 <= frac_noise < 1, "frac_noise", f"must be in [0, 1), got {frac_noise}")
    _require(frac_noise == 0 or noise_vocab_size > 0, "noise_vocab_size",
             "must be > 0 when frac_noise > 0")
    _require(vocab_size - noise_vocab_size >= 2, "vocab_size",
             f"vocab_size - noise_vocab_size must be >= 2 (keys and values), "
             f"got {vocab_size} - {noise_vocab_size}")


def _recall_sample(
    rng: np.random.Generator, n: int, *, vocab_size: int, seq_len: int,
    noise_vocab_size: int, frac_noise: float,
) -> Arrays:
    """MAD's multi-query in-context recall, vectorised.

    ``seq_len / 2`` pairs ``k v``: keys uniform (with repeats) from ``[0, C/2)``, each key's value
    fixed within the example and uniform from ``[C/2, C)``, C = vocab_size - noise_vocab_size. A
    pair becomes two noise tokens from ``[C, vocab_size)`` with probability ``frac_noise``, except
    one random pair and the last. The last pair's key is drawn uniformly from the distinct keys
    already shown. Scored: the value of every pair whose key was shown before (target at the key).
    """
    content = vocab_size - noise_vocab_size
    n_keys = content // 2
    pairs = seq_len // 2
    rows = np.arange(n)[:, None]
    keys = rng.integers(0, n_keys, size=(n, pairs))
    table = rng.integers(n_keys, content, size=(n, n_keys))  # the value of each key
    noise = rng.random((n, pairs)) < frac_noise
    noise[:, -1] = False
    # One pair before the last is never noise, so the final query always has a key to recall.
    noise[rows[:, 0], rng.integers(0, pairs - 1, size=n)] = False
    shown = np.zeros((n, n_keys), dtype=bool)
    shown[np.nonzero(~noise[:, :-1])[0], keys[:, :-1][~noise[:, :-1]]] = True
    pick = np.where(shown, rng.random((n, n_keys)), -1.0)
    keys[:, -1] = pick.argmax(axis=1)
    values = table[rows, keys]

    first = np.full((n, n_keys), pairs)
    r, p = np.nonzero(~noise)
    np.minimum.at(first, (r, keys[r, p]), p)
    scored = ~noise & (first[rows, keys] < np.arange(pairs))

    inputs = np.empty((n, seq_len), dtype=np.int64)
    inputs[:, 0::2] = keys
    inputs[:, 1::2] = values
    if noise_vocab_size:
        noise_tokens = rng.integers(content, vocab_size, size=(n, pairs, 2))
        inputs[:, 0::2] = np.where(noise, noise_tokens[..., 0], inputs[:, 0::2])
        inputs[:, 1::2] = np.where(noise, noise_tokens[..., 1], inputs[:, 1::2])
    targets = np.full_like(inputs, IGNORE)
    targets[:, 0::2] = np.where(scored, values, IGNORE)
    return inputs, targets


class InContextRecall(SyntheticTask):
    """MAD in-context recall (Poli et al. 2024, arXiv 2403.17844), multi-query form."""

    name = "mad:in_context_recall"
    VERSION = 1
    config_class = InContextRecallConfig

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        c = self.config
        return _recall_sample(rng, n, vocab_size=c.vocab_size, seq_len=c.seq_len,
                              noise_vocab_size=0, frac_noise=0.0)


class NoisyInContextRecall(SyntheticTask):
    """MAD noisy in-context recall: in-context recall with pairs replaced by noise tokens."""

    name = "mad:noisy_in_context_recall"
    VERSION = 1
    config_class = NoisyInContextRecallConfig

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        c = self.config
        return _recall_sample(rng, n, vocab_size=c.vocab_size, seq_len=c.seq_len,
                              noise_vocab_size=c.noise_vocab_size, frac_noise=c.frac_noise)


@dataclass(frozen=True, kw_only=True)
class FuzzyInContextRecallConfig:
    """MAD fuzzy in-context recall: keys of 1..``k_motif_size`` tokens, values of
    1..``v_motif_size`` tokens (test keys always have ``k_motif_size`` tokens, as in MAD)."""

    vocab_size: int = 16
    seq_len: int = 128
    k_motif_size: int = 3
    v_motif_size: int = 3
    n_train: int | None = None
    n_test: int = 1280

    def __post_init__(self) -> None:
        _check_config(self)
        content = self.vocab_size - 1
        _require(content >= 2, "vocab_size", f"must be >= 3, got {self.vocab_size}")
        _require(1 <= self.k_motif_size <= content // 2, "k_motif_size",
                 f"must be in 1..{content // 2} (distinct key tokens), got {self.k_motif_size}")
        _require(1 <= self.v_motif_size <= content - content // 2, "v_motif_size",
                 f"must be in 1..{content - content // 2}, got {self.v_motif_size}")
        longest = self.k_motif_size + self.v_motif_size
        _require(self.seq_len + 1 >= 3 * longest, "seq_len",
                 f"must be >= 3 * (k_motif_size + v_motif_size) - 1 = {3 * longest - 1}")


class FuzzyInContextRecall(SyntheticTask):
    """MAD fuzzy in-context recall, multi-query form.

    Keys are ordered tuples of distinct tokens from ``[0, C/2)``, values from ``[C/2, C)``, with
    C = vocab_size - 1; the pad token is ``vocab_size - 1``. Pair sizes are uniform in
    1..k_motif_size (keys; always k_motif_size at test time) and 1..v_motif_size (values). Each key
    keeps one value within an example. Pairs fill a raw sequence of seq_len + 1 tokens greedily,
    leaving room for a probe pair that is inserted at a uniformly random pair slot and repeated
    at the end (so the last value is always recallable; MAD could drop the inserted copy); the
    raw sequence is left-padded, then shifted into inputs and next-token targets. Scored: every
    value token of a pair whose key appeared earlier.
    """

    name = "mad:fuzzy_in_context_recall"
    VERSION = 1
    config_class = FuzzyInContextRecallConfig

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        c = self.config
        content = c.vocab_size - 1
        n_keys = content // 2
        km, vm = c.k_motif_size, c.v_motif_size
        raw_len = c.seq_len + 1
        most = raw_len // 2  # no more pairs than this fit (each has >= 2 tokens)
        pad = c.vocab_size - 1
        # All randomness drawn up front, (n, most, ...); pair 0 of each example is its probe.
        key_sizes = (np.full((n, most), km) if test
                     else rng.integers(1, km + 1, size=(n, most))).tolist()
        value_sizes = rng.integers(1, vm + 1, size=(n, most)).tolist()
        key_tokens = _choose_distinct(rng, n * most, 0, n_keys, km).reshape(n, most, km).tolist()
        value_tokens = (_choose_distinct(rng, n * most, n_keys, content, vm)
                        .reshape(n, most, vm).tolist())
        slot = rng.random(n).tolist()
        inputs = np.empty((n, c.seq_len), dtype=np.int64)
        targets = np.empty((n, c.seq_len), dtype=np.int64)
        for i in range(n):
            value_of: dict[tuple[int, ...], tuple[int, ...]] = {}
            pairs: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
            # The probe's two copies are reserved first; pairs then fill the rest greedily.
            room = raw_len
            for j in range(most):
                key = tuple(key_tokens[i][j][: key_sizes[i][j]])
                value = value_of.setdefault(key, tuple(value_tokens[i][j][: value_sizes[i][j]]))
                room -= (2 if j == 0 else 1) * (len(key) + len(value))
                if room < 0:
                    break
                pairs.append((key, value))
            probe, body = pairs[0], pairs[1:]
            body.insert(int(slot[i] * (len(body) + 1)), probe)
            body.append(probe)
            tokens: list[int] = []
            scored: list[bool] = []
            seen: set[tuple[int, ...]] = set()
            for key, value in body:
                tokens += key
                tokens += value
                scored += [False] * len(key) + [key in seen] * len(value)
                seen.add(key)
            n_pad = raw_len - len(tokens)
            raw = np.array([pad] * n_pad + tokens, dtype=np.int64)
            mask = np.array([False] * n_pad + scored)
            inputs[i] = raw[:-1]
            targets[i] = np.where(mask[1:], raw[1:], IGNORE)
        return inputs, targets


@dataclass(frozen=True, kw_only=True)
class SelectiveCopyingConfig:
    """MAD selective copying: ``num_tokens_to_copy`` tokens scattered among blanks."""

    vocab_size: int = 16
    seq_len: int = 256
    num_tokens_to_copy: int = 16
    n_train: int | None = None
    n_test: int = 1280

    def __post_init__(self) -> None:
        _check_config(self)
        _require(self.vocab_size >= 3, "vocab_size", f"must be >= 3, got {self.vocab_size}")
        _require(self.num_tokens_to_copy >= 1, "num_tokens_to_copy",
                 f"must be >= 1, got {self.num_tokens_to_copy}")
        _require(self.seq_len > 2 * self.num_tokens_to_copy + 1, "seq_len",
                 f"must be > 2 * num_tokens_to_copy + 1 = {2 * self.num_tokens_to_copy + 1}")


class SelectiveCopying(SyntheticTask):
    """MAD selective copying, MAD's layout.

    ``[region of T tokens and seq_len - 2T - 1 blanks] COPY [T blanks]``: the T tokens (uniform
    from ``[0, V - 2)``, repeats allowed) sit at uniformly random sorted positions of the region
    (MAD inserts blanks only before tokens, never after the last one); blank = V - 2,
    COPY = V - 1. The targets at the T trailing blanks are the tokens in order.
    """

    name = "mad:selective_copying"
    VERSION = 1
    config_class = SelectiveCopyingConfig

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        c = self.config
        t = c.num_tokens_to_copy
        blank, copy = c.vocab_size - 2, c.vocab_size - 1
        region = c.seq_len - t - 1
        tokens = rng.integers(0, c.vocab_size - 2, size=(n, t))
        where = np.sort(_choose_distinct(rng, n, 0, region, t), axis=1)
        inputs = np.full((n, c.seq_len), blank, dtype=np.int64)
        inputs[np.arange(n)[:, None], where] = tokens
        inputs[:, region] = copy
        targets = np.full_like(inputs, IGNORE)
        targets[:, region + 1 :] = tokens
        return inputs, targets


@dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    """MAD compression of a ``seq_len / 2``-token sequence (``seq_len`` = 64 matches MAD's 32)."""

    vocab_size: int = 16
    seq_len: int = 64
    n_train: int | None = None
    n_test: int = 1280

    def __post_init__(self) -> None:
        _check_config(self)
        _require(self.vocab_size >= 3, "vocab_size", f"must be >= 3, got {self.vocab_size}")
        _require(self.seq_len % 2 == 0 and self.seq_len >= 4, "seq_len",
                 f"must be even and >= 4, got {self.seq_len}")


class Compression(SyntheticTask):
    """MAD compression, adapted to a decoder-only LM.

    MAD encodes ``x_1 .. x_{m-1} C`` into one vector and decodes the sequence from it with a
    separate decoder. Here, with m = seq_len / 2: inputs ``x_1 .. x_{m-1} C B .. B`` (m blanks);
    the targets at the blanks are ``x_1 .. x_{m-1} C``, the full sequence as in MAD. Tokens are
    uniform from ``[0, V - 2)``; blank = V - 2, C = V - 1. Blanks carry no content, so the model
    must reproduce the sequence from what it keeps past C: for a recurrent layer that is its
    fixed-size state (the compression MAD measures); attention can still look back, as in
    copying, which is the adaptation's limit.
    """

    name = "mad:compression"
    VERSION = 1
    config_class = CompressionConfig

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        c = self.config
        m = c.seq_len // 2
        blank, marker = c.vocab_size - 2, c.vocab_size - 1
        sequence = rng.integers(0, c.vocab_size - 2, size=(n, m))
        sequence[:, -1] = marker
        inputs = np.concatenate([sequence, np.full((n, m), blank, dtype=np.int64)], axis=1)
        targets = np.concatenate([np.full((n, m), IGNORE, dtype=np.int64), sequence], axis=1)
        return inputs, targets


@dataclass(frozen=True, kw_only=True)
class MemorizationConfig:
    """MAD memorization: one fixed key-to-value map for the whole task, learnt in the weights."""

    vocab_size: int = 256
    seq_len: int = 32
    n_train: int | None = None
    n_test: int = 1280

    def __post_init__(self) -> None:
        _check_config(self)
        _require(self.vocab_size >= 3, "vocab_size", f"must be >= 3, got {self.vocab_size}")
        _require(self.seq_len % 2 == 0, "seq_len", f"must be even, got {self.seq_len}")


class Memorization(SyntheticTask):
    """MAD memorization: ``k1 I k2 I ...`` with the target at each insert token I its key's value.

    Keys ``[0, C/2)``, values ``[C/2, C)`` with C = V - 1 and I = V - 1; the map is a random
    one-to-one assignment drawn from a seed derived from the task seed, so it is the same for
    training and test. Keys are uniform with repeats.
    """

    name = "mad:memorization"
    VERSION = 1
    config_class = MemorizationConfig

    def __init__(self, config: MemorizationConfig | None = None, *, seed: int) -> None:
        super().__init__(config, seed=seed)
        content = self.config.vocab_size - 1
        map_rng = np.random.default_rng(derive_seed(self.name, seed, "map"))
        # (C/2,) the value of each key; one-to-one because values are a permutation prefix.
        self.value_of = map_rng.permutation(np.arange(content // 2, content))[: content // 2]

    def _sample(self, n: int, rng: np.random.Generator, *, test: bool) -> Arrays:
        c = self.config
        insert = c.vocab_size - 1
        keys = rng.integers(0, len(self.value_of), size=(n, c.seq_len // 2))
        inputs = np.full((n, c.seq_len), insert, dtype=np.int64)
        inputs[:, 0::2] = keys
        targets = np.full_like(inputs, IGNORE)
        targets[:, 1::2] = self.value_of[keys]
        return inputs, targets


MAD_TASKS: dict[str, type[SyntheticTask]] = {
    "in_context_recall": InContextRecall,
    "fuzzy_in_context_recall": FuzzyInContextRecall,
    "noisy_in_context_recall": NoisyInContextRecall,
    "selective_copying": SelectiveCopying,
    "compression": Compression,
    "memorization": Memorization,
}
