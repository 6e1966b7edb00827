"""Op declarations: schema + fake (meta) implementation of every ``localsgd_comm`` op.

This file is the single source of truth for the ops' signatures. Implementations register
per device elsewhere:

* CPU: C++ (``csrc/bindings/ops_cpu.cpp``, ``TORCH_LIBRARY_IMPL(localsgd_comm, CPU, m)``).
* CUDA: ``localsgd_comm/kernels/cuda.py`` picks CUDA C++ or Triton
  (``LOCALSGD_COMM_CUDA_IMPL=native|triton``).
* ``localsgd_comm/kernels/reference/ops.py``: readable pure PyTorch, same signatures, used as
  the oracle-checked reference by the tests (and callable directly).

Formats are passed as strings ("int8", "int4", "fp8"); "none" never reaches an op (the
functional layer and the backend pass uncompressed tensors straight through). A ``seed`` of
``None`` means round to nearest; an integer selects seeded stochastic rounding.
Byte layouts: ``csrc/include/localsgd/format.h``.
"""
from __future__ import annotations

from typing import Optional

import torch

NAMESPACE = "localsgd_comm"

FORMATS = ("none", "int8", "int4", "fp8")
QUANT_FORMATS = ("int8", "int4", "fp8")
#: Chosen by measurement (benchmarks/block_size_sweep.py); mirrors kDefaultBlockSize.
DEFAULT_BLOCK_SIZE = 128
MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 8192
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SCHEMAS = {
    "quantize": "quantize(Tensor x, str fmt, int block_size, int? seed=None, int index_offset=0)"
    " -> (Tensor payload, Tensor scales)",
    "dequantize": "dequantize(Tensor payload, Tensor scales, str fmt, int numel, int block_size,"
    " ScalarType dtype) -> Tensor",
    "compress_delta": "compress_delta(Tensor anchor, Tensor params, Tensor(a!)? residual, str fmt,"
    " int block_size, int? seed=None) -> (Tensor payload, Tensor scales)",
    "dequantize_reduce": "dequantize_reduce(Tensor payloads, Tensor scales, str fmt, int numel,"
    " int block_size, float factor) -> Tensor",
    "dequantize_reduce_requantize": "dequantize_reduce_requantize(Tensor payloads, Tensor scales,"
    " str fmt, int numel, int block_size, float factor, int? seed=None, int index_offset=0)"
    " -> (Tensor payload, Tensor scales)",
    "outer_nesterov_step": "outer_nesterov_step(Tensor(a!) anchor, Tensor(b!)? momentum,"
    " Tensor(c!)? params, Tensor grad, float lr, float mu, bool nesterov) -> ()",
    "outer_nesterov_step_compressed": "outer_nesterov_step_compressed(Tensor(a!) anchor,"
    " Tensor(b!)? momentum, Tensor(c!)? params, Tensor payload, Tensor scales, str fmt,"
    " int block_size, float grad_factor, float lr, float mu, bool nesterov) -> ()",
}

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"{NAMESPACE}::{_schema.split('(', 1)[0]}", "(" + _schema.split("(", 1)[1])


# ---- shared size rules ------------------------------------------------------------------------
def num_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def payload_bytes(fmt: str, numel: int) -> int:
    if fmt == "int4":
        return (numel + 1) // 2
    if fmt == "none":
        return 4 * numel
    return numel


def check_format(fmt: str, allow_none: bool = False) -> None:
    allowed = FORMATS if allow_none else QUANT_FORMATS
    torch._check(fmt in allowed, lambda: f"unknown compression format {fmt!r}: expected one of {allowed}")


def check_block_size(block_size: int) -> None:
    torch._check(
        isinstance(block_size, int)
        and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
        and block_size & (block_size - 1) == 0,
        lambda: f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size!r}",
    )


def _check_float(t: torch.Tensor, what: str) -> None:
    torch._check(t.dtype in FLOAT_DTYPES, lambda: f"{what} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_encoded(payload: torch.Tensor, scales: torch.Tensor, fmt: str, numel: int, block_size: int,
                   leading: tuple = ()) -> None:
    check_format(fmt)
    check_block_size(block_size)
    torch._check(numel >= 0, lambda: f"numel must be >= 0, got {numel}")
    torch._check(payload.dtype == torch.uint8, lambda: f"payload must be uint8, got {payload.dtype}")
    torch._check(scales.dtype == torch.float32, lambda: f"scales must be float32, got {scales.dtype}")
    want_p = (*leading, payload_bytes(fmt, numel))
    want_s = (*leading, num_blocks(numel, block_size))
    torch._check(tuple(payload.shape) == want_p,
                 lambda: f"payload shape must be {want_p} for {fmt} with numel={numel}, got {tuple(payload.shape)}")
    torch._check(tuple(scales.shape) == want_s,
                 lambda: f"scales shape must be {want_s} for block_size={block_size} and numel={numel}, got {tuple(scales.shape)}")
    torch._check(payload.device == scales.device,
                 lambda: f"payload and scales must be on one device, got {payload.device} and {scales.device}")


def _encoded_empty(fmt: str, numel: int, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(payload_bytes(fmt, numel), dtype=torch.uint8, device=device),
            torch.empty(num_blocks(numel, block_size), dtype=torch.float32, device=device))


