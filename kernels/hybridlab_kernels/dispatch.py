"""Which implementation an op runs: an explicit argument, else $HYBRIDLAB_KERNELS, else "torch".

There is no silent fallback: an unknown name is a ValueError, and "triton" (reserved for the Triton
kernels) is refused until those kernels ship.
"""

from __future__ import annotations

import logging
import os
from typing import Literal, cast

import torch

KernelBackend = Literal["ref", "torch"]

ENV_VAR = "HYBRIDLAB_KERNELS"
KNOWN_BACKENDS = ("ref", "torch", "triton")

logger = logging.getLogger("hybridlab.kernels")
_logged: set[tuple[str, str, str]] = set()


def kernel_backend(
    device: torch.device | str, override: str | None = None, *, op: str = "kernels"
) -> KernelBackend:
    """Pick the backend for `op` on `device`.

    Order: `override` (an op's `backend=` argument), then the HYBRIDLAB_KERNELS environment
    variable (ref | torch | triton), then "torch" on every device. The choice is logged once per
    (op, device type, backend) on the "hybridlab.kernels" logger.
    """
    device = torch.device(device)
    env = os.environ.get(ENV_VAR, "").strip()
    if override is not None:
        choice, source = override, "backend= argument"
    elif env:
        choice, source = env.lower(), f"{ENV_VAR} environment variable"
    else:
        choice, source = "torch", "default"

    if choice not in KNOWN_BACKENDS:
        allowed = ", ".join(KNOWN_BACKENDS)
        if override is not None:
            raise ValueError(
                f"backend={override!r} is not a kernel backend; allowed values: {allowed} "
                f"(the {ENV_VAR} environment variable takes the same values)"
            )
        raise ValueError(f"{ENV_VAR}={env!r} is not a kernel backend; allowed values: {allowed}")
    if choice == "triton":
        raise NotImplementedError(
            f"{op}: the 'triton' kernel backend was requested ({source}) but the Triton kernels "
            f"are not available in this build of hybridlab_kernels; use 'torch' or 'ref'"
        )

    key = (op, device.type, choice)
    if key not in _logged:
        _logged.add(key)
        logger.info("%s on %s uses the %r kernel backend (%s)", op, device.type, choice, source)
    return cast(KernelBackend, choice)
