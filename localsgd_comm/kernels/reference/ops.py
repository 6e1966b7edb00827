"""Readable pure-PyTorch reference of every ``localsgd_comm`` op.

Same arguments and outputs as the schemas in ``localsgd_comm/_ops.py``; the arithmetic follows
``csrc/include/localsgd/format.h`` step by step, so round-to-nearest output is byte-identical
to the C++/CUDA/Triton kernels. Written to be read next to format.h, not to be fast: every
step is a whole-tensor torch op (no per-element Python loops), each intermediate in fp32.

Two torch details that matter for bit-exactness:

* Every fp32 product and sum is its own torch op (``a * b`` then ``+ c``): a single
  ``torch.add(a, b, alpha=c)`` may run as a fused multiply-add on CPU, which format.h forbids.
* Division by a Python scalar is done against a full fp32 tensor, so that it is one IEEE
  division per element (reduced-precision paths may otherwise multiply by a reciprocal).

uint32 arithmetic of the stochastic-rounding hash is emulated in int64 with ``& 0xFFFFFFFF``
after every operation that can exceed 32 bits; every intermediate stays below 2^63.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ... import _ops

Tensor = torch.Tensor

_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
_FLT_MAX = torch.finfo(torch.float32).max
_FLT_MIN = torch.finfo(torch.float32).tiny  # 2^-126, smallest normal fp32
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


# ---- small helpers ------------------------------------------------------------------------------
def _f32(value: float) -> Tensor:
    """A Python float as a 0-dim fp32 tensor: the kernels take lr/mu/factor as C++ float."""
    return torch.tensor(value, dtype=torch.float32)


def _flat_f32(x: Tensor) -> Tensor:
    """Flat fp32 copy-or-view of ``x``; bf16/fp16 widen exactly."""
    return x.reshape(-1).to(torch.float32)


def _per_block(v: Tensor, block_size: int, reduce) -> Tensor:
    """Apply ``reduce(tensor[rows, cols]) -> [rows]`` to every block of the flat ``v``.

    Full blocks are a ``[n // B, B]`` view; the short tail block (``n % B`` elements) is
    reduced on its own and appended, exactly as format.h defines block k = [k*B, min((k+1)*B, n)).
    """
    n = v.numel()
    n_full = n // block_size
    parts = [reduce(v[: n_full * block_size].view(n_full, block_size))]
    if n % block_size:
        parts.append(reduce(v[n_full * block_size:].view(1, -1)))
    return torch.cat(parts)


def _expand(per_block: Tensor, n: int, block_size: int) -> Tensor:
    """Per-block values -> per-element values (element i gets block i // B's value)."""
    return per_block.repeat_interleave(block_size)[:n]


def _round_half_even(v: Tensor) -> Tensor:
    # torch.round rounds half to even (nearbyint), identical to format.h's magic-number trick
    # for |v| < 2^22, which always holds here (|v| <= 448 * 512).
    return torch.round(v)


def _bits(v: Tensor) -> Tensor:
    """fp32 bit pattern as non-negative int64 (uint32 value)."""
    return v.contiguous().view(torch.int32).to(torch.int64) & _U32


# ---- stochastic rounding hash (format.h mix32 / seed_key / rand_bits) ----------------------------
def _mix32_int(x: int) -> int:
    x &= _U32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & _U32
    x ^= x >> 15
    x = (x * 0x735A2D97) & _U32
    x ^= x >> 15
    return x


def _mix32(x: Tensor) -> Tensor:
    # x < 2^32 and both constants < 2^31, so every product < 2^63 fits int64 before the mask.
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _U32
    x = x ^ (x >> 15)
    return x


def seed_key(seed: int) -> int:
    """format.h seed_key: the seed is taken as uint64 (a negative Python int wraps)."""
    s = seed & _U64
    return _mix32_int((s & _U32) ^ _mix32_int(((s >> 32) + 0x9E3779B9) & _U32))


def rand_bits(seed: int, n: int, index_offset: int = 0, device=None) -> Tensor:
    """32 random bits per element i in [index_offset, index_offset + n), as int64 in [0, 2^32)."""
    key = seed_key(seed)
    i = torch.arange(index_offset, index_offset + n, dtype=torch.int64, device=device)
    return _mix32((i & _U32) ^ _mix32((i >> 32) ^ key))


def _uniform(bits: Tensor) -> Tensor:
    """format.h rand_uniform: top 24 bits * 2^-24 in [0, 1), exact in fp32."""
    return (bits >> 8).to(torch.float32) * 5.9604644775390625e-08


# ---- fp8 e4m3 ----------------------------------------------------------------------------------
def e4m3_encode(v: Tensor, bits: Optional[Tensor] = None) -> Tensor:
    """format.h e4m3_encode_rn (``bits is None``) or e4m3_encode_sr; v fp32, |v| <= 448 -> uint8."""
    sign = _bits(v) >> 31
    a = v.abs()
    b = _bits(a)
    subnormal = a < 0.015625  # 2^-6: below the smallest e4m3 normal
    if bits is None:
        m_sub = _round_half_even(a * 512.0)
        # round the 23-bit mantissa to 3 bits (half to even), carry into the exponent,
        # rebias 127 -> 7 (120 << 3 = 960)
        m_norm = ((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) - 960
    else:
        m_sub = torch.floor(a * 512.0 + _uniform(bits))
        m_norm = ((b + (bits >> 12)) >> 20) - 960
    m = torch.where(subnormal, m_sub.to(torch.int64), m_norm)
    m = m.clamp(max=0x7E)  # 448; 0x7F would be NaN
    return (m | (sign << 7)).to(torch.uint8)


def e4m3_decode(code: Tensor) -> Tensor:
    """format.h e4m3_decode: uint8 -> fp32 (exact)."""
    c = code.to(torch.int64)
    e = (c >> 3) & 15
    m = c & 7
    sub = m.to(torch.float32) * 0.001953125  # 2^-9
    normal = (((e + 120) << 23) | (m << 20)).to(torch.int32).view(torch.float32)
    a = torch.where(e == 0, sub, normal)
    return torch.where((c & 0x80) != 0, -a, a)


# ---- int4 packing ------------------------------------------------------------------------------
def pack_int4(q: Tensor) -> Tensor:
    """q int64 in [-7, 7] -> bytes: element 2j in the low nibble, 2j+1 in the high nibble."""
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])  # an odd n leaves the last high nibble 0
    nib = (q & 0xF).view(-1, 2)
    return (nib[:, 0] | (nib[:, 1] << 4)).to(torch.uint8)


def unpack_int4(payload: Tensor, n: int) -> Tensor:
    """bytes -> int64 values in [-8, 7] (4-bit two's complement), first n elements."""
    b = payload.to(torch.int64)
    nib = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:n]
    return torch.where(nib >= 8, nib - 16, nib)


