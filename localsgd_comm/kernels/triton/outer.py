"""Triton fused outer Nesterov step (kernels.h outer_nesterov_step): from the averaged
pseudo-gradient (fp32, or compressed bytes + scales) update momentum and anchor and write the
new parameters in their dtype, one pass."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _host
from ._common import (DTYPE_CODES, FORMAT_CODES, LAUNCH_OPTS, _decode_q, _store_f32, _tile_offsets, kernel_view,
                      num_warps_for, rows_per_program)

# Row length of the 2-D tile when the gradient is plain fp32 (no quantization blocks to follow).
_DENSE_ROW = 1024


@triton.jit
def _outer_nesterov_step_kernel(anchor_ptr, mom_ptr, params_ptr, grad_ptr, pay_ptr, scale_ptr, n, nblocks,
                                grad_factor, lr, mu,
                                COMPRESSED: tl.constexpr, FMT: tl.constexpr, HAS_MOM: tl.constexpr,
                                NESTEROV: tl.constexpr, HAS_PARAMS: tl.constexpr, KIND: tl.constexpr,
                                R: tl.constexpr, B: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs, blocks = _tile_offsets(pid, R, B)
    mask = offs < n
    if COMPRESSED:
        qf = _decode_q(pay_ptr, blocks, offs, mask, n, FMT, R, B)
        s = tl.load(scale_ptr + blocks, mask=blocks < nblocks, other=0.0)
        g = (qf * s[:, None]) * grad_factor  # two roundings, in this order (kernels.h)
    else:
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    # torch.optim.SGD(momentum=mu, dampening=0, nesterov): buf = mu*buf + g; d = g + mu*buf.
    # Each product is rounded before the add: launches pass enable_fp_fusion=False (no FMA).
    if HAS_MOM:
        buf = mu * tl.load(mom_ptr + offs, mask=mask, other=0.0) + g
        tl.store(mom_ptr + offs, buf, mask=mask)
        if NESTEROV:
            d = g + mu * buf
        else:
            d = buf
    else:
        d = g
    a = tl.load(anchor_ptr + offs, mask=mask, other=0.0) - lr * d
    tl.store(anchor_ptr + offs, a, mask=mask)
    if HAS_PARAMS:
        _store_f32(params_ptr, offs, a, mask, KIND)


def _launch(anchor, momentum, params, grad, payload, scales, fmt, block_size, grad_factor, lr, mu, nesterov):
    for name, t in (("anchor", anchor), ("momentum", momentum), ("params", params)):
        _host.check_inplace(t, name, anchor.device)
    _host.check_same_device(anchor.device, grad=grad, payload=payload, scales=scales)
    n = anchor.numel()
    if n == 0:
        return
    compressed = payload is not None
    has_mom = mu != 0.0
    if compressed:
        b, rows = block_size, rows_per_program(block_size)
        nb = scales.numel()
    else:
        b, rows = _DENSE_ROW, rows_per_program(_DENSE_ROW)
        nb = 0
    nrows = (n + b - 1) // b
    _outer_nesterov_step_kernel[(triton.cdiv(nrows, rows),)](
        anchor, momentum if has_mom else anchor, kernel_view(params) if params is not None else anchor,
        grad if grad is not None else anchor, payload if compressed else anchor, scales if compressed else anchor,
        n, nb, float(grad_factor), float(lr), float(mu),
        COMPRESSED=compressed, FMT=FORMAT_CODES[fmt] if compressed else 1, HAS_MOM=has_mom, NESTEROV=bool(nesterov),
        HAS_PARAMS=params is not None, KIND=DTYPE_CODES[params.dtype] if params is not None else 0,
        R=rows, B=b, num_warps=num_warps_for(b), **LAUNCH_OPTS)


def outer_nesterov_step(anchor: torch.Tensor, momentum: Optional[torch.Tensor], params: Optional[torch.Tensor],
                        grad: torch.Tensor, lr: float, mu: float, nesterov: bool) -> None:
    """In place: SGD(lr, momentum=mu, nesterov) on ``anchor`` with ``grad``; ``params <- anchor``."""
    _host.fakes._outer_nesterov_step_fake(anchor, momentum, params, grad, lr, mu, nesterov)
    _launch(anchor, momentum, params, _host.flat_input(grad), None, None, None, 0, 1.0, lr, mu, nesterov)


def outer_nesterov_step_compressed(anchor: torch.Tensor, momentum: Optional[torch.Tensor],
                                   params: Optional[torch.Tensor], payload: torch.Tensor, scales: torch.Tensor,
                                   fmt: str, block_size: int, grad_factor: float, lr: float, mu: float,
                                   nesterov: bool) -> None:
    """:func:`outer_nesterov_step` with the gradient ``grad_factor * deQ(payload, scales)``."""
    _host.fakes._outer_nesterov_step_compressed_fake(anchor, momentum, params, payload, scales, fmt, block_size,
                                                     grad_factor, lr, mu, nesterov)
    _launch(anchor, momentum, params, None, payload.contiguous(), scales.contiguous(), fmt, block_size,
            grad_factor, lr, mu, nesterov)
