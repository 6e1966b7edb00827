"""CUDA implementations of the ops: CUDA C++ ("native") or Triton, one registration per op.

Choice (made once, at the first CUDA call or :func:`active_implementation`, then logged):

* ``LOCALSGD_COMM_CUDA_IMPL=native``: the CUDA C++ kernels (``localsgd_comm._C.cuda_*``);
  an error if the extension was built without CUDA.
* ``LOCALSGD_COMM_CUDA_IMPL=triton``: the Triton kernels (``localsgd_comm.kernels.triton``);
  an error if triton cannot be imported.
* unset: native when the extension has CUDA kernels, else Triton when triton is installed,
  else "none": every op on a CUDA tensor raises, naming the reason. Never a silent fallback.

Importing this module is cheap and works on machines without CUDA or triton: it registers
thin dispatchers only; triton is imported at the first CUDA call that needs it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Optional

import torch

from .. import _C
from .._ops import NAMESPACE

log = logging.getLogger("localsgd_comm")

ENV_VAR = "LOCALSGD_COMM_CUDA_IMPL"
IMPLEMENTATIONS = ("native", "triton")
OP_NAMES = (
    "quantize",
    "dequantize",
    "compress_delta",
    "dequantize_reduce",
    "dequantize_reduce_requantize",
    "outer_nesterov_step",
    "outer_nesterov_step_compressed",
)

_choice: Optional[str] = None
_reason: str = ""
_table: Optional[dict] = None


def _native_available() -> bool:
    return bool(getattr(_C, "with_cuda", False))


def arch_supported(arch_list: str, capability) -> bool:
    """Whether code built for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax, e.g. "8.0;9.0+PTX")
    runs on a GPU of compute ``capability`` (major, minor): machine code of the same major
    version and a minor at or below it (CUDA's binary compatibility), or PTX of an architecture
    at or below it (the driver compiles it at load time)."""
    cap = tuple(capability)
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        major, _, minor = item.replace("+PTX", "").partition(".")
        try:
            arch = (int(major), int(minor or 0))
        except ValueError:
            continue
        if (arch[0] == cap[0] and arch[1] <= cap[1]) or (ptx and arch <= cap):
            return True
    return False


def _native_runs_here() -> Optional[str]:
    """None when the CUDA C++ kernels can run on the current GPU, else why not."""
    try:
        from .._build_info import CUDA_ARCH_LIST as archs  # written by setup.py
    except ImportError:
        archs = None
    if archs is None or not torch.cuda.is_available():
        return None
    cap = torch.cuda.get_device_capability()
    if arch_supported(archs, cap):
        return None
    return (f"localsgd_comm._C was built for CUDA architectures {archs!r}, which has no code for this GPU "
            f"(compute capability {cap[0]}.{cap[1]}); rebuild with TORCH_CUDA_ARCH_LIST including "
            f"'{cap[0]}.{cap[1]}' (or an older architecture with +PTX)")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _resolve() -> str:
    """Decide (once) which implementation serves CUDA tensors; log the decision."""
    global _choice, _reason
    if _choice is not None:
        return _choice
    want = os.environ.get(ENV_VAR, "").strip().lower()
    if want and want not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV_VAR} must be one of {IMPLEMENTATIONS} (or unset), got {want!r}")
    no_code = _native_runs_here() if _native_available() else None
    if want == "native":
        choice = "native" if _native_available() and no_code is None else "none"
        reason = (f"{ENV_VAR}=native" if choice == "native" else no_code or
                  f"{ENV_VAR}=native but localsgd_comm._C was built without CUDA kernels "
                  "(rebuild with a CUDA torch and toolkit, or LOCALSGD_COMM_CUDA=1)")
    elif want == "triton":
        choice = "triton" if _triton_available() else "none"
        reason = (f"{ENV_VAR}=triton" if choice == "triton" else
                  f"{ENV_VAR}=triton but the triton package is not installed")
    elif _native_available() and no_code is None:
        choice, reason = "native", "default: the extension has CUDA kernels"
    elif _triton_available():
        choice, reason = "triton", (f"default: {no_code}; falling back to the Triton kernels" if no_code else
                                    "default: the extension has no CUDA kernels, triton is installed")
    else:
        choice, reason = "none", (f"{no_code}, and triton is not installed" if no_code else
                                  "the extension was built without CUDA kernels and triton is not installed "
                                  "(install triton or rebuild with CUDA)")
    _choice, _reason = choice, reason
    log.info("localsgd_comm CUDA ops: %s (%s)", choice, reason)
    return choice


def active_implementation() -> str:
    """Which implementation serves the ops on CUDA tensors: "native", "triton" or "none"."""
    return _resolve()


def _reset_for_tests() -> None:
    """Forget the decision so that a test can change LOCALSGD_COMM_CUDA_IMPL."""
    global _choice, _reason, _table
    _choice, _reason, _table = None, "", None


def _implementations() -> dict:
    global _table
    if _table is not None:
        return _table
    choice = _resolve()
    if choice == "native":
        _table = {name: getattr(_C, f"cuda_{name}") for name in OP_NAMES}
    elif choice == "triton":
        from . import triton as triton_impl  # imports triton: only now, at the first CUDA call

        _table = dict(triton_impl.OPS)
    else:
        raise RuntimeError(f"localsgd_comm ops on CUDA tensors are unavailable: {_reason}")
    return _table


def _dispatcher(name: str) -> Callable:
    def kernel(*args, **kwargs):
        return _implementations()[name](*args, **kwargs)

    kernel.__name__ = f"{name}_cuda"
    kernel.__qualname__ = kernel.__name__
    return kernel


for _name in OP_NAMES:
    torch.library.register_kernel(f"{NAMESPACE}::{_name}", "cuda", _dispatcher(_name))

__all__ = ["active_implementation", "ENV_VAR", "IMPLEMENTATIONS"]
