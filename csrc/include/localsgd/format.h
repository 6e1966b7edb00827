// localsgd-comm wire format, version 1. THE single place that documents the bytes.
//
// Every implementation (C++ CPU, CUDA C++, Triton, the pure-PyTorch reference) follows the
// arithmetic below step by step, so round-to-nearest output is byte-identical everywhere.
// The helpers are header-only and usable from host and device code (LSG_HD).
//
// A tensor of n elements is viewed as a flat buffer and cut into blocks of B elements
// (B = block_size, a power of two in [kMinBlockSize, kMaxBlockSize]); block k covers
// elements [k*B, min((k+1)*B, n)). The last block may be shorter: that is normal.
//
// Encoded form = (payload: uint8[payload_bytes(fmt, n)], scales: float32[num_blocks(n, B)]).
//
//   format  code  payload                                          qmax
//   none    0     (not encoded: the tensor itself travels)          -
//   int8    1     1 byte/element, int8 two's complement in [-127,127]  127
//   int4    2     2 elements/byte: element i -> byte i/2, LOW nibble   7
//                 when i is even, HIGH nibble when i is odd; nibble =
//                 q & 0xF (4-bit two's complement, q in [-7, 7]); an odd
//                 n leaves the last high nibble 0
//   fp8     3     1 byte/element, OCP FP8 E4M3 ("e4m3fn": bias 7, no    448
//                 inf, max 448, 0x7F/0xFF = NaN never produced)
//
// Quantize, per block (all in fp32, no FMA contraction anywhere; build flags enforce it):
//   absmax = max |x_i| over the block (x converted to fp32 first: bf16/fp16 widen exactly)
//   if the block holds any NaN or +-Inf:  scale = NaN, every payload element of the block = 0.
//       Dequantize then yields NaN for the whole block, so a caller detects it from the
//       scales alone (cheap: one float per block). This is the documented NaN/Inf contract.
//   elif absmax == 0:                     scale = 0, q = 0.
//   else:
//       scale = absmax / qmax             (IEEE division, correctly rounded)
//       if qmax * scale overflows to inf: scale = the next float toward zero (bits - 1)
//       if scale == 0 (absmax is a few tiny subnormals): store scale 0, q = 0 (as all-zero)
//       if scale >= FLT_MIN (normal):     v = x * (1.0f / scale)     (both correctly rounded)
//       else (subnormal scale):           v = x / scale              (1/scale would overflow)
//       v = clamp(v, -qmax, +qmax)        (x*inv may exceed qmax by an ulp)
//       int8/int4: q = round_half_even(v)              [stochastic: q = floor(v + u)]
//       fp8:       q = e4m3_encode(v)  (see below)     [stochastic: see below]
// Dequantize: x' = float(q) * scale (one fp32 multiply), then cast to the output dtype with
//   round-to-nearest-even.
//
// Error bound (round to nearest, per element): |x - x'| <= scale/2 for int8/int4
//   (plus one fp32 rounding of the multiply, <= 2^-24 |x'|); for fp8, half an e4m3 ulp of
//   v times scale, i.e. <= 2^-4 |x| for |v| >= 2^-6, and <= 2^-10 * scale below that.
//
// e4m3_encode(v), |v| <= 448, round to nearest even, done with integer ops so that CPU, CUDA,
// Triton and torch's .to(torch.float8_e4m3fn) agree bit for bit:
//   a = |v|, s = sign bit of v
//   if a < 2^-6 (e4m3 subnormal range): m = round_half_even(a * 512)  (0..8; 8 is the
//       smallest normal, code 0x08, so the formula is continuous)
//   else: b = fp32 bits of a; m = (b + 0x7FFFF + ((b >> 20) & 1)) >> 20) - (120 << 3)
//       (round the 23-bit mantissa to 3 bits, carry into the exponent, rebias 127 -> 7)
//   code = m | (s << 7)
// e4m3_decode(code): e = (code >> 3) & 15, m = code & 7;
//   e == 0 -> m * 2^-9, else (8 + m) * 2^(e - 10); sign from bit 7.
//
// Stochastic rounding (optional, seeded, reproducible, unbiased up to the fp32 rounding of
// v + u): u = (rand_bits(seed, i) >> 8) * 2^-24 in [0, 1), where i is the element's index in
// the flat buffer being quantized (plus index_offset when a kernel quantizes a slice of a
// larger buffer, so a chunked all-reduce draws the same numbers as a whole-buffer call).
//   int8/int4: q = clamp(floor(v + u), -qmax, qmax)
//   fp8: subnormal range: m = floor(a * 512 + u); normal range: m = ((b + (rand_bits >> 12))
//        >> 20) - (120 << 3), i.e. the 20 discarded mantissa bits are compared against 20
//        random bits; both clamp the code to 0x7E (448).
// rand_bits(seed, i) = mix32(lo32(i) ^ mix32(hi32(i) ^ key)), key = mix32(lo32(seed) ^
//   mix32(hi32(seed) + 0x9E3779B9)); mix32 is the "lowbias"-style integer hash below. All
//   arithmetic is uint32 with wrap-around, so every implementation produces the same bits.
//
// Reductions (dequantize_reduce): acc = 0; for r in 0..p-1: acc = acc + float(q_r) * s_r
//   (fixed order, fp32, no FMA), then out = acc * factor (factor = 1 for SUM, 1/p for AVG).
//   Any NaN scale makes the block's sum NaN, and requantizing it gives a NaN scale again.
#pragma once

