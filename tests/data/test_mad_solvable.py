"""Every MAD task can be learnt: a model able to solve it in principle (one holding attention for
the recall and copying tasks, an MLP for memorization) reaches high test accuracy within a small
budget. With ``test_mad_leaks`` (nothing memoryless solves them), this pins that the tasks
measure what they are meant to, and that the shipped proxy width can learn each.

The model is the proxy's Mamba-2 / attention hybrid at d_model 64 (attention finds the earlier
occurrence, Mamba-2's convolution carries the previous token); the task sizes are mad.yaml's.
"""

import pytest
import torch

from hybridlab.config import ArchConfig
from hybridlab.data.tasks import make_task
from hybridlab.layers import AttentionSpec, Mamba2Spec
from hybridlab.model import HybridLM
from hybridlab.train import TrainConfig, train

pytestmark = pytest.mark.slow

# task: (knobs, steps, accuracy it must reach)
BUDGETS = {
    "mad:in_context_recall": ({"seq_len": 32}, 600, 0.95),
    "mad:noisy_in_context_recall": ({"seq_len": 32}, 600, 0.95),
    "mad:fuzzy_in_context_recall": ({"seq_len": 32}, 1500, 0.9),
    "mad:selective_copying": ({"seq_len": 32, "num_tokens_to_copy": 4}, 1200, 0.95),
    "mad:compression": ({"seq_len": 32}, 400, 0.95),
    "mad:memorization": ({"seq_len": 32}, 600, 0.95),
}


@pytest.mark.parametrize("name", list(BUDGETS))
def test_a_capable_model_learns_the_task(name: str) -> None:
    knobs, steps, needed = BUDGETS[name]
    task = make_task(name, seed=5, n_test=512, **knobs)
    config = ArchConfig.from_pattern(
        "M-*-M-", d_model=64, vocab_size=task.vocab_size,
        mamba2=Mamba2Spec(d_state=16, headdim=16, chunk_size=32),
        attention=AttentionSpec(n_heads=2))
    # One thread: on a busy 2-core machine two threads wait on each other at every op.
    cfg = TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=50, eval_every=100,
                      eval_batch_size=256, target=0.99, seed=5, threads=1)
    threads = torch.get_num_threads()
    try:
        result = train(HybridLM(config, seed=5), task, cfg)
    finally:
        torch.set_num_threads(threads)
    assert result.metrics["accuracy"] >= needed, (name, result.metrics, result.status)
