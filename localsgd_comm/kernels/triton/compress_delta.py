"""Triton fused pseudo-gradient compression: delta = anchor - params (+ residual), Q(delta),
residual <- v - deQ(Q(v)), one pass over memory (kernels.h compress_delta)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _host
from ._common import (DTYPE_CODES, FORMAT_CODES, LAUNCH_OPTS, QMAX, _load_f32, _quantize_tile, _store_payload,
                      _tile_offsets, kernel_view, num_warps_for, rows_per_program, seed_key)


@triton.jit(do_not_specialize=["key"])
def _compress_delta_kernel(anchor_ptr, params_ptr, res_ptr, pay_ptr, scale_ptr, n, nblocks, key,
                           FMT: tl.constexpr, QM: tl.constexpr, KIND: tl.constexpr, HAS_RES: tl.constexpr,
                           STOCH: tl.constexpr, R: tl.constexpr, B: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs, blocks = _tile_offsets(pid, R, B)
    mask = offs < n
    v = tl.load(anchor_ptr + offs, mask=mask, other=0.0) - _load_f32(params_ptr, offs, mask, KIND)
    if HAS_RES:
        v = v + tl.load(res_ptr + offs, mask=mask, other=0.0)
    q, scale, deq = _quantize_tile(v, offs, key, FMT, QM, STOCH)
    _store_payload(pay_ptr, blocks, offs, mask, n, q, FMT, R, B)
    tl.store(scale_ptr + blocks, scale, mask=blocks < nblocks)
    if HAS_RES:
        # Error feedback: what the wire dropped is added back next round (NaN blocks stay NaN).
        tl.store(res_ptr + offs, v - deq, mask=mask)


def compress_delta(anchor: torch.Tensor, params: torch.Tensor, residual: Optional[torch.Tensor], fmt: str,
                   block_size: int, seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``Q(anchor - params [+ residual])``; updates ``residual`` in place."""
    payload, scales = _host.fakes._compress_delta_fake(anchor, params, residual, fmt, block_size, seed)
    _host.check_seed(seed)
    _host.check_inplace(residual, "residual", anchor.device)
    n = anchor.numel()
    if n == 0:
        return payload, scales
    code = FORMAT_CODES[fmt]
    rows = rows_per_program(block_size)
    nb = scales.numel()
    res = residual if residual is not None else anchor  # placeholder pointer, never touched
    _compress_delta_kernel[(triton.cdiv(nb, rows),)](
        _host.flat_input(anchor), kernel_view(_host.flat_input(params)), res, payload, scales, n, nb,
        seed_key(seed) if seed is not None else 0,
        FMT=code, QM=QMAX[code], KIND=DTYPE_CODES[params.dtype], HAS_RES=residual is not None,
        STOCH=seed is not None, R=rows, B=block_size, num_warps=num_warps_for(block_size), **LAUNCH_OPTS)
    return payload, scales
