"""Triton implementations of the localsgd_comm ops, one per op, same signatures as the op
schemas in localsgd_comm/_ops.py (callable directly as plain functions).

They run on CUDA tensors (selected with LOCALSGD_COMM_CUDA_IMPL=triton) and, under
TRITON_INTERPRET=1 (set before this package is imported), on CPU tensors, which is how CI
checks them without a GPU. Shared format arithmetic: _common.py.
"""
from .compress_delta import compress_delta
from .outer import outer_nesterov_step, outer_nesterov_step_compressed
from .quantize import dequantize, quantize
from .reduce import dequantize_reduce, dequantize_reduce_requantize

OPS = {
    "quantize": quantize,
    "dequantize": dequantize,
    "compress_delta": compress_delta,
    "dequantize_reduce": dequantize_reduce,
    "dequantize_reduce_requantize": dequantize_reduce_requantize,
    "outer_nesterov_step": outer_nesterov_step,
    "outer_nesterov_step_compressed": outer_nesterov_step_compressed,
}

__all__ = ["OPS", *OPS]
