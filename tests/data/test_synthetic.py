import dataclasses

import numpy as np
import pytest
import torch

from hybridlab.data.synthetic import (
    MAD_TASKS,
    MQAR,
    Compression,
    CompressionConfig,
    FuzzyInContextRecall,
    FuzzyInContextRecallConfig,
    InContextRecall,
    InContextRecallConfig,
    Memorization,
    MemorizationConfig,
    MQARConfig,
    NoisyInContextRecall,
    NoisyInContextRecallConfig,
    SelectiveCopying,
    SelectiveCopyingConfig,
    SyntheticTask,
)
from hybridlab.data.task import IGNORE, Batch

# Small but non-trivial settings so the whole module runs in seconds.
SMALL: dict[type[SyntheticTask], object] = {
    MQAR: MQARConfig(vocab_size=256, seq_len=64, num_kv_pairs=6, n_test=64),
    InContextRecall: InContextRecallConfig(seq_len=64, n_test=64),
    NoisyInContextRecall: NoisyInContextRecallConfig(seq_len=64, n_test=64),
    FuzzyInContextRecall: FuzzyInContextRecallConfig(seq_len=64, n_test=64),
    SelectiveCopying: SelectiveCopyingConfig(seq_len=64, num_tokens_to_copy=8, n_test=64),
    Compression: CompressionConfig(seq_len=32, n_test=64),
    Memorization: MemorizationConfig(vocab_size=64, n_test=64),
}
TASKS = list(SMALL)

# One changed value for every knob of every task: the test below checks that each one changes
# the data, and test_every_knob_is_covered fails when a knob is added without an entry here.
KNOB_CHANGES: dict[type[SyntheticTask], dict[str, object]] = {
    MQAR: {"vocab_size": 512, "seq_len": 96, "num_kv_pairs": 8, "power_a": 1.0,
           "n_train": 10, "n_test": 10},
    InContextRecall: {"vocab_size": 32, "seq_len": 48, "n_train": 10, "n_test": 10},
    NoisyInContextRecall: {"vocab_size": 48, "seq_len": 48, "noise_vocab_size": 8,
                           "frac_noise": 0.5, "n_train": 10, "n_test": 10},
    FuzzyInContextRecall: {"vocab_size": 32, "seq_len": 48, "k_motif_size": 2,
                           "v_motif_size": 2, "n_train": 10, "n_test": 10},
    SelectiveCopying: {"vocab_size": 32, "seq_len": 48, "num_tokens_to_copy": 4,
                       "n_train": 10, "n_test": 10},
    Compression: {"vocab_size": 32, "seq_len": 48, "n_train": 10, "n_test": 10},
    Memorization: {"vocab_size": 128, "seq_len": 48, "n_train": 10, "n_test": 10},
}


def make(cls: type[SyntheticTask], seed: int = 0, **changes: object) -> SyntheticTask:
    return cls(dataclasses.replace(SMALL[cls], **changes), seed=seed)


def rows(batch: Batch) -> set[bytes]:
    return {row.tobytes() for row in batch.inputs.numpy()}


def scored(batch: Batch) -> list[list[int]]:
    """Per example, the scored positions."""
    return [torch.nonzero(m).flatten().tolist() for m in batch.mask]


def test_registry_lists_the_six_mad_tasks() -> None:
    assert sorted(MAD_TASKS) == sorted([
        "in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall",
        "selective_copying", "compression", "memorization"])


@pytest.mark.parametrize("cls", TASKS)
def test_shapes_ranges_and_protocol(cls: type[SyntheticTask]) -> None:
    task = make(cls)
    assert task.metric == "accuracy" and task.bytes_per_token == 1.0
    assert task.vocab_size == SMALL[cls].vocab_size and task.seq_len == SMALL[cls].seq_len
    for batch in [task.train_batch(8, torch.Generator().manual_seed(0)), task.test_set(),
                  task.generate(5, seed=1)]:
        assert batch.inputs.dtype == batch.targets.dtype == torch.int64
        assert batch.inputs.shape == batch.targets.shape
        assert batch.inputs.shape[1] == task.seq_len
        assert ((batch.inputs >= 0) & (batch.inputs < task.vocab_size)).all()
        t = batch.targets[batch.mask]
        assert ((t >= 0) & (t < task.vocab_size)).all()
        assert batch.mask.any(dim=1).all(), "every example scores something"
    evals = list(task.eval_batches(24))
    assert [len(b.inputs) for b in evals] == [24, 24, 16]
    assert torch.equal(torch.cat([b.inputs for b in evals]), task.test_set().inputs)


