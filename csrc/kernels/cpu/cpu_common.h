// Internal helpers of the CPU kernels (not installed, not part of the kernels.h API):
// torch-free bf16/fp16 conversions, the per-block quantizer shared by quantize,
// compress_delta and dequantize_reduce(+requantize), and the OpenMP policy.
//
// Everything here follows format.h step by step; where a helper is rewritten instead of
// called (floor, e4m3 decode), the reason is vectorization and the equivalence is checked
// exhaustively or over the full input range by csrc/tests/test_format.cpp.
// Hot loops are written branch-free (selects, integer bit tricks) so that GCC vectorizes
// them without -ffast-math, which the wire format forbids.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "localsgd/format.h"
#include "localsgd/kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// Every helper below is force-inlined into the per-ISA range functions of the kernels, so the
// loops are compiled (and vectorized) once per instruction set: see LSG_AVX2.
#define LSG_INLINE inline __attribute__((always_inline))
// AVX2 (8 fp32 lanes, 32-bit integer multiply for the SR hash) is chosen at run time; the
// package is built for baseline x86-64 so that it runs on any CPU. Measured on the 2-core
// AMD EPYC dev machine, 1 thread, int8 compress_delta of 16M fp32: ~41 ms with the SSE2
// baseline loops, ~10 ms with AVX2 (about memcpy speed). No "fma" in the target: the wire
// format forbids contraction (and -ffp-contract=off is set anyway).
#if defined(__x86_64__) && defined(__GNUC__)
#define LSG_HAVE_AVX2_PATH 1
#define LSG_AVX2 __attribute__((target("avx2")))
#else
#define LSG_HAVE_AVX2_PATH 0
#define LSG_AVX2
#endif

namespace localsgd {
namespace cpu {
namespace detail {

// ---- small exact helpers that vectorize ---------------------------------------------------
// GCC (with the default -ftrapping-math) will not if-convert a select whose arms compute
// floating-point values, so format.h's sign-branching round_half_even and a floorf (maybe a
// libm call) would keep the hot loops scalar: measured 5-10x slower. These helpers compute
// every arm unconditionally and select plain values.
//
// round_half_even(v) for |v| < 2^22: adding 1.5 * 2^23 puts v in [2^23, 2^24), where the fp32
// ulp is 1, so the addition rounds v half-to-even for either sign. Equal to format.h's
// round_half_even except for the sign of a zero result, which no caller can observe (the
// result is converted to an integer).
LSG_INLINE float rne_small(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (v + magic) - magic;
}
// floor(w) for |w| < 2^22 (all callers: w = v + u with |v| <= 448, u in [0, 1)).
LSG_INLINE float floor_small(float w) {
  const int32_t t = static_cast<int32_t>(w);  // truncation toward zero
  // integer fix-up (a float select here kept the fp8 SR loop scalar)
  return static_cast<float>(t - static_cast<int32_t>(static_cast<float>(t) > w));
}

// ---- bf16 / fp16 <-> fp32, matching torch's CPU conversions bit for bit for every non-NaN
// value (round to nearest even). NaN stays NaN: bf16 gives 0x7FC0 and fp16 sign|0x7E00, the
// canonical quiet NaNs of c10's scalar conversions (torch's vectorized paths may pick other
// NaN payloads, so callers compare NaNs as NaNs, never by bits).
LSG_INLINE float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

LSG_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

LSG_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t x = h;
  const uint32_t sign = (x & 0x8000u) << 16;
  const uint32_t e = (x >> 10) & 0x1Fu, m = x & 0x3FFu;
  const uint32_t normal = ((e + 112u) << 23) | (m << 13);  // rebias 15 -> 127
  const uint32_t infnan = 0x7F800000u | (m << 13);
  // subnormal: m * 2^-24, exact in fp32 (m < 2^10)
  const uint32_t sub = f32_bits(static_cast<float>(static_cast<int32_t>(m)) * 5.9604644775390625e-08f);
  const uint32_t mag = e == 0 ? sub : (e == 31 ? infnan : normal);
  return bits_f32(sign | mag);
}

LSG_INLINE uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // normal half range: rebias 127 -> 15 and round the 13 dropped mantissa bits half-even;
  // a carry out of the mantissa bumps the exponent, which is the correct result.
  const uint32_t nrm = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // below 2^-14 the half is subnormal: code = round_half_even(|f| * 2^24) in 0..1024 (1024 is
  // the smallest normal, 0x400, so the two ranges join). The min() keeps the float->int
  // conversion in range for the lanes where this branch is not selected.
  const float af = bits_f32(a);
  const float small = af < 6.103515625e-05f ? af : 6.103515625e-05f;
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(rne_small(small * 16777216.0f)));
  // 0x477FF000 = 65520, the midpoint between 65504 (max half) and 2^16: ties go to inf (even).
  const uint32_t mag = a > 0x7F800000u ? 0x7E00u : (a >= 0x477FF000u ? 0x7C00u : (a >= 0x38800000u ? nrm : sub));
  return static_cast<uint16_t>(sign | mag);
}

