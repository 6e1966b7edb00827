"""localsgd-comm: communication-efficient Local SGD / DiLoCo for PyTorch.

``import localsgd_comm`` declares the ops, loads the compiled kernels, registers the CUDA op
implementations (CUDA C++ or Triton) and the ``"localsgd"`` torch.distributed backend.
"""
import torch  # noqa: F401  (libc10 must be loaded before the extension)

from . import _ops
from ._ops import DEFAULT_BLOCK_SIZE, FORMATS

try:
    from . import _C  # noqa: F401  (runs the C++ op registrations)
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "localsgd_comm._C, the compiled kernels, could not be loaded: "
        f"{exc}. Reinstall with `pip install --no-build-isolation .` against the torch you run "
        "(the extension is built for one torch version)."
    ) from exc

from .kernels import cuda as _cuda_impl  # noqa: E402  registers the CUDA kernels
from . import functional  # noqa: E402
from .backend import (BackendOptions, all_reduce_compressed, ddp_bytes_per_rank, get_backend_stats,  # noqa: E402
                      traffic_report)
from .diloco import DiLoCo, HierarchicalGroups, new_hierarchical_groups  # noqa: E402
from .elastic import CoordinatorUnreachable, ElasticDiLoCo  # noqa: E402

__version__ = "0.1.0"


def cuda_implementation() -> str:
    """Which implementation serves the ops on CUDA tensors: "native" (CUDA C++), "triton", or
    "none": no CUDA device is visible (e.g. a CPU build of torch), or no implementation is
    available (the reason is logged). ``LOCALSGD_COMM_CUDA_IMPL`` chooses between the two."""
    if not torch.cuda.is_available():
        return "none"
    return _cuda_impl.active_implementation()


__all__ = [
    "BackendOptions",
    "CoordinatorUnreachable",
    "DEFAULT_BLOCK_SIZE",
    "DiLoCo",
    "ElasticDiLoCo",
    "FORMATS",
    "HierarchicalGroups",
    "all_reduce_compressed",
    "cuda_implementation",
    "ddp_bytes_per_rank",
    "functional",
    "get_backend_stats",
    "new_hierarchical_groups",
    "traffic_report",
]