@pytest.mark.parametrize("cls", TASKS)
def test_seeding_is_explicit_and_reproducible(cls: type[SyntheticTask]) -> None:
    task = make(cls)
    a, b, c = task.generate(16, seed=5), task.generate(16, seed=5), task.generate(16, seed=6)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    x = task.train_batch(16, torch.Generator().manual_seed(1))
    y = make(cls).train_batch(16, torch.Generator().manual_seed(1))
    z = task.train_batch(16, torch.Generator().manual_seed(2))
    assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
    assert not torch.equal(x.inputs, z.inputs)
    assert torch.equal(make(cls).test_set().inputs, task.test_set().inputs)
    assert not torch.equal(make(cls, seed=1).test_set().inputs, task.test_set().inputs)


@pytest.mark.parametrize("cls", TASKS)
def test_no_global_rng_is_touched(cls: type[SyntheticTask]) -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    task = make(cls, n_train=4)
    task.train_batch(4, torch.Generator().manual_seed(0))
    make(cls).train_batch(4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], numpy_state[1]) and after[2] == numpy_state[2]


@pytest.mark.parametrize("cls", TASKS)
def test_train_and_test_streams_are_disjoint(cls: type[SyntheticTask]) -> None:
    task = make(cls)
    test_rows = rows(task.test_set())
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert not rows(task.train_batch(32, gen)) & test_rows
    fixed = make(cls, n_train=40)
    train_set = rows(fixed._fixed_train_set())
    assert not train_set & test_rows
    drawn = set().union(*(rows(fixed.train_batch(16, gen)) for _ in range(5)))
    assert drawn <= train_set
    assert len(drawn) > 16, "the fixed set is sampled, not replayed in order"


def test_training_rows_that_equal_test_rows_are_redrawn() -> None:
    # Two keys and one pair per example: only two distinct inputs exist.
    tiny = MemorizationConfig(vocab_size=5, seq_len=2, n_test=1)
    task = Memorization(tiny, seed=0)
    (test_row,) = rows(task.test_set())
    batch = task.train_batch(64, torch.Generator().manual_seed(0))
    assert test_row not in rows(batch) and len(rows(batch)) == 1
    crowded = Memorization(dataclasses.replace(tiny, n_test=50), seed=0)
    with pytest.raises(ValueError, match="test set"):
        crowded.train_batch(4, torch.Generator().manual_seed(0))


def test_every_knob_is_covered() -> None:
    for cls in TASKS:
        knobs = {f.name for f in dataclasses.fields(cls.config_class)}
        assert set(KNOB_CHANGES[cls]) == knobs, cls.name


def _differs(a: Batch, b: Batch) -> bool:
    if a.inputs.shape != b.inputs.shape:
        return True
    return not (torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets))


@pytest.mark.parametrize(("cls", "knob", "value"), [
    (cls, knob, value) for cls in TASKS for knob, value in KNOB_CHANGES[cls].items()
])
def test_every_knob_changes_the_data(cls: type[SyntheticTask], knob: str, value: object) -> None:
    base, changed = make(cls), make(cls, **{knob: value})
    assert base.fingerprint()["hash"] != changed.fingerprint()["hash"]
    if knob == "n_test":
        assert len(changed.test_set().inputs) == value != len(base.test_set().inputs)
        return
    if knob == "n_train":
        a = base.train_batch(32, torch.Generator().manual_seed(0))
        b = changed.train_batch(32, torch.Generator().manual_seed(0))
        assert len(rows(b)) <= value < len(rows(a))
        return
    assert _differs(base.generate(32, seed=0), changed.generate(32, seed=0))
    assert _differs(base.generate(32, seed=0, test=True), changed.generate(32, seed=0, test=True))


@pytest.mark.parametrize(("cls", "knob", "value"), [
    (MQAR, "num_kv_pairs", 17), (MQAR, "power_a", 0.0), (MQAR, "vocab_size", 10),
    (InContextRecall, "seq_len", 63), (NoisyInContextRecall, "frac_noise", 1.0),
    (NoisyInContextRecall, "noise_vocab_size", 31), (FuzzyInContextRecall, "k_motif_size", 8),
    (SelectiveCopying, "num_tokens_to_copy", 32), (Compression, "seq_len", 33),
    (Memorization, "vocab_size", 2), (MQAR, "n_test", 0), (MQAR, "n_train", 0),
    (MQAR, "seq_len", "64"), (MQAR, "num_kv_pairs", True),
])
def test_invalid_knobs_raise_naming_the_knob(cls: type, knob: str, value: object) -> None:
    with pytest.raises(ValueError, match=knob):
        dataclasses.replace(SMALL[cls], **{knob: value})