template <DType D> struct Elem;
template <> struct Elem<DType::F32> {
  using T = float;
  LSG_INLINE static float load(T x) { return x; }
  LSG_INLINE static T store(float f) { return f; }
};
template <> struct Elem<DType::BF16> {
  using T = uint16_t;
  LSG_INLINE static float load(T x) { return bf16_to_f32(x); }
  LSG_INLINE static T store(float f) { return f32_to_bf16(f); }
};
template <> struct Elem<DType::F16> {
  using T = uint16_t;
  LSG_INLINE static float load(T x) { return f16_to_f32(x); }
  LSG_INLINE static T store(float f) { return f32_to_f16(f); }
};

// format.h e4m3_decode, with the sign applied as a bit (same bits, incl. -0) and no branch.
LSG_INLINE float e4m3_decode_v(uint32_t c) {
  const uint32_t e = (c >> 3) & 15u, m = c & 7u;
  const uint32_t sub = f32_bits(static_cast<float>(static_cast<int32_t>(m)) * 0.001953125f);  // m * 2^-9
  const uint32_t mag = e == 0 ? sub : (((e + 120u) << 23) | (m << 20));
  return bits_f32(mag | ((c & 0x80u) << 24));
}

// format.h e4m3_encode_rn / e4m3_encode_sr for |v| <= 448 (the caller clamps), as selects.
LSG_INLINE uint8_t e4m3_encode_rn_v(float v) {
  const uint32_t bits = f32_bits(v);
  const uint32_t sign = bits >> 31;
  const uint32_t b = bits & 0x7FFFFFFFu;
  const float a = bits_f32(b);
  const float as = a < 0.015625f ? a : 0.015625f;  // keeps the unused lane's convert in range
  const uint32_t msub = static_cast<uint32_t>(static_cast<int32_t>(rne_small(as * 512.0f)));
  const uint32_t mnrm = ((b + 0x7FFFFu + ((b >> 20) & 1u)) >> 20) - (120u << 3);
  uint32_t m = a < 0.015625f ? msub : mnrm;
  m = m > 0x7Eu ? 0x7Eu : m;
  return static_cast<uint8_t>(m | (sign << 7));
}
LSG_INLINE uint8_t e4m3_encode_sr_v(float v, uint32_t rbits, float u) {
  const uint32_t bits = f32_bits(v);
  const uint32_t sign = bits >> 31;
  const uint32_t b = bits & 0x7FFFFFFFu;
  const float a = bits_f32(b);
  const float as = a < 0.015625f ? a : 0.015625f;
  // floor(a * 512 + u): the argument is >= 0, so truncation is the floor (and, unlike
  // floor_small, keeps this loop vectorizable).
  const uint32_t msub = static_cast<uint32_t>(static_cast<int32_t>(as * 512.0f + u));
  const uint32_t mnrm = ((b + (rbits >> 12)) >> 20) - (120u << 3);
  uint32_t m = a < 0.015625f ? msub : mnrm;
  m = m > 0x7Eu ? 0x7Eu : m;
  return static_cast<uint8_t>(m | (sign << 7));
}

// |x| as integer bits. For non-negative IEEE floats the bit pattern orders like the value and
// NaN/Inf sort above every finite number, so one integer max (which GCC vectorizes without
// -ffast-math, unlike a NaN-aware float max) yields both absmax and the non-finite flag.
LSG_INLINE uint32_t abs_bits(float f) { return f32_bits(f) & 0x7FFFFFFFu; }
constexpr uint32_t kInfBits = 0x7F800000u;

