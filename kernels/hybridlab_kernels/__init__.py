"""SSM scan ops for hybridlab: Mamba-1 selective scan, Mamba-2 SSD and Mamba-3, with decoding steps.

Each op lives in its own folder beside a torch-only sequential reference (`naive.py`); the public
functions dispatch between implementations through `kernel_backend`.
"""

from .dispatch import KernelBackend, kernel_backend
from .mamba3 import Mamba3State, mamba3_scan, mamba3_state_update
from .selective_scan import selective_scan, selective_state_update
from .ssd import ssd, ssd_state_update

__all__ = [
    "KernelBackend",
    "Mamba3State",
    "kernel_backend",
    "mamba3_scan",
    "mamba3_state_update",
    "selective_scan",
    "selective_state_update",
    "ssd",
    "ssd_state_update",
]
