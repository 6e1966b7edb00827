"""Triton quantize / dequantize of a flat buffer (format.h layouts)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _host
from ._common import (DTYPE_CODES, FORMAT_CODES, LAUNCH_OPTS, QMAX, _decode_q, _load_f32, _quantize_tile,
                      _store_f32, _store_payload, _tile_offsets, kernel_view, num_warps_for, rows_per_program,
                      seed_key)


@triton.jit(do_not_specialize=["index_offset", "key"])
def _quantize_kernel(x_ptr, pay_ptr, scale_ptr, n, nblocks, index_offset, key,
                     FMT: tl.constexpr, QM: tl.constexpr, KIND: tl.constexpr, STOCH: tl.constexpr,
                     R: tl.constexpr, B: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs, blocks = _tile_offsets(pid, R, B)
    mask = offs < n
    x = _load_f32(x_ptr, offs, mask, KIND)
    q, scale, _deq = _quantize_tile(x, offs + index_offset, key, FMT, QM, STOCH)
    _store_payload(pay_ptr, blocks, offs, mask, n, q, FMT, R, B)
    tl.store(scale_ptr + blocks, scale, mask=blocks < nblocks)


@triton.jit
def _dequantize_kernel(pay_ptr, scale_ptr, out_ptr, n, nblocks,
                       FMT: tl.constexpr, KIND: tl.constexpr, R: tl.constexpr, B: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs, blocks = _tile_offsets(pid, R, B)
    mask = offs < n
    qf = _decode_q(pay_ptr, blocks, offs, mask, n, FMT, R, B)
    scale = tl.load(scale_ptr + blocks, mask=blocks < nblocks, other=0.0)
    _store_f32(out_ptr, offs, qf * scale[:, None], mask, KIND)


def quantize(x: torch.Tensor, fmt: str, block_size: int, seed: Optional[int] = None,
             index_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantize ``x`` (any shape, read as a flat buffer) -> (payload, scales)."""
    payload, scales = _host.fakes._quantize_fake(x, fmt, block_size, seed, index_offset)
    _host.check_seed(seed)
    n = x.numel()
    if n == 0:
        return payload, scales
    xf = kernel_view(_host.flat_input(x))
    code = FORMAT_CODES[fmt]
    rows = rows_per_program(block_size)
    nb = scales.numel()
    grid = (triton.cdiv(nb, rows),)
    _quantize_kernel[grid](xf, payload, scales, n, nb, index_offset, seed_key(seed) if seed is not None else 0,
                           FMT=code, QM=QMAX[code], KIND=DTYPE_CODES[x.dtype], STOCH=seed is not None,
                           R=rows, B=block_size, num_warps=num_warps_for(block_size), **LAUNCH_OPTS)
    return payload, scales


def dequantize(payload: torch.Tensor, scales: torch.Tensor, fmt: str, numel: int, block_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize`: a flat tensor of ``numel`` elements of ``dtype``."""
    out = _host.fakes._dequantize_fake(payload, scales, fmt, numel, block_size, dtype)
    if numel == 0:
        return out
    payload = payload.contiguous()
    scales = scales.contiguous()
    rows = rows_per_program(block_size)
    nb = scales.numel()
    _dequantize_kernel[(triton.cdiv(nb, rows),)](
        payload, scales, kernel_view(out), numel, nb, FMT=FORMAT_CODES[fmt], KIND=DTYPE_CODES[dtype],
        R=rows, B=block_size, num_warps=num_warps_for(block_size), **LAUNCH_OPTS)
    return out
