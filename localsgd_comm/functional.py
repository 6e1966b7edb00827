"""Stateless public API over the ``localsgd_comm`` ops (public contract: quantize/dequantize).

All functions take any-shaped tensors and treat them as flat buffers. ``fmt="none"`` is an
exact pass-through: the "payload" is the tensor itself (flattened) and ``scales`` is empty.
``block_size=None`` means :data:`localsgd_comm.DEFAULT_BLOCK_SIZE`. ``seed=None`` rounds to
nearest; an integer seed selects reproducible stochastic rounding.

NaN/Inf contract: a block containing NaN or Inf gets a NaN scale and zero payload bytes, so
dequantizing yields NaN for that whole block; :func:`is_finite` checks the scales only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _ops
from ._ops import DEFAULT_BLOCK_SIZE, num_blocks, payload_bytes

Tensor = torch.Tensor


def _block(block_size: Optional[int]) -> int:
    b = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    _ops.check_block_size(b)
    return b


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def compressed_nbytes(fmt: str, numel: int, block_size: Optional[int] = None) -> int:
    """Bytes on the wire for ``numel`` elements: payload plus fp32 scales."""
    _ops.check_format(fmt, allow_none=True)
    if fmt == "none":
        return 4 * numel
    return payload_bytes(fmt, numel) + 4 * num_blocks(numel, _block(block_size))


def quantize(x: Tensor, fmt: str = "int8", block_size: Optional[int] = None, *,
             seed: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Block-wise quantize ``x`` (fp32/bf16/fp16, any shape) -> ``(payload uint8, scales fp32)``."""
    _ops.check_format(fmt, allow_none=True)
    if fmt == "none":
        return _flat(x), torch.empty(0, dtype=torch.float32, device=x.device)
    return _ops.ops().quantize(_flat(x), fmt, _block(block_size), seed, 0)


def dequantize(payload: Tensor, scales: Tensor, fmt: str, numel: int, block_size: Optional[int] = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize`: a flat tensor of ``numel`` elements of ``dtype``."""
    _ops.check_format(fmt, allow_none=True)
    if fmt == "none":
        torch._check(payload.numel() == numel, lambda: f"payload has {payload.numel()} elements, expected {numel}")
        return payload.reshape(-1).to(dtype)
    return _ops.ops().dequantize(payload, scales, fmt, numel, _block(block_size), dtype)


def compress_delta(anchor: Tensor, params: Tensor, residual: Optional[Tensor] = None, fmt: str = "int8",
                   block_size: Optional[int] = None, *, seed: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Fused ``Q(anchor - params [+ residual])``; updates ``residual`` in place (error feedback)."""
    _ops.check_format(fmt)
    return _ops.ops().compress_delta(_flat(anchor), _flat(params), residual, fmt, _block(block_size), seed)


def dequantize_reduce(payloads: Tensor, scales: Tensor, fmt: str, numel: int, block_size: Optional[int] = None,
                      factor: float = 1.0) -> Tensor:
    """Sum of p compressed chunks (``payloads [p, bytes]``, ``scales [p, blocks]``) in fp32, times factor."""
    return _ops.ops().dequantize_reduce(payloads, scales, fmt, numel, _block(block_size), float(factor))


def dequantize_reduce_requantize(payloads: Tensor, scales: Tensor, fmt: str, numel: int,
                                 block_size: Optional[int] = None, factor: float = 1.0, *,
                                 seed: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """:func:`dequantize_reduce` fused with re-quantizing the result (one pass)."""
    return _ops.ops().dequantize_reduce_requantize(payloads, scales, fmt, numel, _block(block_size),
                                                   float(factor), seed, 0)


def outer_nesterov_step(anchor: Tensor, momentum: Optional[Tensor], params: Optional[Tensor], grad: Tensor,
                        lr: float, mu: float, nesterov: bool = True) -> None:
    """In place: the ``torch.optim.SGD(lr, momentum=mu, nesterov=...)`` step on ``anchor`` with
    gradient ``grad``, momentum buffer update, and ``params <- anchor`` (cast), in one pass."""
    _ops.ops().outer_nesterov_step(anchor, momentum, params, grad, float(lr), float(mu), bool(nesterov))


def outer_nesterov_step_compressed(anchor: Tensor, momentum: Optional[Tensor], params: Optional[Tensor],
                                   payload: Tensor, scales: Tensor, fmt: str, block_size: Optional[int] = None,
                                   grad_factor: float = 1.0, lr: float = 0.7, mu: float = 0.9,
                                   nesterov: bool = True) -> None:
    """:func:`outer_nesterov_step` reading the gradient straight from compressed bytes."""
    _ops.ops().outer_nesterov_step_compressed(anchor, momentum, params, payload, scales, fmt, _block(block_size),
                                              float(grad_factor), float(lr), float(mu), bool(nesterov))


def is_finite(scales: Tensor) -> bool:
    """True when no block of an encoded tensor was non-finite (see the NaN/Inf contract)."""
    return bool(torch.isfinite(scales).all())


__all__ = ["compressed_nbytes", "quantize", "dequantize", "compress_delta", "dequantize_reduce",
           "dequantize_reduce_requantize", "outer_nesterov_step", "outer_nesterov_step_compressed", "is_finite"]
