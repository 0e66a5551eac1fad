"""Whole models side by side: training and decoding throughput of hybrid stacks vs a transformer.

    python benchmarks/bench_model.py                 # CPU: d_model 256, 8 layers, L 1024 and 4096
    python benchmarks/bench_model.py --quick         # tiny shapes, a smoke run
    python benchmarks/bench_model.py --device cuda

The stacks share d_model, depth and the MLPs; only the mixers differ (Megatron patterns):
  transformer     *-*-*-*-      attention (8 heads, RoPE) + SwiGLU MLP
  mamba2 hybrid   M-M-*-M-      Mamba-2 (d_state 64, headdim 32) with one attention layer
  mamba1 hybrid   m-m-*-m-      Mamba-1 (d_state 16)
  mamba3 hybrid   3-3-*-3-      Mamba-3 SISO (d_state 64, headdim 32)
Training: one optimizer step (AdamW) of `--tokens` tokens per step (batch = tokens / L) in
float32, forward + backward + step; decoding: tokens/s of single-token steps with the cache at
batch 8 after a prefill of 64 tokens. All stacks of one measurement run in one process,
interleaved round by round after a warm-up; a cell is the median over rounds, with the spread
(min-max) beside it, and the ratio is to the transformer's median. Achieved GFLOP/s uses the cost
model's FLOPs per token (training: 3x the forward). The load average is printed before and after:
other processes distort every figure, multi-threaded ones most.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from hybridlab.config import ArchConfig
from hybridlab.cost import flops_per_token
from hybridlab.layers import AttentionSpec, Mamba1Spec, Mamba2Spec, Mamba3Spec, MLPSpec
from hybridlab.model import HybridLM

VOCAB = 256


@dataclass(frozen=True)
class Sizes:
    d_model: int = 256
    lengths: tuple[int, ...] = (1024, 4096)
    tokens: int = 8192
    decode_batch: int = 8
    decode_steps: int = 32


FULL = Sizes()
QUICK = Sizes(d_model=64, lengths=(64, 128), tokens=256, decode_batch=2, decode_steps=4)


def stacks(d: int) -> dict[str, ArchConfig]:
    heads = max(1, d // 32)
    mixers = {
        "*": AttentionSpec(n_heads=heads),
        "M": Mamba2Spec(d_state=64, headdim=32),
        "m": Mamba1Spec(d_state=16),
        "3": Mamba3Spec(d_state=64, headdim=32),
    }
    patterns = {"transformer": "*-*-*-*-", "mamba2 hybrid": "M-M-*-M-",
                "mamba1 hybrid": "m-m-*-m-", "mamba3 hybrid": "3-3-*-3-"}
    out = {}
    for name, pattern in patterns.items():
        layers = tuple(MLPSpec() if c == "-" else mixers[c] for c in pattern)
        out[name] = ArchConfig(d_model=d, vocab_size=VOCAB, layers=layers)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step_seconds(model: HybridLM, opt: torch.optim.Optimizer, tokens: torch.Tensor,
                       device: str) -> float:
    sync(device)
    start = time.perf_counter()
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model: HybridLM, s: Sizes, device: str) -> float:
    """Seconds per decoding step (all `decode_batch` rows), after a prefill."""
    prompt = torch.randint(VOCAB, (s.decode_batch, 64), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    cache = model.allocate_cache(s.decode_batch, 64 + s.decode_steps)
    logits = model(prompt, cache=cache)
    token = logits[:, -1].argmax(-1)
    sync(device)
    start = time.perf_counter()
    for _ in range(s.decode_steps):
        token = model.step(token, cache).argmax(-1)
    sync(device)
    return (time.perf_counter() - start) / s.decode_steps


def spread(samples: list[float]) -> str:
    return f"{min(samples):.0f}-{max(samples):.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per cell")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    s, device = (QUICK if args.quick else FULL), args.device
    rounds = 2 if args.quick else args.rounds
    print(f"bench_model  {datetime.date.today()}  torch {torch.__version__}  device {device}")
    where = torch.cuda.get_device_name() if device == "cuda" else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    print(f"  {where};  {s}")
    print(f"  load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    configs = stacks(s.d_model)
    models = {n: HybridLM(c, seed=0, device=device) for n, c in configs.items()}
    optims = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}

    rows = []
    ratios: dict[tuple[str, int], float] = {}
    for L in s.lengths:
        batch = max(1, s.tokens // L)
        g = torch.Generator().manual_seed(L)
        tokens = torch.randint(VOCAB, (batch, L + 1), generator=g).to(device)
        times: dict[str, list[float]] = {n: [] for n in models}
        for n in models:  # warm-up
            train_step_seconds(models[n], optims[n], tokens, device)
        for _ in range(rounds):
            for n in models:
                times[n].append(train_step_seconds(models[n], optims[n], tokens, device))
        base = statistics.median(times["transformer"])
        for n, t in times.items():
            tps = [batch * L / x for x in t]
            med = statistics.median(t)
            gflops = 3 * flops_per_token(configs[n], L) * batch * L / med / 1e9
            ratios[(n, L)] = base / med
            rows.append([f"train L={L}", n, f"{batch * L / med:.0f}", spread(tps),
                         f"{base / med:.2f}x", f"{gflops:.1f}"])
    dec: dict[str, list[float]] = {n: [] for n in models}
    for n in models:
        decode_seconds(models[n], s, device)
    for _ in range(rounds):
        for n in models:
            dec[n].append(decode_seconds(models[n], s, device))
    base = statistics.median(dec["transformer"])
    for n, t in dec.items():
        med = statistics.median(t)
        tps = [s.decode_batch / x for x in t]
        gflops = flops_per_token(configs[n], 64, decode=True) * s.decode_batch / med / 1e9
        rows.append([f"decode b={s.decode_batch}", n, f"{s.decode_batch / med:.0f}", spread(tps),
                     f"{base / med:.2f}x", f"{gflops:.2f}"])

    columns = ["case", "stack", "tokens/s", "spread", "vs transformer", "GFLOP/s"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print()
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"\n  load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    short, long = s.lengths[0], s.lengths[-1]
    print("\nTargets (issue 14), training tokens/s relative to the transformer:")
    print(f"  mamba2 hybrid L={short}: {ratios[('mamba2 hybrid', short)]:.2f}x (>= 1.0); "
          f"L={long}: {ratios[('mamba2 hybrid', long)]:.2f}x (>= 1.5)")
    print(f"  mamba1 hybrid L={short}: {ratios[('mamba1 hybrid', short)]:.2f}x (>= 0.8)")
    print(f"  mamba3 hybrid L={short}: {ratios[('mamba3 hybrid', short)]:.2f}x; "
          f"L={long}: {ratios[('mamba3 hybrid', long)]:.2f}x")


if __name__ == "__main__":
    main()
