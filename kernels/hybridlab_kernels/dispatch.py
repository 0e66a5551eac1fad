"""Which implementation an op runs: an explicit argument, else $HYBRIDLAB_KERNELS, else the
device's default (Triton on CUDA, the fast torch path on CPU).

There is no silent fallback: an unknown name is a ValueError, and a backend that cannot run here
(Triton without the package, or on CPU without TRITON_INTERPRET=1) is a RuntimeError that says why.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Literal, cast

import torch

KernelBackend = Literal["ref", "torch", "triton"]

ENV_VAR = "HYBRIDLAB_KERNELS"
KNOWN_BACKENDS = ("ref", "torch", "triton")

logger = logging.getLogger("hybridlab.kernels")
_logged: set[tuple[str, str, str]] = set()


def triton_interpreted() -> bool:
    """Triton runs on CPU only through its interpreter, switched on before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _check_triton_can_run(device: torch.device, op: str, source: str) -> None:
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(
            f"{op}: the 'triton' kernel backend ({source}) needs the triton package; install "
            f"hybridlab's gpu extra, or set {ENV_VAR}=torch"
        )
    if device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            f"{op}: the 'triton' kernel backend ({source}) runs on CUDA devices; on "
            f"{device.type} it only runs under TRITON_INTERPRET=1, set before triton is imported"
        )


def kernel_backend(
    device: torch.device | str, override: str | None = None, *, op: str = "kernels"
) -> KernelBackend:
    """Pick the backend for `op` on `device`.

    Order: `override` (an op's `backend=` argument), then the HYBRIDLAB_KERNELS environment
    variable (ref | torch | triton), then "triton" on CUDA and "torch" elsewhere. The choice is
    logged once per (op, device type, backend) on the "hybridlab.kernels" logger.
    """
    device = torch.device(device)
    env = os.environ.get(ENV_VAR, "").strip()
    if override is not None:
        choice, source = override, "backend= argument"
    elif env:
        choice, source = env.lower(), f"{ENV_VAR} environment variable"
    else:
        choice = "triton" if device.type == "cuda" else "torch"
        source = f"default on {device.type}"

    if choice not in KNOWN_BACKENDS:
        allowed = ", ".join(KNOWN_BACKENDS)
        if override is not None:
            raise ValueError(
                f"backend={override!r} is not a kernel backend; allowed values: {allowed} "
                f"(the {ENV_VAR} environment variable takes the same values)"
            )
        raise ValueError(f"{ENV_VAR}={env!r} is not a kernel backend; allowed values: {allowed}")
    if choice == "triton":
        _check_triton_can_run(device, op, source)

    key = (op, device.type, choice)
    if key not in _logged:
        _logged.add(key)
        logger.info("%s on %s uses the %r kernel backend (%s)", op, device.type, choice, source)
    return cast(KernelBackend, choice)
