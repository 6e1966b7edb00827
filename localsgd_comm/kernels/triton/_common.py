"""Shared Triton device helpers: the wire format of csrc/include/localsgd/format.h, step by step.

Every helper mirrors one function of format.h so that round-to-nearest bytes equal the C++ and
CUDA kernels' bytes. Hazards handled here (each was observed, see docs/platform.md):

* Division: fp32 ``/`` may lower to an approximate division on NVIDIA; the format needs IEEE
  division, so every division is ``tl.math.div_rn`` (the interpreter maps it to numpy's IEEE
  divide, so it needs no guard).
* FMA: Triton contracts ``a * b + c`` into FMA unless the launch passes
  ``enable_fp_fusion=False``; every launcher passes :data:`LAUNCH_OPTS`
  (tests/test_compile_checks.py checks the PTX holds no ``fma``).
* Flush-to-zero: libdevice calls default to their ftz variants; LAUNCH_OPTS turns that off
  (the compile checks assert the PTX has no ``.ftz``).
* Interpreter: f32->bf16 casts truncate and f32->fp8 casts are wrong, so bf16 input/output
  and e4m3 encoding use integer bit operations; bf16 tensors travel as int16 views.
  Round-half-even uses the 1.5 * 2^23 magic number (no libdevice: it returns None there).
* Unmasked out-of-bounds stores corrupt host memory in the interpreter: every store is masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch options shared by every kernel: no FMA contraction (format.h fixes the fp32 arithmetic)
# and no flush-to-zero in libdevice-lowered math (tl.floor otherwise compiles to
# cvt.rmi.ftz.f32, which turns floor(-denormal) = -1 into 0 in stochastic rounding).
LAUNCH_OPTS = {"enable_fp_fusion": False, "enable_reflect_ftz": False}

# Elements per program: 4096 fp32 = 16 KiB read per program keeps enough bytes in flight per SM
# on H100 with 4 warps (32 elements per thread) and, under TRITON_INTERPRET=1 where each program
# instance costs ~1 ms, keeps test sizes of 256K elements at 64 programs.
TILE_ELEMS = 4096
NUM_WARPS = 4

FORMAT_CODES = {"int8": 1, "int4": 2, "fp8": 3}
QMAX = {1: 127.0, 2: 7.0, 3: 448.0}
# Element kinds for loads/stores: 0 fp32, 1 bf16 (as int16 bits), 2 fp16.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def rows_per_program(block_size: int) -> int:
    """Quantization blocks per program (a power of two, since block_size is one)."""
    return max(1, TILE_ELEMS // block_size)


def num_warps_for(block_size: int) -> int:
    # 8 warps for the widest tiles (block 8192 -> one 8192-element row per program).
    return NUM_WARPS if block_size <= TILE_ELEMS else 8


def _mix32_host(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & m
    x ^= x >> 15
    x = (x * 0x735A2D97) & m
    x ^= x >> 15
    return x


def seed_key(seed: int) -> int:
    """format.h seed_key(seed) as a signed int32 (so Triton types the argument i32)."""
    s = seed & 0xFFFFFFFFFFFFFFFF  # an int64 seed is reinterpreted as uint64, as in C++
    key = _mix32_host((s & 0xFFFFFFFF) ^ _mix32_host(((s >> 32) + 0x9E3779B9) & 0xFFFFFFFF))
    return key - (1 << 32) if key >= (1 << 31) else key


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors travel as int16 bits (interpreter bf16 casts truncate; see module doc)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


# ---- device helpers ---------------------------------------------------------------------------
@triton.jit
def _mix32(x):
    # x: uint32; all arithmetic wraps modulo 2^32 as in format.h mix32.
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def _rand_bits(key, idx):
    # format.h rand_bits(key, i): key int32 (bit pattern of the uint32 key), idx int64 >= 0.
    k = key.to(tl.uint32, bitcast=True)
    lo = idx.to(tl.uint32)  # truncation keeps the low 32 bits
    hi = (idx >> 32).to(tl.uint32)
    return _mix32(lo ^ _mix32(hi ^ k))


@triton.jit
def _round_half_even(v):
    # format.h round_half_even: exact for |v| < 2^22 (callers clamp to <= 448).
    return tl.where(v >= 0.0, (v + 12582912.0) - 12582912.0, -((-v + 12582912.0) - 12582912.0))


@triton.jit
def _load_f32(ptr, offs, mask, KIND: tl.constexpr):
    # KIND 0 fp32, 1 bf16 (int16 bits), 2 fp16; widening is exact.
    if KIND == 1:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    elif KIND == 2:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _store_f32(ptr, offs, x, mask, KIND: tl.constexpr):
    # Round-to-nearest-even into the output dtype.
    if KIND == 1:
        # bf16 = c10::BFloat16 round_to_nearest_even: NaN -> 0x7FC0, else RNE on the high half.
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.int16), mask=mask)
    elif KIND == 2:
        # fp16: cvt.rn.f16.f32 on GPU, numpy's RNE conversion in the interpreter (both exact RNE,
        # subnormals and overflow to Inf included; checked against torch in tests/test_triton.py).
        tl.store(ptr + offs, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)


@triton.jit
def _block_absmax_bits(x):
    # Max of |x| over each row as fp32 bit patterns: for non-negative floats the integer order is
    # the float order, and every NaN/Inf maps to >= 0x7F800000, so one integer max gives both
    # absmax and the "block holds NaN or Inf" flag (format.h block_params).
    return tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)


@triton.jit
def _e4m3_decode(code):
    # code: int32 in [0, 255]; format.h e4m3_decode.
    e = (code >> 3) & 15
    m = code & 7
    sub = m.to(tl.float32) * 0.001953125  # 2^-9
    nrm = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    a = tl.where(e == 0, sub, nrm)
    return tl.where((code & 0x80) != 0, -a, a)


@triton.jit
def _int4_byte_offsets(blocks, n, R: tl.constexpr, B: tl.constexpr):
    # [R, B/2] payload byte offsets of an int4 tile and their mask (byte j holds elements 2j and
    # 2j+1; it exists when 2j < n). Built from an arange, so Triton sees B/2 contiguous bytes per
    # row and vectorizes the access (offsets derived from the element offsets by //2 are opaque
    # to its contiguity analysis: one masked byte access per element, 4-6x slower on an H200).
    boffs = blocks[:, None] * (B // 2) + tl.arange(0, B // 2)[None, :]
    return boffs, boffs * 2 < n


@triton.jit
def _decode_q(pay_ptr, blocks, offs, mask, n, FMT: tl.constexpr, R: tl.constexpr, B: tl.constexpr):
    # float(q) for the [R, B] tile of element indices `offs` (format.h decode_q).
    if FMT == 2:
        # int4: load each byte once as an [R, B/2] tile and interleave the two nibbles into [R, B].
        boffs, bmask = _int4_byte_offsets(blocks, n, R, B)
        byte = tl.load(pay_ptr + boffs, mask=bmask, other=0).to(tl.int32)
        lo = ((byte << 28) >> 28)  # sign-extend the low nibble (int32 arithmetic shift)
        hi = ((byte << 24) >> 28)
        q = tl.reshape(tl.join(lo, hi), [R, B])
        return q.to(tl.float32)
    elif FMT == 1:
        return tl.load(pay_ptr + offs, mask=mask, other=0).to(tl.int8).to(tl.float32)
    else:
        code = tl.load(pay_ptr + offs, mask=mask, other=0).to(tl.int32)
        return _e4m3_decode(code)


@triton.jit
def _quantize_tile(x, idx, key, FMT: tl.constexpr, QM: tl.constexpr, STOCH: tl.constexpr):
    """Quantize an [R, B] fp32 tile, one block per row (masked elements must be 0).

    Returns (q, scale, deq): q int32 [R, B] (int8/int4: the signed value, fp8: the e4m3 code),
    scale fp32 [R] as stored, deq fp32 [R, B] = float(q) * scale (format.h dequantize).
    idx: int64 [R, B] element indices (with index_offset) for stochastic rounding.
    QM: the format's qmax (127, 7, 448) as a float.
    """
    amax_bits = _block_absmax_bits(x)
    nonfinite = amax_bits >= 0x7F800000
    absmax = amax_bits.to(tl.float32, bitcast=True)
    zero = nonfinite | (absmax == 0.0)
    scale = tl.math.div_rn(tl.where(zero, 1.0, absmax), QM)  # IEEE division (format.h)
    # format.h: if qmax * scale overflows, step the scale one ulp toward zero; a scale that
    # underflows to 0 makes the block an all-zero block.
    over = (scale * QM) > 3.4028234663852886e38
    scale = tl.where(over, (scale.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), scale)
    zero = zero | (scale == 0.0)
    divide = scale < 1.1754943508222875e-38  # FLT_MIN: 1/scale would overflow
    inv = tl.math.div_rn(1.0, tl.where(divide, 1.0, scale))
    v = x * inv[:, None]
    # A subnormal scale divides instead (format.h). Both sides of a tl.where are computed, and an
    # IEEE division per element costs more than the rest of the quantize: only tiles holding
    # such a block (all-tiny blocks, in practice never) pay for it.
    if tl.max(divide.to(tl.int32), axis=0) > 0:
        v = tl.where(divide[:, None], tl.math.div_rn(x, scale[:, None]), v)
    v = tl.where(v > QM, QM, tl.where(v < -QM, -QM, v))
    if STOCH:
        rbits = _rand_bits(key, idx)
        u = (rbits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    if FMT == 3:
        sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
        a = tl.abs(v)
        b = a.to(tl.int32, bitcast=True)
        if STOCH:
            m_sub = tl.floor(a * 512.0 + u).to(tl.int32)
            m_nrm = ((b.to(tl.uint32, bitcast=True) + (rbits >> 12)) >> 20).to(tl.int32) - 960
        else:
            m_sub = _round_half_even(a * 512.0).to(tl.int32)
            m_nrm = ((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) - 960  # 960 = 120 << 3
        m = tl.where(a < 0.015625, m_sub, m_nrm)
        m = tl.minimum(m, 0x7E)
        q = m | (sign << 7)
        q = tl.where(zero[:, None], 0, q)
        qf = _e4m3_decode(q)
    else:
        if STOCH:
            qf = tl.floor(v + u)
            qf = tl.where(qf > QM, QM, qf)
        else:
            qf = _round_half_even(v)
        qf = tl.where(zero[:, None], 0.0, qf)
        q = qf.to(tl.int32)
    stored = tl.where(nonfinite, (tl.zeros_like(amax_bits) + 0x7FC00000).to(tl.float32, bitcast=True),
                      tl.where(absmax == 0.0, 0.0, scale))
    deq = qf * stored[:, None]
    return q, stored, deq


@triton.jit
def _store_payload(pay_ptr, blocks, offs, mask, n, q, FMT: tl.constexpr, R: tl.constexpr, B: tl.constexpr):
    # Write q ([R, B], int32) in the format's byte layout (format.h table).
    if FMT == 2:
        pairs = tl.reshape(q, [R, B // 2, 2])
        lo, hi = tl.split(pairs)
        byte = (lo & 0xF) | ((hi & 0xF) << 4)  # odd n: the masked last high nibble is q=0
        boffs, bmask = _int4_byte_offsets(blocks, n, R, B)
        tl.store(pay_ptr + boffs, byte.to(tl.uint8), mask=bmask)
    else:
        tl.store(pay_ptr + offs, (q & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _tile_offsets(pid, R: tl.constexpr, B: tl.constexpr):
    # [R, B] element offsets of program pid (int64: buffers may exceed 2^31 elements) and the
    # [R] block indices.
    blocks = pid.to(tl.int64) * R + tl.arange(0, R)
    offs = blocks[:, None] * B + tl.arange(0, B)[None, :]
    return offs, blocks
