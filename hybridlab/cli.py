"""The ``hybridlab`` command: thin subcommands over typed functions."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hybridlab.config import ArchConfig, ConfigError
from hybridlab.cost import cost_report, measure_tokens_per_second
from hybridlab.model import HybridLM
from hybridlab.presets import PRESETS, preset


def load_arch(spec: str) -> ArchConfig:
    """A preset name or a path to an architecture YAML/JSON file."""
    if spec in PRESETS:
        return preset(spec)
    if not Path(spec).exists():
        raise ConfigError(
            "<config>", f"neither a file nor a preset (presets: {', '.join(sorted(PRESETS))})",
            source=spec,
        )
    return ArchConfig.load(spec)


def _bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    scale = 0
    while n >= 1024 and scale < len(units) - 1:
        n /= 1024
        scale += 1
    return f"{n:.0f} B" if scale == 0 else f"{n:.1f} {units[scale]}"


def inspect(args: argparse.Namespace) -> int:
    """Build an architecture, print its cost per layer, run it and decode a few tokens."""
    config = load_arch(args.config)
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"pattern {config.pattern}  layers {config.n_layers}  d_model {config.d_model}  "
          f"vocab {config.vocab_size}  hash {config.canonical_hash()}")
    reports = [cost_report(config, c) for c in contexts]
    header = f"{'#':>3} {'type':<10} {'params':>10} {'FLOPs/tok':>12}" + "".join(
        f" {'state@' + str(c):>13}" for c in contexts)
    print(header)
    for i, layer in enumerate(reports[0].layers):
        states = "".join(f" {_bytes(r.layers[i].state_bytes):>13}" for r in reports)
        print(f"{i:>3} {layer.type:<10} {layer.params:>10,} {layer.flops_per_token:>12,.0f}"
              + states)
    totals = "".join(f" {_bytes(r.state_bytes):>13}" for r in reports)
    print(f"{'':>3} {'total':<10} {reports[0].params:>10,} "
          f"{reports[0].flops_per_token:>12,.0f}{totals}")
    print("(state: bf16 cache, fp32 SSM state, one sequence; FLOPs: forward at the first context)")

    model = HybridLM(config, seed=args.seed).eval()
    tps = measure_tokens_per_second(model, batch_size=args.batch, seqlen=args.seqlen,
                                    seed=args.seed)
    print(f"forward throughput on {model.device}: {tps:,.0f} tokens/s "
          f"(batch {args.batch} x {args.seqlen}, torch threads {torch.get_num_threads()})")
    prompt = torch.randint(config.vocab_size, (1, 8),
                           generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    out = model.generate(prompt, args.generate)
    elapsed = time.perf_counter() - start
    print(f"decoded {args.generate} tokens with the cache in {elapsed:.2f} s: "
          f"{out[0, 8:].tolist()}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"inspect": inspect}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help=inspect.__doc__, description=inspect.__doc__)
    p.add_argument("config", nargs="?", default="tiny-hybrid",
                   help="architecture file or preset name (default: tiny-hybrid)")
    p.add_argument("--contexts", default="1024,8192,131072",
                   help="comma-separated context lengths for the cost table")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--generate", type=int, default=16, help="tokens to decode")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, ValueError) as err:
        print(f"hybridlab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