#include <cstdint>
#include <cmath>
#include <cfloat>

#if defined(__CUDACC__)
#define LSG_HD __host__ __device__ __forceinline__
#else
#define LSG_HD inline
#endif

namespace localsgd {

enum class Format : int32_t { None = 0, Int8 = 1, Int4 = 2, Fp8 = 3 };

// Default block size: chosen by measurement (benchmarks/block_size_sweep.py, results in
// benchmarks/results/block_size_sweep.md). Error only grows with the block, so the default is
// the smallest power of two within the byte budgets with fp32 scales: 128 (int8/fp8: 1 + 4/128
// = 1.031 <= 1.04 B/elem; int4: 0.5 + 4/128 = 0.531 <= 0.54). 256 would save 1.5% of the bytes
// for 1.26x the int8 relative RMSE on heavy-tailed data.
constexpr int64_t kDefaultBlockSize = 128;
constexpr int64_t kMinBlockSize = 16;
constexpr int64_t kMaxBlockSize = 8192;

LSG_HD bool valid_block_size(int64_t b) {
  return b >= kMinBlockSize && b <= kMaxBlockSize && (b & (b - 1)) == 0;
}

LSG_HD float qmax(Format f) {
  return f == Format::Int8 ? 127.0f : (f == Format::Int4 ? 7.0f : (f == Format::Fp8 ? 448.0f : 0.0f));
}

LSG_HD int64_t num_blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

LSG_HD int64_t payload_bytes(Format f, int64_t n) {
  return f == Format::Int4 ? (n + 1) / 2 : (f == Format::None ? 4 * n : n);
}

// ---- hashing for stochastic rounding ---------------------------------------------------------
LSG_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}
LSG_HD uint32_t seed_key(uint64_t seed) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) + 0x9E3779B9u));
}
LSG_HD uint32_t rand_bits(uint32_t key, uint64_t i) {
  return mix32(static_cast<uint32_t>(i) ^ mix32(static_cast<uint32_t>(i >> 32) ^ key));
}
LSG_HD float rand_uniform(uint32_t key, uint64_t i) {  // [0, 1), 24 random bits
  return static_cast<float>(rand_bits(key, i) >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// ---- bit casts (host + device) --------------------------------------------------------------
LSG_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; __builtin_memcpy(&u, &f, 4); return u;
#endif
}
LSG_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; __builtin_memcpy(&f, &u, 4); return f;
#endif
}

// round half to even for |v| < 2^22 (the magic-number trick; no libm call, vectorizes).
// Requires no -ffast-math (reassociation would fold it away).
LSG_HD float round_half_even(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return v >= 0.0f ? (v + magic) - magic : -((-v + magic) - magic);
}

// ---- per-block parameters -------------------------------------------------------------------
struct BlockQuant {
  float scale;   // stored scale (NaN for non-finite blocks, 0 for all-zero blocks)
  float inv;     // 1/scale when scale is normal, else 0
  bool divide;   // subnormal scale: use v = x / scale
  bool zero;     // all-zero or non-finite block: every q is 0
};

