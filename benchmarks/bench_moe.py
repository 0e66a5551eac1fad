"""The MoE layer's routed path side by side with its baselines, forward and forward + backward.

    python benchmarks/bench_moe.py             # CPU, d_model 256, 8 experts, top-2, T up to 16k
    python benchmarks/bench_moe.py --quick     # tiny shapes, a smoke run
    python benchmarks/bench_moe.py --threads 1

Implementations, each on the same layer (float32, one shared expert off):
  routed      hybridlab's ``MoE.forward``: tokens sorted by expert, one matmul pair per expert on
              its contiguous rows, index_add_ back (dropless);
  per-token   the reference the tests compare against: a Python loop over tokens, each through
              its top-k experts (timed on at most ``--loop-tokens`` tokens and scaled to T, since
              it is linear in T; the n column says how many calls);
  all-experts every expert on every token, weighted by its gate (zero where not chosen): the
              capacity-free batched alternative, E / top_k times the routed FLOPs;
  dense-mlp   a SwiGLU MLP of equal active parameters (hidden = top_k * expert width): the cost
              of the same compute without routing.

Before timing, every implementation's output is checked against the routed one. Timing: all
implementations of one T run in one process, interleaved round by round after a warm-up call; a
cell is the median of its calls, with the min-max spread. The load average is printed before
and after: other processes on the machine distort every figure.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybridlab.layers import GatedMLP, MLPSpec, MoE, MoESpec, build_layer


@dataclass(frozen=True)
class Sizes:
    d_model: int = 256
    n_experts: int = 8
    top_k: int = 2
    tokens: tuple[int, ...] = (1024, 4096, 16384)
    loop_tokens: int = 512


FULL = Sizes()
QUICK = Sizes(d_model=32, n_experts=4, top_k=2, tokens=(64, 256), loop_tokens=64)


def make_layer(s: Sizes, seed: int) -> MoE:
    layer = build_layer(MoESpec(n_experts=s.n_experts, top_k=s.top_k), s.d_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # unit-scale weights: decisive routing, O(1) outputs
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return layer.eval()


def per_token(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    hidden = layer.d_hidden
    for t in range(x.shape[0]):
        v = x[t]
        probs = torch.softmax(layer.router.weight @ v, dim=-1)
        top, chosen = probs.topk(layer.top_k)
        top = top / top.sum()
        for weight, e in zip(top, chosen.tolist(), strict=True):
            value, gate = (layer.w1[e] @ v).split(hidden)
            out[t] = out[t] + weight * (layer.w2[e] @ (value * F.silu(gate)))
    return out


def all_experts(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    _, _, experts, weights = layer.route(x)
    gates = torch.zeros(x.shape[0], layer.n_experts, dtype=weights.dtype).scatter(
        1, experts, weights)  # (T, E), zero where not chosen
    value, gate = torch.einsum("td,ehd->teh", x, layer.w1).chunk(2, dim=-1)
    y = torch.einsum("teh,edh->ted", value * F.silu(gate), layer.w2)
    return (y * gates[..., None].to(y.dtype)).sum(1)


def dense_equal_active(s: Sizes, layer: MoE, seed: int) -> GatedMLP:
    hidden = s.top_k * layer.d_hidden
    mlp = GatedMLP(s.d_model, MLPSpec(multiplier=hidden / s.d_model, multiple_of=hidden))
    assert mlp.d_hidden == hidden
    mlp.reset_parameters(torch.Generator().manual_seed(seed), n_layers=2)
    return mlp


def time_call(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        leaf = x.detach().requires_grad_(True)
        fn(leaf).sum().backward()
    else:
        with torch.no_grad():
            fn(x)
    return time.perf_counter() - start


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 calls per cell")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per cell")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    repeats = 2 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    layer = make_layer(s, 0)
    mlp = dense_equal_active(s, layer, 1)
    print(f"MoE d_model {s.d_model}, {s.n_experts} experts of width {layer.d_hidden}, top-{s.top_k}"
          f"; dense MLP of width {mlp.d_hidden} (equal active parameters); float32, "
          f"{torch.get_num_threads()} threads; load average {load()}")
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "routed": layer, "per-token": lambda x: per_token(layer, x),
        "all-experts": lambda x: all_experts(layer, x), "dense-mlp": mlp,
    }
    header = (f"{'T':>6} {'pass':<8} {'impl':<12} {'ms':>10} {'spread':>17} {'n':>3} "
              f"{'Mtok/s':>8} {'routed x':>9}")
    print(header)
    for tokens in s.tokens:
        x = torch.randn(tokens, s.d_model, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            want = layer(x)
            head = x[: s.loop_tokens]
            checks = {"per-token": (per_token(layer, head), want[: s.loop_tokens]),
                      "all-experts": (all_experts(layer, x), want)}
        for name, (got, ref) in checks.items():
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=name)
        for backward in (False, True):
            inputs = {name: head if name == "per-token" else x for name in impls}
            samples: dict[str, list[float]] = {name: [] for name in impls}
            for name, fn in impls.items():
                time_call(fn, inputs[name], backward)  # warm-up
            for _ in range(repeats):
                for name, fn in impls.items():
                    scale = tokens / inputs[name].shape[0]
                    samples[name].append(time_call(fn, inputs[name], backward) * scale)
            routed = statistics.median(samples["routed"])
            for name, times in samples.items():
                median = statistics.median(times)
                spread = f"{min(times) * 1e3:.2f}-{max(times) * 1e3:.2f}"
                print(f"{tokens:>6} {'fwd+bwd' if backward else 'fwd':<8} {name:<12} "
                      f"{median * 1e3:>10.2f} {spread:>17} {len(times):>3} "
                      f"{tokens / median / 1e6:>8.3f} {median / routed:>9.2f}")
    print(f"load average after: {load()}", file=sys.stdout)


if __name__ == "__main__":
    main()
