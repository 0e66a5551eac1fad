"""How fast a proxy-width model learns recall under hybridlab's init and under GPT-2's.

    python benchmarks/bench_init.py                 # 2 seeds, every case
    python benchmarks/bench_init.py --quick         # 1 seed, 100 steps: a smoke run

Each (case, seed) trains twice with the same data and optimiser: once from ``HybridLM``'s own
init (every matrix N(0, 1/fan_in), the tied embeddings as the head's fan-in d_model, residual
outputs shrunk by sqrt(2 n_layers)) and once re-initialised the GPT-2 way (embeddings and every
projection N(0, 0.02), residual outputs 0.02 / sqrt(2 n_layers)); the SSM-specific parameters
A, D, dt and the convolution keep the same init in both. The cases are the shipped quickstart's
MQAR (vocab 256, 64 tokens, 4 pairs, no MLPs, 600 steps of batch 32) and MAD in-context recall
(vocab 16, 32 tokens, MLP after each mixer, 1500 steps of batch 16), each with a transformer, a
pure Mamba-2 and a hybrid at d_model 64. A run stops once its test accuracy reaches 0.99; the
table gives the final accuracy, the step it reached 0.99 ("-" when it did not) and the ratio of
accuracies. One thread, so two benchmarks on two cores do not slow each other.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from hybridlab.config import ArchConfig
from hybridlab.data.tasks import make_task
from hybridlab.model import HybridLM
from hybridlab.train import TrainConfig, train

# case: (task, task knobs, steps, batch, {reference: pattern})
CASES = {
    "mqar": ("mqar", {"vocab_size": 256, "seq_len": 64, "num_kv_pairs": 4}, 600, 32,
             {"transformer": "**", "mamba2": "MM", "hybrid": "M*"}),
    "recall": ("mad:in_context_recall", {"vocab_size": 16, "seq_len": 32}, 1500, 16,
               {"transformer": "*-*-*-", "mamba2": "M-M-M-", "hybrid": "M-*-M-"}),
}
GPT2_STD = 0.02


@torch.no_grad()
def gpt2_init_(model: HybridLM, seed: int) -> None:
    """The baseline: GPT-2's fixed 0.02 on the embeddings and every projection."""
    generator = torch.Generator().manual_seed(seed)
    model.backbone.embedding.weight.normal_(0.0, GPT2_STD, generator=generator)
    residual = GPT2_STD / math.sqrt(2 * model.config.n_layers)
    for name, module in model.backbone.layers.named_modules():
        if isinstance(module, torch.nn.Linear) and "dt_proj" not in name:
            std = residual if name.endswith(("out_proj", "fc2")) else GPT2_STD
            module.weight.normal_(0.0, std, generator=generator)


def run(case: str, reference: str, seed: int, init: str,
        steps: int | None) -> tuple[int | None, float, float]:
    """(step it reached 0.99 or None, final accuracy, seconds)."""
    spec, knobs, case_steps, batch, patterns = CASES[case]
    task = make_task(spec, seed=seed, **knobs)
    arch = ArchConfig.from_pattern(patterns[reference], d_model=64, vocab_size=task.vocab_size)
    model = HybridLM(arch, seed=seed)
    if init == "gpt2":
        gpt2_init_(model, seed)
    cfg = TrainConfig(steps=steps or case_steps, batch_size=batch, lr=3e-3, warmup_steps=50,
                      eval_every=100, eval_batch_size=256, seed=seed, target=0.99, threads=1)
    started = time.perf_counter()
    solved: list[int] = []
    result = train(model, task, cfg, callback=lambda step, m: solved.append(step)
                   if m["accuracy"] >= 0.99 else None)
    return (solved[0] if solved else None), result.metrics["accuracy"], \
        time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seeds, steps = (1, 100) if args.quick else (args.seeds, None)
    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':<7} {'reference':<12} {'seed':>4} {'hybridlab':>18} {'gpt2':>18} {'ratio':>6}")
    for case in args.cases.split(","):
        for reference in CASES[case][4]:
            for seed in range(seeds):
                cells, accuracies = [], []
                for init in ("hybridlab", "gpt2"):
                    solved, accuracy, seconds = run(case, reference, seed, init, steps)
                    cells.append(f"{accuracy:.3f} @{solved or '-'} {seconds:.0f}s")
                    accuracies.append(accuracy)
                ratio = accuracies[0] / max(accuracies[1], 1e-9)
                print(f"{case:<7} {reference:<12} {seed:>4} {cells[0]:>18} {cells[1]:>18} "
                      f"{ratio:>6.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