// absmax: max |x| of the block; nonfinite: the block holds a NaN or an Inf.
LSG_HD BlockQuant block_params(float absmax, bool nonfinite, Format f) {
  BlockQuant b;
  if (nonfinite) { b.scale = NAN; b.inv = 0.0f; b.divide = false; b.zero = true; return b; }
  if (absmax == 0.0f) { b.scale = 0.0f; b.inv = 0.0f; b.divide = false; b.zero = true; return b; }
  b.scale = absmax / qmax(f);
  // qmax * scale must stay finite, or the block's largest element dequantizes to inf (seen at
  // absmax = FLT_MAX with int8: FLT_MAX/127 rounds up). The exact quotient lies between the
  // rounded scale and the float below it, so one ulp toward zero gives qmax*scale < absmax.
  if (!(b.scale * qmax(f) <= FLT_MAX)) b.scale = bits_f32(f32_bits(b.scale) - 1u);
  // A block whose absmax is a few of the smallest subnormals gives a scale that underflows to
  // 0: encode it as an all-zero block (x / 0 would make the payload platform-dependent).
  if (b.scale == 0.0f) { b.inv = 0.0f; b.divide = false; b.zero = true; return b; }
  b.zero = false;
  b.divide = !(b.scale >= FLT_MIN);
  b.inv = b.divide ? 0.0f : 1.0f / b.scale;
  return b;
}

LSG_HD float scaled_value(float x, const BlockQuant& b, Format f) {
  float v = b.divide ? x / b.scale : x * b.inv;
  const float m = qmax(f);
  return v > m ? m : (v < -m ? -m : v);
}

// ---- int8 / int4 ----------------------------------------------------------------------------
LSG_HD int32_t quant_int_rn(float v) { return static_cast<int32_t>(round_half_even(v)); }
LSG_HD int32_t quant_int_sr(float v, float u, float m) {
  float q = floorf(v + u);
  q = q > m ? m : q;
  return static_cast<int32_t>(q);
}
LSG_HD uint8_t pack_int4(int32_t lo, int32_t hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}
LSG_HD int32_t int4_lo(uint8_t byte) { return static_cast<int32_t>(static_cast<int8_t>(byte << 4)) >> 4; }
LSG_HD int32_t int4_hi(uint8_t byte) { return static_cast<int32_t>(static_cast<int8_t>(byte)) >> 4; }

// ---- fp8 e4m3 -------------------------------------------------------------------------------
LSG_HD uint8_t e4m3_encode_rn(float v) {
  const uint32_t sign = f32_bits(v) >> 31;
  const float a = fabsf(v);
  uint32_t m;
  if (a < 0.015625f) {  // 2^-6
    m = static_cast<uint32_t>(round_half_even(a * 512.0f));
  } else {
    const uint32_t b = f32_bits(a);
    m = ((b + 0x7FFFFu + ((b >> 20) & 1u)) >> 20) - (120u << 3);
  }
  m = m > 0x7Eu ? 0x7Eu : m;
  return static_cast<uint8_t>(m | (sign << 7));
}
// rbits: 32 random bits (rand_bits); u: the matching uniform (rand_uniform).
LSG_HD uint8_t e4m3_encode_sr(float v, uint32_t rbits, float u) {
  const uint32_t sign = f32_bits(v) >> 31;
  const float a = fabsf(v);
  uint32_t m;
  if (a < 0.015625f) {
    m = static_cast<uint32_t>(floorf(a * 512.0f + u));
  } else {
    const uint32_t b = f32_bits(a);
    m = ((b + (rbits >> 12)) >> 20) - (120u << 3);
  }
  m = m > 0x7Eu ? 0x7Eu : m;
  return static_cast<uint8_t>(m | (sign << 7));
}
LSG_HD float e4m3_decode(uint8_t code) {
  const uint32_t e = (code >> 3) & 15u, m = code & 7u;
  float a = e == 0 ? static_cast<float>(m) * 0.001953125f  // 2^-9
                   : bits_f32(((e + 120u) << 23) | (m << 20));
  return (code & 0x80u) ? -a : a;
}

// ---- whole element helpers (used by kernels that are not vectorized by hand) ----------------
// Decode element i of a block-quantized payload to float(q) (before the scale multiply).
LSG_HD float decode_q(Format f, const uint8_t* payload, int64_t i) {
  if (f == Format::Int8) return static_cast<float>(static_cast<int8_t>(payload[i]));
  if (f == Format::Int4) {
    const uint8_t byte = payload[i >> 1];
    return static_cast<float>((i & 1) ? int4_hi(byte) : int4_lo(byte));
  }
  return e4m3_decode(payload[i]);
}

}  // namespace localsgd
