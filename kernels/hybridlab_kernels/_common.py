"""Helpers shared by the ops: compute dtype, autocast guard, dt prologue, epilogue, shapes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the scans run in: float32, or float64 when the inputs already are."""
    return torch.promote_types(x.dtype, torch.float32)


@contextlib.contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Turn autocast off so einsum/matmul stay in the compute dtype.

    Under bf16 autocast the layers hand us bf16 activations; the recurrence itself must run in
    fp32 (decays multiply over thousands of steps), so autocast may not re-cast the matmuls.
    """
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


def prepare_dt(
    dt: Tensor, bias: Tensor | None, softplus: bool, bias_shape: Sequence[int]
) -> Tensor:
    """dt + bias (bias viewed as `bias_shape` to broadcast), then softplus if asked."""
    if bias is not None:
        dt = dt + bias.to(dt.dtype).reshape(*bias_shape)
    if softplus:
        dt = F.softplus(dt)
    return dt


def check_shape(op: str, name: str, tensor: Tensor, expected: Sequence[tuple[str, int]]) -> None:
    """Raise ValueError naming `name` unless `tensor.shape` equals the named sizes in `expected`."""
    got = tuple(tensor.shape)
    if got != tuple(size for _, size in expected):
        want = ", ".join(f"{symbol}={size}" for symbol, size in expected)
        raise ValueError(f"{op}: {name} must have shape ({want}), got {got}")


def skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D * x, then * silu(z); `D` must already broadcast against `x`."""
    if D is not None:
        y = y + D.to(y.dtype) * x
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def check_grouped(
    op: str,
    name: str,
    tensor: Tensor,
    expected: Sequence[tuple[str, int]],
    channels: tuple[str, int],
) -> None:
    """Like `check_shape`, but the size named "G" is free as long as it divides `channels`."""
    symbols = [symbol for symbol, _ in expected]
    G = tensor.shape[symbols.index("G")] if tensor.dim() == len(expected) else 0
    sizes = tuple(G if symbol == "G" else size for symbol, size in expected)
    channel_name, channel_count = channels
    if G <= 0 or channel_count % G != 0 or tuple(tensor.shape) != sizes:
        want = ", ".join(s if s == "G" else f"{s}={size}" for s, size in expected)
        raise ValueError(
            f"{op}: {name} must have shape ({want}) with G dividing "
            f"{channel_name}={channel_count}, got {tuple(tensor.shape)}"
        )


def check_same_shape(op: str, name: str, tensor: Tensor, other_name: str, other: Tensor) -> None:
    """Raise ValueError naming `name` unless it has the same shape as `other`."""
    if tensor.shape != other.shape:
        raise ValueError(
            f"{op}: {name} must have the same shape as {other_name} {tuple(other.shape)}, "
            f"got {tuple(tensor.shape)}"
        )