def decode_q(payload: Tensor, fmt: str, n: int) -> Tensor:
    """format.h decode_q: payload bytes -> float(q) per element (before the scale multiply)."""
    if fmt == "int8":
        return payload.view(torch.int8).to(torch.float32)
    if fmt == "int4":
        return unpack_int4(payload, n).to(torch.float32)
    return e4m3_decode(payload)


# ---- the block quantizer (format.h, "Quantize, per block") --------------------------------------
def _quantize_f32(x: Tensor, fmt: str, block_size: int, seed: Optional[int],
                  index_offset: int) -> Tuple[Tensor, Tensor]:
    """x: flat fp32. Returns (payload uint8, scales fp32)."""
    n = x.numel()
    qmax = _QMAX[fmt]
    absmax = _per_block(x.abs(), block_size, lambda t: t.amax(dim=1) if t.numel() else t.sum(dim=1))
    nonfinite = _per_block(~torch.isfinite(x), block_size, lambda t: t.any(dim=1))
    # IEEE division, correctly rounded (against a tensor, never a reciprocal multiply).
    scale = absmax / torch.full_like(absmax, qmax)
    # qmax * scale must stay finite: when it overflows, the next float toward zero (bits - 1).
    over = ~(scale * torch.full_like(scale, qmax) <= _FLT_MAX)
    scale = torch.where(over & torch.isfinite(scale), (scale.view(torch.int32) - 1).view(torch.float32), scale)
    scale = torch.where(nonfinite, torch.full_like(scale, float("nan")), scale)
    # absmax of a few tiny subnormals: the scale underflows to 0 -> an all-zero block.
    zero_block = nonfinite | (absmax == 0) | (scale == 0)
    divide = ~(scale >= _FLT_MIN)  # subnormal scale: 1/scale would overflow; NaN also lands here
    inv = torch.where(divide | zero_block, torch.zeros_like(scale), torch.ones_like(scale) / scale)

    scale_e = _expand(scale, n, block_size)
    inv_e = _expand(inv, n, block_size)
    divide_e = _expand(divide, n, block_size)
    zero_e = _expand(zero_block, n, block_size)

    # Zero blocks divide by 1 instead of 0/NaN so no NaN flows; their payload is zeroed below.
    safe_scale = torch.where(zero_e, torch.ones_like(scale_e), scale_e)
    v = torch.where(divide_e, x / safe_scale, x * inv_e)
    v = v.clamp(-qmax, qmax)  # x * inv may exceed qmax by an ulp

    bits = None if seed is None else rand_bits(seed, n, index_offset, device=x.device)
    if fmt == "fp8":
        payload = e4m3_encode(v, bits)
        payload = torch.where(zero_e, torch.zeros_like(payload), payload)
        return payload, scale

    if bits is None:
        q = _round_half_even(v)
    else:
        # floor(v + u): v + u is one fp32 add; v >= -qmax and u >= 0 so only the top can clip.
        q = torch.floor(v + _uniform(bits)).clamp(max=qmax)
    q = torch.where(zero_e, torch.zeros_like(q), q).to(torch.int64)
    if fmt == "int8":
        return q.to(torch.int8).view(torch.uint8), scale
    return pack_int4(q), scale


