"""Pure-PyTorch reference implementation of the ``localsgd_comm`` ops (see ``ops.py``).

Not registered as a dispatcher kernel: tests and tools call it directly
(``from localsgd_comm.kernels.reference import ops``) to compare the compiled kernels with a
readable version of csrc/include/localsgd/format.h.
"""
from . import ops  # noqa: F401
from .ops import OPS  # noqa: F401
