"""Triton kernels: block-sparse flash attention (forward + backward) and fused block pooling.

Nothing here imports diffusers. `triton_available(t)` says whether a tensor can go through Triton:
on CUDA, or on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, used by the tests).
"""

from __future__ import annotations

import functools
import os

import torch

try:  # triton is a Linux-only dependency
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(t: torch.Tensor) -> bool:
    """True when tensor ``t`` can be processed by the Triton kernels."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreter_on()


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, cached (the driver query costs host time on every call)."""
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())
