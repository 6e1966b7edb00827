"""Triton dequantize-and-reduce of p compressed chunks, optionally fused with requantizing the
fp32 result (the middle step of the quantized all-reduce; kernels.h dequantize_reduce)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _host
from ._common import (FORMAT_CODES, LAUNCH_OPTS, QMAX, _decode_q, _quantize_tile, _store_payload, _tile_offsets,
                      num_warps_for, rows_per_program, seed_key)


@triton.jit(do_not_specialize=["p", "index_offset", "key"])
def _dequantize_reduce_kernel(pay_ptr, pay_stride, scale_ptr, scale_stride, p, n, nblocks, factor,
                              out_ptr, opay_ptr, oscale_ptr, index_offset, key,
                              FMT: tl.constexpr, QM: tl.constexpr, WRITE_SUM: tl.constexpr,
                              REQUANT: tl.constexpr, STOCH: tl.constexpr, R: tl.constexpr, B: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs, blocks = _tile_offsets(pid, R, B)
    mask = offs < n
    bmask = blocks < nblocks
    acc = tl.zeros([R, B], dtype=tl.float32)
    # Fixed order r = 0..p-1, one fp32 multiply and one fp32 add per chunk (format.h Reductions).
    # Row r starts at r * stride (int64: no overflow), computed from the loop index rather than
    # carried by the loop: a carried pointer loses the strides' known divisibility, and with it
    # the vectorized loads.
    for r in range(0, p):
        prow = pay_ptr + tl.cast(r, tl.int64) * pay_stride
        srow = scale_ptr + tl.cast(r, tl.int64) * scale_stride
        qf = _decode_q(prow, blocks, offs, mask, n, FMT, R, B)
        s = tl.load(srow + blocks, mask=bmask, other=0.0)
        acc = acc + qf * s[:, None]
    acc = acc * factor
    if WRITE_SUM:
        tl.store(out_ptr + offs, acc, mask=mask)
    if REQUANT:
        q, scale, _deq = _quantize_tile(acc, offs + index_offset, key, FMT, QM, STOCH)
        _store_payload(opay_ptr, blocks, offs, mask, n, q, FMT, R, B)
        tl.store(oscale_ptr + blocks, scale, mask=bmask)


def _launch(payloads, scales, fmt, numel, block_size, factor, out, opay, oscale, seed, index_offset):
    _host.check_rows(payloads, "payloads")
    _host.check_rows(scales, "scales")
    p = payloads.shape[0]
    if numel == 0:
        return
    code = FORMAT_CODES[fmt]
    rows = rows_per_program(block_size)
    nb = (numel + block_size - 1) // block_size
    dummy_f = out if out is not None else oscale
    _dequantize_reduce_kernel[(triton.cdiv(nb, rows),)](
        payloads, payloads.stride(0), scales, scales.stride(0), p, numel, nb, factor,
        dummy_f, opay if opay is not None else payloads, oscale if oscale is not None else dummy_f,
        index_offset, seed_key(seed) if seed is not None else 0,
        FMT=code, QM=QMAX[code], WRITE_SUM=out is not None, REQUANT=opay is not None, STOCH=seed is not None,
        R=rows, B=block_size, num_warps=num_warps_for(block_size), **LAUNCH_OPTS)


def dequantize_reduce(payloads: torch.Tensor, scales: torch.Tensor, fmt: str, numel: int, block_size: int,
                      factor: float) -> torch.Tensor:
    """fp32 ``factor * sum_r deQ(payloads[r], scales[r])`` (``payloads [p, bytes]``, ``scales [p, blocks]``)."""
    out = _host.fakes._dequantize_reduce_fake(payloads, scales, fmt, numel, block_size, factor)
    _launch(payloads, scales, fmt, numel, block_size, factor, out, None, None, None, 0)
    return out


def dequantize_reduce_requantize(payloads: torch.Tensor, scales: torch.Tensor, fmt: str, numel: int,
                                 block_size: int, factor: float, seed: Optional[int] = None,
                                 index_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dequantize_reduce` fused with quantizing the result (rand index = index_offset + i)."""
    opay, oscale = _host.fakes._dequantize_reduce_requantize_fake(payloads, scales, fmt, numel, block_size, factor,
                                                                  seed, index_offset)
    _host.check_seed(seed)
    _launch(payloads, scales, fmt, numel, block_size, factor, None, opay, oscale, seed, index_offset)
    return opay, oscale