# ---- fake implementations (shape/dtype checks + allocation only) ---------------------------------
@torch.library.register_fake(f"{NAMESPACE}::quantize")
def _quantize_fake(x, fmt, block_size, seed=None, index_offset=0):
    check_format(fmt)
    check_block_size(block_size)
    _check_float(x, "x")
    torch._check(index_offset >= 0 and index_offset % block_size == 0,
                 lambda: f"index_offset must be a non-negative multiple of block_size, got {index_offset}")
    return _encoded_empty(fmt, x.numel(), block_size, x.device)


@torch.library.register_fake(f"{NAMESPACE}::dequantize")
def _dequantize_fake(payload, scales, fmt, numel, block_size, dtype):
    _check_encoded(payload, scales, fmt, numel, block_size)
    torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return torch.empty(numel, dtype=dtype, device=payload.device)


@torch.library.register_fake(f"{NAMESPACE}::compress_delta")
def _compress_delta_fake(anchor, params, residual, fmt, block_size, seed=None):
    check_format(fmt)
    check_block_size(block_size)
    torch._check(anchor.dtype == torch.float32, lambda: f"anchor must be float32, got {anchor.dtype}")
    _check_float(params, "params")
    torch._check(params.numel() == anchor.numel(),
                 lambda: f"params has {params.numel()} elements but anchor has {anchor.numel()}")
    torch._check(params.device == anchor.device,
                 lambda: f"anchor and params must be on one device, got {anchor.device} and {params.device}")
    if residual is not None:
        torch._check(residual.dtype == torch.float32, lambda: f"residual must be float32, got {residual.dtype}")
        torch._check(residual.numel() == anchor.numel(),
                     lambda: f"residual has {residual.numel()} elements but anchor has {anchor.numel()}")
        torch._check(residual.device == anchor.device,
                     lambda: f"residual must be on {anchor.device}, got {residual.device}")
    return _encoded_empty(fmt, anchor.numel(), block_size, anchor.device)


@torch.library.register_fake(f"{NAMESPACE}::dequantize_reduce")
def _dequantize_reduce_fake(payloads, scales, fmt, numel, block_size, factor):
    torch._check(payloads.dim() == 2, lambda: f"payloads must be 2-D [p, bytes], got shape {tuple(payloads.shape)}")
    _check_encoded(payloads, scales, fmt, numel, block_size, leading=(payloads.shape[0],))
    return torch.empty(numel, dtype=torch.float32, device=payloads.device)


@torch.library.register_fake(f"{NAMESPACE}::dequantize_reduce_requantize")
def _dequantize_reduce_requantize_fake(payloads, scales, fmt, numel, block_size, factor, seed=None, index_offset=0):
    torch._check(payloads.dim() == 2, lambda: f"payloads must be 2-D [p, bytes], got shape {tuple(payloads.shape)}")
    _check_encoded(payloads, scales, fmt, numel, block_size, leading=(payloads.shape[0],))
    torch._check(index_offset >= 0 and index_offset % block_size == 0,
                 lambda: f"index_offset must be a non-negative multiple of block_size, got {index_offset}")
    return _encoded_empty(fmt, numel, block_size, payloads.device)


def _check_outer(anchor, momentum, params, mu, numel_like):
    torch._check(anchor.dtype == torch.float32, lambda: f"anchor must be float32, got {anchor.dtype}")
    n = anchor.numel()
    if mu != 0.0:
        torch._check(momentum is not None, lambda: "momentum buffer is required when mu != 0")
    if momentum is not None:
        torch._check(momentum.dtype == torch.float32, lambda: f"momentum must be float32, got {momentum.dtype}")
        torch._check(momentum.numel() == n, lambda: f"momentum has {momentum.numel()} elements, anchor has {n}")
    if params is not None:
        _check_float(params, "params")
        torch._check(params.numel() == n, lambda: f"params has {params.numel()} elements, anchor has {n}")
    torch._check(numel_like == n, lambda: f"gradient has {numel_like} elements, anchor has {n}")


@torch.library.register_fake(f"{NAMESPACE}::outer_nesterov_step")
def _outer_nesterov_step_fake(anchor, momentum, params, grad, lr, mu, nesterov):
    torch._check(grad.dtype == torch.float32, lambda: f"grad must be float32, got {grad.dtype}")
    _check_outer(anchor, momentum, params, mu, grad.numel())
    return None


@torch.library.register_fake(f"{NAMESPACE}::outer_nesterov_step_compressed")
def _outer_nesterov_step_compressed_fake(anchor, momentum, params, payload, scales, fmt, block_size,
                                         grad_factor, lr, mu, nesterov):
    _check_encoded(payload, scales, fmt, anchor.numel(), block_size)
    _check_outer(anchor, momentum, params, mu, anchor.numel())
    return None


def ops():
    """The op packet namespace: ``ops().quantize(...)`` etc."""
    return torch.ops.localsgd_comm


__all__ = ["NAMESPACE", "FORMATS", "QUANT_FORMATS", "DEFAULT_BLOCK_SIZE", "num_blocks", "payload_bytes",
           "check_format", "check_block_size", "ops"]