def _dequantize_f32(payload: Tensor, scales: Tensor, fmt: str, numel: int, block_size: int) -> Tensor:
    """float(q) * scale, one fp32 multiply per element. NaN-scale blocks come out NaN."""
    return decode_q(payload, fmt, numel) * _expand(scales, numel, block_size)


# ---- the ops ------------------------------------------------------------------------------------
def quantize(x: Tensor, fmt: str, block_size: int, seed: Optional[int] = None,
             index_offset: int = 0) -> Tuple[Tensor, Tensor]:
    """``localsgd_comm::quantize``: x (fp32/bf16/fp16, any shape) -> (payload, scales)."""
    _ops._quantize_fake(x, fmt, block_size, seed, index_offset)  # shared argument checks
    return _quantize_f32(_flat_f32(x), fmt, block_size, seed, index_offset)


def dequantize(payload: Tensor, scales: Tensor, fmt: str, numel: int, block_size: int,
               dtype: torch.dtype) -> Tensor:
    """``localsgd_comm::dequantize``: fp32 product, then one round-to-nearest-even cast to dtype."""
    _ops._dequantize_fake(payload, scales, fmt, numel, block_size, dtype)
    return _dequantize_f32(payload, scales, fmt, numel, block_size).to(dtype)


def compress_delta(anchor: Tensor, params: Tensor, residual: Optional[Tensor], fmt: str,
                   block_size: int, seed: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``localsgd_comm::compress_delta``: Q(anchor - params [+ residual]).

    With a residual (error feedback): v = delta + residual, then residual <- v - deQ(Q(v)),
    written in place.
    """
    _ops._compress_delta_fake(anchor, params, residual, fmt, block_size, seed)
    v = _flat_f32(anchor) - _flat_f32(params)
    if residual is not None:
        v = v + _flat_f32(residual)
    payload, scales = _quantize_f32(v, fmt, block_size, seed, 0)
    if residual is not None:
        err = v - _dequantize_f32(payload, scales, fmt, v.numel(), block_size)
        residual.copy_(err.view(residual.shape))
    return payload, scales


def _reduce_f32(payloads: Tensor, scales: Tensor, fmt: str, numel: int, block_size: int,
                factor: float) -> Tensor:
    acc = torch.zeros(numel, dtype=torch.float32, device=payloads.device)
    for r in range(payloads.shape[0]):  # fixed order r = 0..p-1: the sum is not reassociated
        acc = acc + _dequantize_f32(payloads[r], scales[r], fmt, numel, block_size)
    return acc * _f32(factor)


def dequantize_reduce(payloads: Tensor, scales: Tensor, fmt: str, numel: int, block_size: int,
                      factor: float) -> Tensor:
    """``localsgd_comm::dequantize_reduce``: sum_r deQ(chunk r) in fp32, in order, times factor."""
    _ops._dequantize_reduce_fake(payloads, scales, fmt, numel, block_size, factor)
    return _reduce_f32(payloads, scales, fmt, numel, block_size, factor)


def dequantize_reduce_requantize(payloads: Tensor, scales: Tensor, fmt: str, numel: int,
                                 block_size: int, factor: float, seed: Optional[int] = None,
                                 index_offset: int = 0) -> Tuple[Tensor, Tensor]:
    """``localsgd_comm::dequantize_reduce_requantize``: Q(dequantize_reduce(...))."""
    _ops._dequantize_reduce_requantize_fake(payloads, scales, fmt, numel, block_size, factor, seed,
                                            index_offset)
    acc = _reduce_f32(payloads, scales, fmt, numel, block_size, factor)
    return _quantize_f32(acc, fmt, block_size, seed, index_offset)


def _outer_step(anchor: Tensor, momentum: Optional[Tensor], params: Optional[Tensor], g: Tensor,
                lr: float, mu: float, nesterov: bool) -> None:
    """torch.optim.SGD(lr, momentum=mu, nesterov, dampening=0) on anchor, every op in fp32,
    no fused multiply-add (format.h): buf = mu*buf + g; d = g + mu*buf (nesterov) or buf."""
    a = _flat_f32(anchor)
    if mu != 0.0:
        mu32 = _f32(mu)
        buf = _flat_f32(momentum) * mu32 + g
        d = g + buf * mu32 if nesterov else buf
        momentum.copy_(buf.view(momentum.shape))
    else:
        d = g
    a = a - d * _f32(lr)
    anchor.copy_(a.view(anchor.shape))
    if params is not None:
        params.copy_(a.view(params.shape))  # one round-to-nearest-even cast to params.dtype


def outer_nesterov_step(anchor: Tensor, momentum: Optional[Tensor], params: Optional[Tensor],
                        grad: Tensor, lr: float, mu: float, nesterov: bool) -> None:
    """``localsgd_comm::outer_nesterov_step``: in place on anchor, momentum and params."""
    _ops._outer_nesterov_step_fake(anchor, momentum, params, grad, lr, mu, nesterov)
    _outer_step(anchor, momentum, params, _flat_f32(grad), lr, mu, nesterov)


def outer_nesterov_step_compressed(anchor: Tensor, momentum: Optional[Tensor], params: Optional[Tensor],
                                   payload: Tensor, scales: Tensor, fmt: str, block_size: int,
                                   grad_factor: float, lr: float, mu: float, nesterov: bool) -> None:
    """``localsgd_comm::outer_nesterov_step_compressed``: g = (float(q) * scale) * grad_factor."""
    _ops._outer_nesterov_step_compressed_fake(anchor, momentum, params, payload, scales, fmt,
                                              block_size, grad_factor, lr, mu, nesterov)
    g = _dequantize_f32(payload, scales, fmt, anchor.numel(), block_size) * _f32(grad_factor)
    _outer_step(anchor, momentum, params, g, lr, mu, nesterov)


#: op name -> implementation, for tests and tools that iterate over all ops (the names are
#: those declared in localsgd_comm/_ops.py, so a new op cannot be missed here).
OPS = {name: globals()[name] for name in _ops._SCHEMAS}

__all__ = list(OPS) + ["OPS", "e4m3_encode", "e4m3_decode", "pack_int4", "unpack_int4", "decode_q",
                       "rand_bits", "seed_key"]