def test_fingerprint_identifies_task_version_seed_and_params() -> None:
    fp = make(MQAR).fingerprint()
    assert fp["name"] == "mqar" and fp["version"] == MQAR.VERSION and fp["seed"] == 0
    assert fp["params"] == dataclasses.asdict(SMALL[MQAR])
    assert fp == make(MQAR).fingerprint()
    assert fp["hash"] != make(MQAR, seed=1).fingerprint()["hash"]


def test_mqar_layout_and_label_mask() -> None:
    cfg = SMALL[MQAR]
    k, half = cfg.num_kv_pairs, cfg.vocab_size // 2
    batch = make(MQAR).generate(200, seed=0)
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        keys, values = inputs[0 : 2 * k : 2], inputs[1 : 2 * k : 2]
        assert len(set(keys)) == k and len(set(values)) == k
        assert all(1 <= key < half for key in keys)
        assert all(half <= v < cfg.vocab_size for v in values)
        queries = [p for p in range(2 * k, cfg.seq_len) if inputs[p] != MQAR.FILLER]
        assert sorted(inputs[p] for p in queries) == sorted(keys), "each key queried once"
        assert all((p - 2 * k) % 2 == 0 for p in queries)
        assert [p for p, t in enumerate(targets) if t != IGNORE] == queries
        assert sorted(targets[p] for p in queries) == sorted(values)


def test_mqar_oracle_recovers_every_target_from_context() -> None:
    batch = make(MQAR).generate(200, seed=1)
    k = SMALL[MQAR].num_kv_pairs
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        memory = {inputs[i]: inputs[i + 1] for i in range(0, 2 * k, 2)}
        predicted = {p: memory[inputs[p]] for p in range(2 * k, len(inputs)) if inputs[p] in memory}
        assert predicted == {p: t for p, t in enumerate(targets) if t != IGNORE}


def test_mqar_power_law_puts_queries_near_the_context() -> None:
    def mean_query_position(power_a: float) -> float:
        batch = make(MQAR, power_a=power_a).generate(400, seed=0)
        return batch.mask.nonzero()[:, 1].float().mean().item()

    assert mean_query_position(0.01) < mean_query_position(1.0) - 3


def _recall_oracle(inputs: list[int], content: int) -> dict[int, int]:
    """Predictions from the prefix only: a key seen earlier predicts its value."""
    memory: dict[int, int] = {}
    predicted = {}
    for p in range(0, len(inputs), 2):
        key, value = inputs[p], inputs[p + 1]
        if key >= content:
            continue  # a noise pair
        if key in memory:
            predicted[p] = memory[key]
        memory[key] = value
    return predicted