// ---- OpenMP policy --------------------------------------------------------------------------
// Below this many elements a parallel region costs more than it saves: a libgomp fork/join is
// a few microseconds (and wakes a thread on a shared, busy machine), while 64K elements take
// ~35 us on one core (int8 compress_delta of 16M: ~9 ms CPU time, measured).
constexpr int64_t kParallelMinElems = int64_t(1) << 16;

inline int threads_for(int64_t n) {
#ifdef _OPENMP
  if (n < kParallelMinElems || omp_in_parallel()) return 1;
  const int t = omp_get_max_threads();
  return t < 1 ? 1 : t;
#else
  (void)n;
  return 1;
#endif
}

// LOCALSGD_CPU_ISA=baseline forces the baseline loops (debugging; the C++ tests run both).
inline std::atomic<bool>& baseline_forced() {
  static std::atomic<bool> forced{[] {
    const char* v = std::getenv("LOCALSGD_CPU_ISA");
    return v != nullptr && std::strcmp(v, "baseline") == 0;
  }()};
  return forced;
}

inline bool use_avx2() {
#if LSG_HAVE_AVX2_PATH
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok && !baseline_forced().load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// Runs fn(k0, k1) on [0, nitems) split into one contiguous range per thread (static schedule).
// The per-ISA range function is called once per thread, so its loops never sit inside an
// OpenMP-outlined body compiled for the baseline ISA.
template <typename Fn>
void parallel_ranges(int64_t nitems, int nt, const Fn& fn) {
  if (nt <= 1 || nitems < 2) {
    fn(int64_t(0), nitems);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t k0 = nitems * t / T, k1 = nitems * (t + 1) / T;
    if (k0 < k1) fn(k0, k1);
  }
#endif
}

// ---- per-block quantizer --------------------------------------------------------------------
// Quantizes one block of staged fp32 values v[0..len) whose abs-bit max is maxbits.
//   gstart: index of v[0] in the whole buffer (incl. index_offset), for stochastic rounding;
//           a multiple of the block size, so hi32(index) is constant over the block.
//   pay:    the block's payload bytes (int4: starts at byte gstart_local/2).
//   res:    EF only: receives v - deQ(q), the error-feedback residual (may alias nothing).
// Values from format.h: scale, inv, divide path, clamp, round-half-even / SR, e4m3.
// int8/int4 values: q[i] in [-qmax, qmax] as int8.
template <Format F, bool SR, bool EF, bool DIV>
LSG_INLINE void quantize_int_values(const float* __restrict v, int64_t len, float scale, float inv,
                                uint32_t lo0, uint32_t hkey, int8_t* __restrict q, float* __restrict res) {
  constexpr float m = F == Format::Int8 ? 127.0f : 7.0f;
  for (int64_t i = 0; i < len; ++i) {
    float s = DIV ? v[i] / scale : v[i] * inv;
    s = s > m ? m : s;
    s = s < -m ? -m : s;  // two plain selects: a nested one would not if-convert
    float qf;
    if constexpr (SR) {
      const uint32_t r = mix32((lo0 + static_cast<uint32_t>(i)) ^ hkey);
      const float u = static_cast<float>(static_cast<int32_t>(r >> 8)) * 5.9604644775390625e-08f;
      qf = floor_small(s + u);
      qf = qf > m ? m : qf;  // v + u may round up to qmax + 1
    } else {
      qf = rne_small(s);
    }
    q[i] = static_cast<int8_t>(static_cast<int32_t>(qf));
    if constexpr (EF) res[i] = v[i] - qf * scale;  // qf == float(q) exactly
  }
}

template <Format F, bool SR, bool EF, bool DIV>
LSG_INLINE void quantize_values(const float* __restrict v, int64_t len, float scale, float inv,
                            uint64_t gstart, uint32_t key, uint8_t* __restrict pay,
                            float* __restrict res) {
  // rand_bits(key, i) = mix32(lo32(i) ^ mix32(hi32(i) ^ key)); hi32 is constant over a block.
  const uint32_t hkey = mix32(static_cast<uint32_t>(gstart >> 32) ^ key);
  const uint32_t lo0 = static_cast<uint32_t>(gstart);
  if constexpr (F == Format::Fp8) {
    constexpr float m = 448.0f;
    for (int64_t i = 0; i < len; ++i) {
      float s = DIV ? v[i] / scale : v[i] * inv;
      s = s > m ? m : s;
    s = s < -m ? -m : s;  // two plain selects: a nested one would not if-convert
      uint8_t code;
      if constexpr (SR) {
        const uint32_t r = mix32((lo0 + static_cast<uint32_t>(i)) ^ hkey);
        const float u = static_cast<float>(static_cast<int32_t>(r >> 8)) * 5.9604644775390625e-08f;
        code = e4m3_encode_sr_v(s, r, u);
      } else {
        code = e4m3_encode_rn_v(s);
      }
      pay[i] = code;
      if constexpr (EF) res[i] = v[i] - e4m3_decode_v(code) * scale;
    }
  } else if constexpr (F == Format::Int8) {
    quantize_int_values<F, SR, EF, DIV>(v, len, scale, inv, lo0, hkey, reinterpret_cast<int8_t*>(pay), res);
  } else {
    // int4: stage the int8 values, then pack pairs with one 16-bit op per output byte.
    alignas(64) int8_t q[kMaxBlockSize + 2];
    quantize_int_values<F, SR, EF, DIV>(v, len, scale, inv, lo0, hkey, q, res);
    q[len] = 0;  // odd tail: the last high nibble is 0
    const int64_t nb = (len + 1) / 2;
    for (int64_t j = 0; j < nb; ++j) {
      uint16_t w;
      std::memcpy(&w, q + 2 * j, 2);  // little endian: low byte = even element
      pay[j] = static_cast<uint8_t>((w & 0x0Fu) | ((w >> 4) & 0xF0u));
    }
  }
}

template <Format F, bool SR, bool EF>
LSG_INLINE void quantize_block(const float* __restrict v, int64_t len, uint32_t maxbits, uint64_t gstart,
                           uint32_t key, uint8_t* __restrict pay, float* __restrict scale_out,
                           float* __restrict res) {
  const BlockQuant bq = block_params(bits_f32(maxbits), maxbits >= kInfBits, F);
  *scale_out = bq.scale;
  if (bq.zero) {  // all-zero block (scale 0) or non-finite block (scale NaN): q = 0
    std::memset(pay, 0, static_cast<size_t>(F == Format::Int4 ? (len + 1) / 2 : len));
    if constexpr (EF) {
      // residual = v - float(0) * scale, literally: v for a zero block, NaN for a non-finite
      // one (a NaN in params is a broken run; the NaN scale already reports it).
      const float z = 0.0f * bq.scale;
      for (int64_t i = 0; i < len; ++i) res[i] = v[i] - z;
    }
    return;
  }
  if (bq.divide)
    quantize_values<F, SR, EF, true>(v, len, bq.scale, bq.inv, gstart, key, pay, res);
  else
    quantize_values<F, SR, EF, false>(v, len, bq.scale, bq.inv, gstart, key, pay, res);
}

// Byte offset of element `start` (a multiple of the block, hence even) in a payload.
template <Format F> LSG_INLINE constexpr int64_t payload_offset(int64_t start) {
  return F == Format::Int4 ? start / 2 : start;
}

// out[i] = float(q_i) for the block [start, start+len) of a payload (before the scale).
// Written per format so each loop vectorizes.
template <Format F>
LSG_INLINE void decode_block(const uint8_t* __restrict pay, int64_t len, float* __restrict out) {
  if constexpr (F == Format::Int8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(pay);
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<float>(q[i]);
  } else if constexpr (F == Format::Int4) {
    const int64_t pairs = len / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      const uint8_t b = pay[j];
      out[2 * j] = static_cast<float>(int4_lo(b));
      out[2 * j + 1] = static_cast<float>(int4_hi(b));
    }
    if (len & 1) out[len - 1] = static_cast<float>(int4_lo(pay[pairs]));
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = e4m3_decode_v(pay[i]);
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace localsgd
