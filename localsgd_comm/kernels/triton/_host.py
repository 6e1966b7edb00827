"""Host-side argument handling shared by the Triton launchers.

The op schemas and their checks live in localsgd_comm/_ops.py; the launchers reuse those fake
implementations (they validate and allocate outputs of the right shape on the right device),
then add what only real kernels need: contiguity of buffers updated in place, one device.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _ops


def flat_input(t: torch.Tensor) -> torch.Tensor:
    """A read-only input as a flat contiguous buffer (a copy only when it is not contiguous)."""
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def check_inplace(t: Optional[torch.Tensor], name: str, device: torch.device) -> None:
    if t is None:
        return
    torch._check(t.is_contiguous(), lambda: f"{name} is updated in place and must be contiguous, got strides {t.stride()}")
    torch._check(t.device == device, lambda: f"{name} must be on {device}, got {t.device}")


def check_same_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == device, lambda: f"{name} must be on {device}, got {t.device}")


def check_rows(t: torch.Tensor, name: str) -> None:
    # [p, k] inputs: rows may be strided (e.g. views of one record buffer), elements may not.
    torch._check(t.dim() != 2 or t.shape[1] <= 1 or t.stride(1) == 1,
                 lambda: f"{name} rows must be contiguous (stride(1) == 1), got strides {t.stride()}")


def check_seed(seed: Optional[int]) -> None:
    if seed is not None:
        torch._check(-(1 << 63) <= seed < (1 << 64), lambda: f"seed must fit in 64 bits, got {seed}")


fakes = _ops  # the fake implementations: _quantize_fake etc.
