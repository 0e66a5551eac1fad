"""State-tracking tasks: targets against plain Python loops, scoring, seeds, knobs, no shortcut."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hybridlab.data import IGNORE, make_task, task_knobs
from hybridlab.data.state_tracking import (
    ModularAddition,
    ModularAdditionConfig,
    Parity,
    ParityConfig,
    Permutation,
    PermutationConfig,
)


def _running_by_loop(task, row):
    """The running state after each token, by the definitions, one token at a time."""
    if isinstance(task, Parity):
        out, acc = [], 0
        for bit in row:
            acc ^= int(bit)
            out.append(acc)
        return out
    if isinstance(task, ModularAddition):
        out, acc = [], 0
        for digit in row:
            acc = (acc + int(digit)) % task.config.modulus
            out.append(acc)
        return out
    perms = list(itertools.permutations(range(task.config.n_elements)))
    state = list(range(task.config.n_elements))
    out = []
    for token in row:
        g = perms[int(token)]
        state = [g[i] for i in state]  # apply g after everything so far
        out.append(perms.index(tuple(state)))
    return out


TASKS = [
    lambda score, L: Parity(
        ParityConfig(seq_len=L, score=score, train_score=score, n_test=40), seed=3),
    lambda score, L: ModularAddition(ModularAdditionConfig(
        modulus=7, seq_len=L, score=score, train_score=score, n_test=40), seed=3),
    lambda score, L: Permutation(PermutationConfig(
        n_elements=5, seq_len=L, score=score, train_score=score, n_test=40), seed=3),
    lambda score, L: Permutation(PermutationConfig(
        n_elements=3, seq_len=L, score=score, train_score=score, n_test=40), seed=4),
]


@pytest.mark.parametrize("make", TASKS)
@pytest.mark.parametrize("L", [17, 64])
def test_targets_equal_the_running_state_by_loop(make, L):
    every = make("every", L)
    batch = every.train_batch(8, torch.Generator().manual_seed(L))
    for row, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        assert targets == _running_by_loop(every, row)
    final = make("final", L)
    test = final.test_set()
    assert (test.targets[:, :-1] == IGNORE).all()
    for row, targets in zip(test.inputs.tolist(), test.targets.tolist(), strict=True):
        assert targets[-1] == _running_by_loop(final, row)[-1]
    assert int(test.inputs.max()) < final.vocab_size
    train = final.train_batch(4, torch.Generator().manual_seed(0))
    assert (train.targets[:, :-1] == IGNORE).all()


def test_default_trains_on_every_position_and_tests_the_last():
    task = make_task("state:parity", seed=0, seq_len=12, n_test=20)
    assert (task.test_set().targets[:, :-1] == IGNORE).all()
    assert (task.train_batch(4, torch.Generator().manual_seed(0)).targets != IGNORE).all()


def test_seeded_and_fingerprinted():
    a = make_task("state:permutation", seed=1, seq_len=20, n_test=50)
    b = make_task("state:permutation", seed=1, seq_len=20, n_test=50)
    c = make_task("state:permutation", seed=2, seq_len=20, n_test=50)
    assert torch.equal(a.test_set().inputs, b.test_set().inputs)
    assert not torch.equal(a.test_set().inputs, c.test_set().inputs)
    assert a.fingerprint()["hash"] == b.fingerprint()["hash"] != c.fingerprint()["hash"]
    harder = make_task("state:permutation", seed=1, seq_len=21, n_test=50)
    assert harder.fingerprint()["hash"] != a.fingerprint()["hash"]


def test_training_batches_avoid_the_test_set():
    # length 10: 1024 bit strings, so a 300-row test set is hit often by chance
    task = make_task("state:parity", seed=0, seq_len=10, n_test=300)
    test_rows = {tuple(r) for r in task.test_set().inputs.tolist()}
    batch = task.train_batch(400, torch.Generator().manual_seed(0))
    assert not test_rows & {tuple(r) for r in batch.inputs.tolist()}


def test_no_shortcut_from_the_last_tokens():
    """The final answer is uniform given the last few tokens: only the whole prefix decides."""
    task = make_task("state:modular_addition", seed=5, seq_len=64, modulus=5, n_test=4000)
    test = task.test_set()
    last, answer = test.inputs[:, -1].numpy(), test.targets[:, -1].numpy()
    for token in range(5):
        counts = np.bincount(answer[last == token], minlength=5)
        share = counts / counts.sum()
        assert np.abs(share - 0.2).max() < 0.06, (token, share)


@pytest.mark.parametrize(("spec", "knob", "value", "message"), [
    ("state:parity", "score", "middle", "score: must be one of"),
    ("state:parity", "train_score", "all", "train_score: must be one of"),
    ("state:parity", "vocab_size", 3, "vocab_size: parity has 2 tokens"),
    ("state:modular_addition", "modulus", 1, "modulus: must be >= 2"),
    ("state:permutation", "n_elements", 7, "n_elements: must be in 2..6"),
    ("state:permutation", "seq_len", "long", "seq_len: expected int"),
])
def test_bad_knobs_name_the_knob(spec, knob, value, message):
    with pytest.raises(ValueError, match=message):
        make_task(spec, seed=0, **{knob: value})


def test_specs_and_knobs():
    assert task_knobs("state:permutation")["n_elements"] == 5
    assert make_task("state:modular-addition", seed=0).vocab_size == 5
    assert make_task("state:permutation", seed=0, n_elements=4).vocab_size == 24
    with pytest.raises(ValueError, match="unknown task 'state:nope'"):
        make_task("state:nope", seed=0)
