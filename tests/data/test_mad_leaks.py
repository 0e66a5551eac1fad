"""No MAD task (nor MQAR) can be solved from what a memoryless model sees: the best prediction
from a token's position and the two tokens ending there (what a width-2 convolution sees), fit on
4000 training examples, stays far from solving the task. Memorization is the exception by
design: its value is a fixed function of the previous token, learnt in the weights.

Compression, adapted to a decoder-only LM, is solved by copying the token m positions back,
which attention can do by position alone: it measures a fixed-size state only for recurrent
layers (see ``hybridlab.data.synthetic.Compression``)."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from hybridlab.data.synthetic import Compression, Memorization
from hybridlab.data.task import IGNORE
from tests.data.test_synthetic import SMALL, TASKS, make


def window_baseline_accuracy(cls) -> float:
    task = make(cls, seed=3)
    train, test = task.generate(4000, seed=1), task.test_set()
    table: dict[tuple[int, int, int], Counter] = defaultdict(Counter)
    overall: Counter = Counter()

    def seen(inputs: np.ndarray, t: int) -> tuple[int, int, int]:
        return t, int(inputs[t]), int(inputs[t - 1]) if t else -1

    for inputs, targets in zip(train.inputs.numpy(), train.targets.numpy(), strict=True):
        for t in np.flatnonzero(targets != IGNORE):
            table[seen(inputs, t)][int(targets[t])] += 1
            overall[int(targets[t])] += 1
    fallback = overall.most_common(1)[0][0]
    hits = total = 0
    for inputs, targets in zip(test.inputs.numpy(), test.targets.numpy(), strict=True):
        for t in np.flatnonzero(targets != IGNORE):
            votes = table.get(seen(inputs, t))
            hits += (votes.most_common(1)[0][0] if votes else fallback) == targets[t]
            total += 1
    return hits / total


@pytest.mark.parametrize("cls", [c for c in TASKS if c is not Memorization],
                         ids=lambda c: c.__name__)
def test_a_memoryless_predictor_does_not_solve_the_task(cls) -> None:
    assert window_baseline_accuracy(cls) < 0.4


def test_memorization_is_a_lookup_from_the_previous_token() -> None:
    assert window_baseline_accuracy(Memorization) == 1.0


def test_compression_is_solved_by_copying_at_a_fixed_offset() -> None:
    m = SMALL[Compression].seq_len // 2
    test = make(Compression).test_set()
    targets, inputs = test.targets.numpy(), test.inputs.numpy()
    scored = targets != IGNORE
    assert np.array_equal(targets[:, m:], inputs[:, :m])
    assert scored[:, m:].all() and not scored[:, :m].any()