@pytest.mark.parametrize("cls", [InContextRecall, NoisyInContextRecall])
def test_in_context_recall_mask_and_oracle(cls: type[SyntheticTask]) -> None:
    cfg = SMALL[cls]
    noise = getattr(cfg, "noise_vocab_size", 0)
    content = cfg.vocab_size - noise
    batch = make(cls).generate(200, seed=0)
    n_noise_pairs = 0
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        keys, values = inputs[0::2], inputs[1::2]
        for key, value in zip(keys, values, strict=True):
            if key >= content:
                assert value >= content, "noise comes in whole pairs"
                n_noise_pairs += 1
            else:
                assert key < content // 2 <= value < content
        assert keys[-1] < content, "the last pair is a query"
        truth = {p: t for p, t in enumerate(targets) if t != IGNORE}
        assert _recall_oracle(inputs, content) == truth
        assert len(inputs) - 2 in truth
    if noise:
        share = n_noise_pairs / (200 * cfg.seq_len // 2)
        assert abs(share - cfg.frac_noise) < 0.05
    else:
        assert n_noise_pairs == 0


def _segments(raw: list[int], n_keys: int, content: int) -> list[tuple[str, list[int], int]]:
    """Maximal runs of key, value or pad tokens: (kind, tokens, start)."""
    kinds = ["key" if t < n_keys else "value" if t < content else "pad" for t in raw]
    runs: list[tuple[str, list[int], int]] = []
    for i, (kind, t) in enumerate(zip(kinds, raw, strict=True)):
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(t)
        else:
            runs.append((kind, [t], i))
    return runs


@pytest.mark.parametrize("test", [False, True])
def test_fuzzy_recall_scores_exactly_repeated_keys_values(test: bool) -> None:
    cfg = SMALL[FuzzyInContextRecall]
    content = cfg.vocab_size - 1
    n_keys = content // 2
    batch = make(FuzzyInContextRecall).generate(100, seed=0, test=test)
    key_sizes = set()
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        # The final value's last token is only in the targets (it is always scored).
        raw = [*inputs, targets[-1]]
        runs = _segments(raw, n_keys, content)
        if runs[0][0] == "pad":
            runs = runs[1:]
        assert [kind for kind, _, _ in runs] == ["key", "value"] * (len(runs) // 2)
        value_of: dict[tuple[int, ...], list[int]] = {}
        expected = {}
        for (_, key, _), (_, value, start) in zip(runs[0::2], runs[1::2], strict=True):
            key_sizes.add(len(key))
            assert len(key) == len(set(key)) <= cfg.k_motif_size
            assert len(value) == len(set(value)) <= cfg.v_motif_size
            if tuple(key) in value_of:
                assert value_of[tuple(key)] == value, "a key keeps its value"
                expected |= {start + j - 1: v for j, v in enumerate(value)}
            value_of[tuple(key)] = value
        assert {p: t for p, t in enumerate(targets) if t != IGNORE} == expected
        assert len(raw) - 2 in expected, "the final probe is scored"
    assert key_sizes == ({cfg.k_motif_size} if test else set(range(1, cfg.k_motif_size + 1)))


def test_fuzzy_recall_oracle_from_prefix_at_test_time() -> None:
    cfg = SMALL[FuzzyInContextRecall]
    content = cfg.vocab_size - 1
    n_keys, k = content // 2, cfg.k_motif_size
    batch = make(FuzzyInContextRecall).test_set()
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        memory: dict[tuple[int, ...], list[int]] = {}
        key: list[int] = []
        value: list[int] = []
        predicted = {}
        for p, t in enumerate(inputs):
            if t < n_keys:
                if value:
                    memory[tuple(key)] = value
                    key, value = [], []
                key.append(t)
                if len(key) == k and tuple(key) in memory:
                    predicted[p] = memory[tuple(key)][0]
            elif t < content:
                value.append(t)
                known = memory.get(tuple(key), [])
                if len(value) < len(known):
                    predicted[p] = known[len(value)]
        assert predicted == {p: t for p, t in enumerate(targets) if t != IGNORE}


def test_selective_copying_layout_and_oracle() -> None:
    cfg = SMALL[SelectiveCopying]
    t, blank, copy = cfg.num_tokens_to_copy, cfg.vocab_size - 2, cfg.vocab_size - 1
    batch = make(SelectiveCopying).generate(100, seed=0)
    starts = []
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        region = cfg.seq_len - t - 1
        assert inputs[region] == copy and inputs[region + 1 :] == [blank] * t
        to_copy = [x for x in inputs[:region] if x != blank]
        assert len(to_copy) == t and inputs[:region].count(blank) == cfg.seq_len - 2 * t - 1
        assert targets == [IGNORE] * (region + 1) + to_copy
        starts.append(next(i for i, x in enumerate(inputs) if x != blank))
    assert len(set(starts)) > 5, "tokens are scattered, not packed at the front"


def test_compression_layout_and_oracle() -> None:
    cfg = SMALL[Compression]
    m, blank, marker = cfg.seq_len // 2, cfg.vocab_size - 2, cfg.vocab_size - 1
    batch = make(Compression).generate(100, seed=0)
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        assert inputs[m - 1] == marker and inputs[m:] == [blank] * m
        assert all(x < blank for x in inputs[: m - 1])
        assert targets == [IGNORE] * m + inputs[:m]


def test_memorization_map_is_fixed_and_learnable_from_the_training_set() -> None:
    cfg = SMALL[Memorization]
    task = make(Memorization, n_train=256)
    content = cfg.vocab_size - 1
    assert len(set(task.value_of.tolist())) == len(task.value_of) == content // 2
    assert all(content // 2 <= v < content for v in task.value_of)
    learnt: dict[int, int] = {}
    train = task._fixed_train_set()
    for inputs, targets in zip(train.inputs.tolist(), train.targets.tolist(), strict=True):
        assert inputs[1::2] == [cfg.vocab_size - 1] * (cfg.seq_len // 2)
        assert scored(Batch(torch.tensor([inputs]), torch.tensor([targets])))[0] == list(
            range(1, cfg.seq_len, 2))
        for key, value in zip(inputs[0::2], targets[1::2], strict=True):
            assert learnt.setdefault(key, value) == value
    test = task.test_set()
    for inputs, targets in zip(test.inputs.tolist(), test.targets.tolist(), strict=True):
        assert [learnt[key] for key in inputs[0::2]] == targets[1::2]
    assert not np.array_equal(make(Memorization, seed=1).value_of, task.value_of)
