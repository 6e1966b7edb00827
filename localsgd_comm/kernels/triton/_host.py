"""Host-side argument handling shared by the Triton launchers.

The op schemas and their checks live in localsgd_comm/_ops.py; the launchers reuse those fake
implementations (they validate and allocate outputs of the right shape on the right device),
then add what only real kernels need: contiguity of buffers updated in place, one device.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

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


def tensor_device(args, kwargs) -> Optional[torch.device]:
    """The device of the first tensor argument (the ops' first tensor sets their device)."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def on_tensor_device(fn: Callable) -> Callable:
    """Run a launcher with its tensors' CUDA device current. A Triton launch goes to the current
    device and its current stream: without this guard, a tensor on cuda:1 while cuda:0 is current
    would be processed by a kernel launched on device 0 (an illegal address, or a stream ordered
    against the wrong device's work). CPU tensors (the interpreter) need no guard."""
    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        dev = tensor_device(args, kwargs)
        guard = torch.cuda.device(dev) if dev is not None and dev.type == "cuda" else contextlib.nullcontext()
        with guard:
            return fn(*args, **kwargs)

    launcher.on_tensor_device = True
    return launcher


fakes = _ops  # the fake implementations: _quantize_fake etc.
