"""Triton implementations of the localsgd_comm ops, one per op, same signatures as the op
schemas in localsgd_comm/_ops.py (callable directly as plain functions).

They run on CUDA tensors (selected with LOCALSGD_COMM_CUDA_IMPL=triton) and, under
TRITON_INTERPRET=1 (set before this package is imported), on CPU tensors, which is how CI
checks them without a GPU. Shared format arithmetic: _common.py.
"""
from ... import _ops
from . import _host, compress_delta as _cd, outer as _outer, quantize as _q, reduce as _reduce

# Every launcher runs with its tensors' device current (see _host.on_tensor_device).
compress_delta = _host.on_tensor_device(_cd.compress_delta)
outer_nesterov_step = _host.on_tensor_device(_outer.outer_nesterov_step)
outer_nesterov_step_compressed = _host.on_tensor_device(_outer.outer_nesterov_step_compressed)
quantize = _host.on_tensor_device(_q.quantize)
dequantize = _host.on_tensor_device(_q.dequantize)
dequantize_reduce = _host.on_tensor_device(_reduce.dequantize_reduce)
dequantize_reduce_requantize = _host.on_tensor_device(_reduce.dequantize_reduce_requantize)

#: op name -> implementation, for tests and tools that iterate over all ops (the names are
#: those declared in localsgd_comm/_ops.py, so a new op cannot be missed here).
OPS = {name: globals()[name] for name in _ops._SCHEMAS}

__all__ = ["OPS", *OPS]
