"""The Mamba-3 scan on the Triton SSD kernels: `chunked`'s algorithm with the SSD in Triton.

The SSD (`ssd.triton_ssd.ssd_triton_decay`, Mamba-2's stage kernels fed per-step decays) does the
O(L N P) work, forward and backward; the rotations, the trapezoid's weights, the diagonal
correction and the MIMO read-out around it are elementwise torch ops, differentiated by autograd.
"""

from __future__ import annotations

from torch import Tensor

from ..ssd.triton_ssd import ssd_triton_decay
from .chunked import mamba3_via
from .inputs import Mamba3Inputs
from .step import Mamba3State


def mamba3_triton(
    inputs: Mamba3Inputs,
    *,
    chunk_size: int = 64,
    initial_state: Mamba3State | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Mamba3State]:
    """`mamba3_scan` on the Triton SSD; same arguments and results."""
    return mamba3_via(ssd_triton_decay, inputs, chunk_size=chunk_size,
                      initial_state=initial_state, return_final_state=return_final_state)
