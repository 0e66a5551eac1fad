"""SSM scan ops for hybridlab: Mamba-1 selective scan and Mamba-2 SSD, with decoding steps.

Each op lives in its own folder beside a torch-only sequential reference (`naive.py`); the public
functions dispatch between implementations through `kernel_backend`.
"""

from .dispatch import KernelBackend, kernel_backend
from .selective_scan import selective_scan, selective_state_update
from .ssd import ssd, ssd_state_update

__all__ = [
    "KernelBackend",
    "kernel_backend",
    "selective_scan",
    "selective_state_update",
    "ssd",
    "ssd_state_update",
]
