"""Scan kernels side by side: ours vs the references, forward and forward + backward.

    python benchmarks/bench_scan.py              # CPU, batch 4, L in {256, 1024, 4096}
    python benchmarks/bench_scan.py --quick      # tiny shapes, a smoke run
    python benchmarks/bench_scan.py --device cuda

Cases (float32):
  mamba1     selective_scan, d_inner 256, d_state 16, with D, z, delta_bias and softplus:
             ours ("torch" backend; also "triton" on CUDA) vs `selective_scan_ref`;
  mamba2     ssd, 8 heads x headdim 32, d_state 64, 1 group, chunk 64, with D, dt_bias and
             softplus: ours vs the paper-style minimal chunked SSD (`ssd_minimal.py`) vs `ssd_ref`;
  mamba3     mamba3_scan (SISO), Mamba-2's heads, headdim and d_state (equal state size: 8 x 32 x
             64 per row), rotary angles on half of B and C, with D: ours vs its sequential
             reference (`mamba3_ref`), and against the mamba2 rows;
  attention  causal scaled_dot_product_attention at the same width (8 heads x 32); on CUDA also
             its flash backend and flash_attn, in bfloat16, where available.

Timing: all implementations of one (case, L) run in one process, interleaved round by round
after a warm-up call; a cell is the median of its calls. "fwd" is an inference forward under
torch.no_grad; "fwd+bwd" a forward with autograd plus the backward of a fixed upstream gradient.
Implementations whose warm-up call takes over 1 s get at most 3 calls, over 10 s one call (the
n columns). Other processes on the machine distort every figure, multi-threaded ones most: a
parallel region waits for its slowest thread, so the load average is printed before and after.

Peak memory on CPU: the peak resident set size (VmHWM) during one call minus the resident size
just before it, with the inputs already allocated and the peak reset through /proc/self/
clear_refs, in a fresh subprocess per cell (allocator caches would hide memory a previous call
freed). It counts every page the call touches, allocator slack included. `--quick` measures all
cells in one subprocess, so its later cells under-report. On CUDA: torch.cuda.max_memory_allocated
minus the allocation before the call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlab_kernels import mamba3_scan, selective_scan, ssd

# Run as a script, this file's folder is on sys.path and holds the baseline.
from ssd_minimal import ssd_paper  # isort: skip

# Implementations whose warm-up call takes longer get fewer timed calls.
SLOW_CALL_S = 1.0
VERY_SLOW_CALL_S = 10.0


@dataclass(frozen=True)
class Sizes:
    """The shapes one run measures; `--quick` swaps in tiny ones."""

    batch: int = 4
    lengths: tuple[int, ...] = (256, 1024, 4096)
    mamba1_dim: int = 256
    mamba1_N: int = 16
    heads: int = 8
    headdim: int = 32
    mamba2_groups: int = 1
    mamba2_N: int = 64
    chunk: int = 64


FULL = Sizes()
QUICK = Sizes(
    batch=1, lengths=(32, 64), mamba1_dim=16, mamba1_N=4, heads=2, headdim=8, mamba2_N=8, chunk=16
)


@dataclass
class Impl:
    """One implementation of a case: `run(inputs)` returns the output to differentiate."""

    name: str
    run: Callable[[dict[str, Tensor]], Tensor]
    dtype: torch.dtype = torch.float32


def mamba1_inputs(s: Sizes, L: int, device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Mamba-1 at its initialisation's magnitudes: dt in [1e-3, 0.1], A = -(1..N) per channel."""
    g = torch.Generator().manual_seed(0)
    dim, N = s.mamba1_dim, s.mamba1_N
    dt = torch.exp(math.log(1e-3) + torch.rand(s.batch, dim, L, generator=g) * math.log(100))
    bias = 0.1 * torch.randn(dim, generator=g)
    tensors = {
        "u": torch.randn(s.batch, dim, L, generator=g),
        # softplus^-1(dt), minus the bias the op adds back
        "delta": dt + torch.log(-torch.expm1(-dt)) - bias[:, None],
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(s.batch, N, L, generator=g),
        "C": torch.randn(s.batch, N, L, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(s.batch, dim, L, generator=g),
        "delta_bias": bias,
    }
    return {k: v.to(device, dtype).requires_grad_() for k, v in tensors.items()}


def mamba2_inputs(s: Sizes, L: int, device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Mamba-2 at its initialisation's magnitudes: dt in [1e-3, 0.1], A in [-16, -1]."""
    g = torch.Generator().manual_seed(0)
    H, P, G, N = s.heads, s.headdim, s.mamba2_groups, s.mamba2_N
    dt = torch.exp(math.log(1e-3) + torch.rand(s.batch, L, H, generator=g) * math.log(100))
    bias = 0.1 * torch.randn(H, generator=g)
    tensors = {
        "x": torch.randn(s.batch, L, H, P, generator=g),
        "dt": dt + torch.log(-torch.expm1(-dt)) - bias,
        "A": -(1 + 15 * torch.rand(H, generator=g)),
        "B": torch.randn(s.batch, L, G, N, generator=g),
        "C": torch.randn(s.batch, L, G, N, generator=g),
        "D": torch.ones(H),
        "dt_bias": bias,
    }
    return {k: v.to(device, dtype).requires_grad_() for k, v in tensors.items()}


def mamba3_inputs(s: Sizes, L: int, device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Mamba-3 at mamba_ssm's Mamba3 init magnitudes: dt in [1e-3, 0.1], A = -softplus(.) per
    token, unit-RMS B and C with biases 1, rotary angles on half of the state."""
    g = torch.Generator().manual_seed(0)
    H, P, N = s.heads, s.headdim, s.mamba2_N
    dt = torch.exp(math.log(1e-3) + torch.rand(s.batch, L, H, generator=g) * math.log(100))
    A = -F.softplus(torch.randn(s.batch, L, H, generator=g)).clamp(min=1e-4)
    tensors = {
        "q": torch.randn(s.batch, L, 1, 1, N, generator=g),
        "k": torch.randn(s.batch, L, 1, 1, N, generator=g),
        "v": torch.randn(s.batch, L, H, P, generator=g),
        "adt": A * dt,
        "dt": dt,
        "trap": torch.randn(s.batch, L, H, generator=g),
        "q_bias": torch.ones(H, 1, N),
        "k_bias": torch.ones(H, 1, N),
        "angles": torch.randn(s.batch, L, N // 4, generator=g),
        "D": torch.ones(H),
    }
    return {k: v.to(device, dtype).requires_grad_() for k, v in tensors.items()}


def attention_inputs(s: Sizes, L: int, device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (s.batch, s.heads, L, s.headdim)
    return {
        name: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
        for name in ("q", "k", "v")
    }


INPUTS = {
    "mamba1": mamba1_inputs,
    "mamba2": mamba2_inputs,
    "mamba3": mamba3_inputs,
    "attention": attention_inputs,
}


def mamba1_impls(s: Sizes, device: str) -> list[Impl]:
    def op(backend: str) -> Callable[[dict[str, Tensor]], Tensor]:
        def run(t: dict[str, Tensor]) -> Tensor:
            return selective_scan(**t, delta_softplus=True, backend=backend)

        return run

    ours = [Impl("ours (triton)", op("triton"))] if device == "cuda" else []
    return [*ours, Impl("ours", op("torch")), Impl("selective_scan_ref", op("ref"))]


def mamba2_impls(s: Sizes, device: str) -> list[Impl]:
    def op(backend: str) -> Callable[[dict[str, Tensor]], Tensor]:
        def run(t: dict[str, Tensor]) -> Tensor:
            return ssd(**t, chunk_size=s.chunk, dt_softplus=True, backend=backend)

        return run

    def paper(t: dict[str, Tensor]) -> Tensor:
        return ssd_paper(**t, chunk_size=s.chunk, dt_softplus=True)

    ours = [Impl("ours (triton)", op("triton"))] if device == "cuda" else []
    return [
        *ours,
        Impl("ours", op("torch")),
        Impl("paper minimal SSD", paper),
        Impl("ssd_ref", op("ref")),
    ]


def mamba3_impls(s: Sizes, device: str) -> list[Impl]:
    def op(backend: str) -> Callable[[dict[str, Tensor]], Tensor]:
        def run(t: dict[str, Tensor]) -> Tensor:
            return mamba3_scan(**t, chunk_size=s.chunk, backend=backend)

        return run

    ours = [Impl("ours (triton)", op("triton"))] if device == "cuda" else []
    return [*ours, Impl("ours", op("torch")), Impl("mamba3_ref", op("ref"))]


def attention_impls(s: Sizes, device: str) -> list[Impl]:
    def sdpa(t: dict[str, Tensor]) -> Tensor:
        return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True)

    impls = [Impl("sdpa", sdpa)]
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash(t: dict[str, Tensor]) -> Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa(t)

        impls.append(Impl("sdpa flash (bf16)", sdpa_flash, torch.bfloat16))
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            pass
        else:

            def flash(t: dict[str, Tensor]) -> Tensor:
                # flash_attn takes (batch, L, heads, headdim)
                q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))
                return flash_attn_func(q, k, v, causal=True)

            impls.append(Impl("flash_attn (bf16)", flash, torch.bfloat16))
    return impls


IMPLS = {
    "mamba1": mamba1_impls,
    "mamba2": mamba2_impls,
    "mamba3": mamba3_impls,
    "attention": attention_impls,
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def call(impl: Impl, inputs: dict[str, Tensor], grad_out: Tensor | None, device: str) -> float:
    """Seconds for one forward (grad_out None, under no_grad) or forward + backward."""
    for t in inputs.values():
        t.grad = None
    sync(device)
    start = time.perf_counter()
    if grad_out is None:
        with torch.no_grad():
            impl.run(inputs)
    else:
        impl.run(inputs).backward(grad_out)
    sync(device)
    return time.perf_counter() - start


def upstream_grad(impl: Impl, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        y = impl.run(inputs)
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)


def time_case(
    s: Sizes, op: str, L: int, impls: list[Impl], device: str, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Interleaved timings, {impl name: {"fwd": [seconds, ...], "fwdbwd": [...]}}."""
    inputs = {dtype: INPUTS[op](s, L, device, dtype) for dtype in {i.dtype for i in impls}}
    grads = {i.name: upstream_grad(i, inputs[i.dtype]) for i in impls}
    counts = {}
    for impl in impls:
        warm_up = call(impl, inputs[impl.dtype], grads[impl.name], device)
        if warm_up > VERY_SLOW_CALL_S:
            counts[impl.name] = 1
        elif warm_up > SLOW_CALL_S:
            counts[impl.name] = min(repeats, 3)
        else:
            counts[impl.name] = repeats
    times: dict[str, dict[str, list[float]]] = {i.name: {"fwd": [], "fwdbwd": []} for i in impls}
    for round_ in range(repeats):
        for impl in impls:
            if round_ < counts[impl.name]:
                x = inputs[impl.dtype]
                times[impl.name]["fwd"].append(call(impl, x, None, device))
                times[impl.name]["fwdbwd"].append(call(impl, x, grads[impl.name], device))
    return times


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            name, value = line.split(":", 1)
            if name == key:
                return int(value.split()[0])
    raise KeyError(key)


def measure_memory_here(specs: list[dict]) -> list[float]:
    """Peak MiB of one call per spec {quick, op, L, impl, mode, device}, in this process."""
    peaks = []
    for spec in specs:
        s = QUICK if spec["quick"] else FULL
        op, L, device = spec["op"], spec["L"], spec["device"]
        impl = next(i for i in IMPLS[op](s, device) if i.name == spec["impl"])
        # one tiny call first: lazy library set-up (thread pools, autograd engine) is not the
        # op's memory, and its few freed pages cannot hide a full-size call's peak
        tiny = INPUTS[op](s, s.chunk, device, impl.dtype)
        call(impl, tiny, upstream_grad(impl, tiny), device)
        del tiny
        inputs = INPUTS[op](s, L, device, impl.dtype)
        grad_out = upstream_grad(impl, inputs) if spec["mode"] == "fwdbwd" else None
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            call(impl, inputs, grad_out, device)
            peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            before = _proc_status_kib("VmRSS")
            call(impl, inputs, grad_out, device)
            peaks.append((_proc_status_kib("VmHWM") - before) / 1024)
        del inputs, grad_out
    return peaks


def measure_memory(specs: list[dict], *, isolate: bool, threads: int) -> list[float]:
    """Peak MiB per spec; on CPU in subprocesses, one per spec if `isolate`, else one for all."""
    if specs[0]["device"] == "cuda":
        return measure_memory_here(specs)
    peaks: list[float] = []
    for group in [[spec] for spec in specs] if isolate else [specs]:
        command = [sys.executable, __file__, "--threads", str(threads)]
        out = subprocess.run(
            [*command, "--measure-memory", json.dumps(group)],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks.extend(json.loads(out.stdout.strip().splitlines()[-1]))
    return peaks


def matmul_gflops(device: str, n: int) -> float:
    """Achieved fp32 GFLOP/s of an n x n x n matmul on this device (median of 5)."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    a @ b
    samples = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        samples.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(samples) / 1e9


def ssd_flops(s: Sizes, L: int) -> tuple[float, float]:
    """Matmul FLOPs of our chunked SSD, (forward, forward + backward): FLOP_FORMULA."""
    H, P, G, N, T = s.heads, s.headdim, s.mamba2_groups, s.mamba2_N, min(s.chunk, L)
    chunks = s.batch * -(-L // T)
    fwd = 2 * chunks * (G * T * T * N + H * T * T * P + 2 * H * T * N * P)
    bwd = 2 * chunks * (3 * G * T * T * N + 2 * H * T * T * P + 4 * H * T * N * P)
    return fwd, fwd + bwd


FLOP_FORMULA = """\
SSD matmul FLOPs per batch row and chunk (T = chunk, G groups, H heads of P, state N):
  fwd  2 (G T^2 N + H T^2 P + 2 H T N P)       C B^T, scores @ dt x, chunk states, readout
  bwd  2 (3 G T^2 N + 2 H T^2 P + 4 H T N P)   C B^T again and the eight gradient matmuls
  (T x T blocks counted dense, causal half included; elementwise work not counted)"""


def format_table(columns: tuple[str, ...], rows: list[list[str]], *, left: int) -> str:
    """Aligned text table; the first `left` columns flush left, the rest flush right."""
    widths = [
        max([len(c)] + [len(r[i]) for r in rows if i < len(r)]) for i, c in enumerate(columns)
    ]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()

    return "\n".join([line(columns), "-" * len(line(columns)), *map(line, rows)])


def fmt_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e3:.2f}" if samples else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 calls per cell")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per cell")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    parser.add_argument("--measure-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(measure_memory_here(json.loads(args.measure_memory))))
        return
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    s = QUICK if args.quick else FULL
    repeats = 2 if args.quick else args.repeats

    print(f"bench_scan  {datetime.date.today()}  torch {torch.__version__}  device {device}")
    if device == "cuda":
        print(f"  {torch.cuda.get_device_name()}")
    else:
        print(f"  {platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    print(f"  {s}")
    print(f"  load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"  ms: median of n calls, interleaved; calls over {SLOW_CALL_S:.0f} s get n <= 3, over"
        f" {VERY_SLOW_CALL_S:.0f} s n = 1"
    )
    print("  speedup: that row's time / ours;  mem ratio: ours' peak / that row's peak")

    results: dict[tuple[str, int, str], dict] = {}
    for op in IMPLS:
        impls = IMPLS[op](s, device)
        for L in s.lengths:
            for name, t in time_case(s, op, L, impls, device, repeats).items():
                results[(op, L, name)] = {"times": t}
    if not args.no_memory:
        specs = [
            {"quick": args.quick, "op": op, "L": L, "impl": name, "mode": mode, "device": device}
            for op, L, name in results
            for mode in ("fwd", "fwdbwd")
        ]
        threads = torch.get_num_threads()
        peaks = iter(measure_memory(specs, isolate=not args.quick, threads=threads))
        for r in results.values():
            r["mem"] = {"fwd": next(peaks), "fwdbwd": next(peaks)}

    columns = ("op", "L", "impl", "fwd ms", "n", "fwd+bwd ms", "n", "fwd MiB", "f+b MiB")
    rows = []
    for (op, L, name), r in results.items():
        t, mem = r["times"], r.get("mem")
        row = [op, str(L), name, fmt_ms(t["fwd"]), str(len(t["fwd"]))]
        row += [fmt_ms(t["fwdbwd"]), str(len(t["fwdbwd"]))]
        row += [f"{mem['fwd']:.1f}", f"{mem['fwdbwd']:.1f}"] if mem else ["-", "-"]
        ours = results.get((op, L, "ours"))
        if ours is not None and name != "ours":
            speed = [
                statistics.median(t[m]) / statistics.median(ours["times"][m])
                for m in ("fwd", "fwdbwd")
            ]
            row.append(f"{speed[0]:.2f}x / {speed[1]:.2f}x")
            if mem:
                ratio = [ours["mem"][m] / max(mem[m], 0.1) for m in ("fwd", "fwdbwd")]
                row.append(f"{ratio[0]:.2f} / {ratio[1]:.2f}")
        rows.append(row)
    columns += ("speedup fwd / f+b", "mem ratio fwd / f+b")
    print()
    print(format_table(columns, rows, left=3))

    def med(op: str, L: int, name: str, mode: str = "fwdbwd") -> float:
        return statistics.median(results[(op, L, name)]["times"][mode])

    print()
    print(FLOP_FORMULA)
    n = 256 if args.quick else 2048
    print(f"  fp32 matmul {n}x{n}x{n} on this device: {matmul_gflops(device, n):.1f} GFLOP/s")
    for L in s.lengths:
        fwd, total = ssd_flops(s, L)
        print(
            f"  L={L:<5} ours: fwd {fwd / med('mamba2', L, 'ours', 'fwd') / 1e9:.1f} GFLOP/s, "
            f"fwd+bwd {total / med('mamba2', L, 'ours') / 1e9:.1f} GFLOP/s"
        )

    mid, longest = s.lengths[len(s.lengths) // 2], s.lengths[-1]
    print(f"  load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("Acceptance (issue 'Scan kernels'):")
    r1 = med("mamba2", longest, "paper minimal SSD") / med("mamba2", longest, "ours")
    print(f"  1. mamba2 fwd+bwd, L={longest}: {r1:.2f}x faster than the paper minimal SSD (>= 1.5)")
    r2 = med("mamba1", mid, "selective_scan_ref") / med("mamba1", mid, "ours")
    print(f"  2. mamba1 fwd+bwd, L={mid}: {r2:.2f}x faster than selective_scan_ref (>= 10)")
    for op in ("mamba1", "mamba2"):
        steps = ", ".join(
            f"L x{b // a} -> time x{med(op, b, 'ours') / med(op, a, 'ours'):.2f}"
            for a, b in zip(s.lengths, s.lengths[1:], strict=False)
        )
        print(f"  3. {op} ours fwd+bwd: {steps} (linear: time x L)")
    if not args.no_memory:
        for op, ref in (("mamba1", "selective_scan_ref"), ("mamba2", "ssd_ref"),
                        ("mamba3", "mamba3_ref")):
            ours, naive = (results[(op, longest, n)]["mem"]["fwdbwd"] for n in ("ours", ref))
            print(
                f"  4. {op} fwd+bwd peak, L={longest}: ours {ours:.1f} MiB, {ref} {naive:.1f} MiB:"
                f" {ours / max(naive, 0.1):.2f}x (<= 2)"
            )

    r5 = med("mamba3", mid, "mamba3_ref") / med("mamba3", mid, "ours")
    print(f"  5. mamba3 fwd+bwd, L={mid}: {r5:.2f}x faster than mamba3_ref (>= 10)")
    steps = ", ".join(
        f"L x{b // a} -> time x{med('mamba3', b, 'ours') / med('mamba3', a, 'ours'):.2f}"
        for a, b in zip(s.lengths, s.lengths[1:], strict=False)
    )
    print(f"  6. mamba3 ours fwd+bwd: {steps} (linear: time x L)")
    for L in s.lengths:
        ratio = [med("mamba3", L, "ours", m) / med("mamba2", L, "ours", m)
                 for m in ("fwd", "fwdbwd")]
        mem = ""
        if not args.no_memory:
            m3, m2 = (results[(op, L, "ours")]["mem"]["fwdbwd"] for op in ("mamba3", "mamba2"))
            mem = f", fwd+bwd peak {m3:.1f} vs {m2:.1f} MiB"
        print(f"  7. mamba3 vs mamba2 at equal state, L={L}: time x{ratio[0]:.2f} fwd, "
              f"x{ratio[1]:.2f} fwd+bwd{mem}")

if __name__ == "__main__":
    main()
