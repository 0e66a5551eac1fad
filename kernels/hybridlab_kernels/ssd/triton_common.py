"""Pieces the SSD Triton kernels share: buffer allocation, block sizes, launch device, softplus."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tests switch this on: every buffer a kernel must fill starts as NaN, so unwritten memory shows.
DEBUG_POISON = False

# Tiles over the chunk's time steps are BLOCK_M (rows: the step written) x BLOCK_K (the steps
# summed over); 64 x 64 suits chunk sizes 64..256 on A100/H100-class GPUs. Tiles over the head dim
# P and the state dim N are sized from the shapes by `feature_block`.
BLOCK_M = 64
BLOCK_K = 64

# The state passing walks all chunks in one program per STATE_BLOCK entries of a (P, N) state:
# batch * H * P * N / 256 programs fill a GPU, and the block stays small in registers.
STATE_BLOCK = 256

# One autotune config per kernel: the interpreter would otherwise time every candidate, and a
# single config keeps the tile sizes known at launch, where the partial-sum buffers are sized.
TILE_CONFIGS = [triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_K": BLOCK_K}, num_warps=4, num_stages=2)]
PLAIN_CONFIGS = [triton.Config({}, num_warps=4)]


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.empty, or NaN-filled under DEBUG_POISON."""
    if DEBUG_POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """The kernels' arithmetic dtype for a compute dtype (float32 or float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def row_tiles(T: int) -> int:
    """How many BLOCK_M row tiles cover a chunk of T steps."""
    return triton.cdiv(T, BLOCK_M)


def feature_block(size: int) -> int:
    """Tile width over P or N: a power of two, at least 16 (tl.dot's minimum), at most 64."""
    return min(max(triton.next_power_of_2(size), 16), 64)


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Triton launches on the current CUDA device, which need not be the tensors' device."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


@triton.jit
def softplus(v):
    # log1p(exp(v)) with torch's threshold of 20. tl has no log1p and log(1 + w) drops most of w's
    # bits at dt ~ 1e-3, so use Goldberg's log1p(w) = log(1 + w) * w / ((1 + w) - 1).
    w = tl.exp(tl.minimum(v, 20.0))
    s = 1.0 + w
    log1p = tl.where(s == 1.0, w, tl.log(s) * (w / tl.where(s == 1.0, 1.0, s - 1.0)))
    return tl.where(v > 20.0, v, log1p)


@triton.jit
def softplus_grad(v):
    # d softplus / dv = sigmoid(v), and 1 past the threshold where softplus is the identity
    return tl.where(v > 20.0, 1.0, tl.sigmoid(v))
