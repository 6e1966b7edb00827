// CPU kernels: quantize, dequantize and the fused pseudo-gradient compression (compress_delta).
// Layout and arithmetic: csrc/include/localsgd/format.h. API: csrc/include/localsgd/kernels.h.
//
// Every kernel works block by block: the block's fp32 values are staged in a stack buffer
// (<= kMaxBlockSize floats = 32 KiB, L1-resident), their abs-bit max is taken on the way in,
// and the quantizer then reads the staged copy. So each input byte is read from memory once
// and each output byte written once. Blocks are independent: one contiguous range per thread.
#include <cstring>

#include "cpu_common.h"

namespace localsgd {
namespace cpu {
namespace {

using namespace detail;

// Each kernel: an always-inline range body over blocks [k0, k1), two thin per-ISA wrappers
// (AVX2 / baseline) that instantiate it, and a driver that picks the wrapper once per call and
// runs it on one contiguous block range per thread.

// ---- quantize -------------------------------------------------------------------------------
struct QuantArgs {
  const void* x;
  int64_t n, block;
  uint32_t key;
  uint64_t off;
  uint8_t* payload;
  float* scales;
};

template <Format F, DType D, bool SR>
LSG_INLINE void quantize_range(int64_t k0, int64_t k1, const QuantArgs& a) {
  using T = typename Elem<D>::T;
  const T* __restrict x = static_cast<const T*>(a.x);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t start = k * a.block;
    const int64_t len = (a.n - start) < a.block ? (a.n - start) : a.block;
    const T* __restrict xb = x + start;
    uint32_t mb = 0;
    if constexpr (D == DType::F32) {
      // fp32 needs no staging copy: the block is re-read from L1 by the quantizer.
      for (int64_t i = 0; i < len; ++i) {
        const uint32_t ab = abs_bits(xb[i]);
        mb = ab > mb ? ab : mb;
      }
      quantize_block<F, SR, false>(xb, len, mb, a.off + start, a.key, a.payload + payload_offset<F>(start),
                                   a.scales + k, nullptr);
    } else {
      alignas(64) float buf[kMaxBlockSize];
      for (int64_t i = 0; i < len; ++i) {
        const float f = Elem<D>::load(xb[i]);
        buf[i] = f;
        const uint32_t ab = abs_bits(f);
        mb = ab > mb ? ab : mb;
      }
      quantize_block<F, SR, false>(buf, len, mb, a.off + start, a.key, a.payload + payload_offset<F>(start),
                                   a.scales + k, nullptr);
    }
  }
}
template <Format F, DType D, bool SR>
LSG_AVX2 void quantize_range_avx2(int64_t k0, int64_t k1, const QuantArgs& a) { quantize_range<F, D, SR>(k0, k1, a); }
template <Format F, DType D, bool SR>
void quantize_range_base(int64_t k0, int64_t k1, const QuantArgs& a) { quantize_range<F, D, SR>(k0, k1, a); }

template <Format F, DType D, bool SR>
void quantize_impl(const void* x, int64_t n, int64_t block, RoundingMode rm, uint8_t* payload, float* scales) {
  const QuantArgs a{x, n, block, seed_key(rm.seed), static_cast<uint64_t>(rm.index_offset), payload, scales};
  auto* fn = use_avx2() ? &quantize_range_avx2<F, D, SR> : &quantize_range_base<F, D, SR>;
  parallel_ranges(num_blocks(n, block), threads_for(n), [&](int64_t k0, int64_t k1) { fn(k0, k1, a); });
}

// ---- dequantize -----------------------------------------------------------------------------
struct DequantArgs {
  const uint8_t* payload;
  const float* scales;
  int64_t n, block;
  void* out;
};

template <Format F, DType D>
LSG_INLINE void dequantize_range(int64_t k0, int64_t k1, const DequantArgs& a) {
  using T = typename Elem<D>::T;
  T* __restrict out = static_cast<T*>(a.out);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t start = k * a.block;
    const int64_t len = (a.n - start) < a.block ? (a.n - start) : a.block;
    const float s = a.scales[k];
    alignas(64) float q[kMaxBlockSize];
    decode_block<F>(a.payload + payload_offset<F>(start), len, q);
    T* __restrict ob = out + start;
    for (int64_t i = 0; i < len; ++i) ob[i] = Elem<D>::store(q[i] * s);
  }
}
template <Format F, DType D>
LSG_AVX2 void dequantize_range_avx2(int64_t k0, int64_t k1, const DequantArgs& a) { dequantize_range<F, D>(k0, k1, a); }
template <Format F, DType D>
void dequantize_range_base(int64_t k0, int64_t k1, const DequantArgs& a) { dequantize_range<F, D>(k0, k1, a); }

template <Format F, DType D>
void dequantize_impl(const uint8_t* payload, const float* scales, int64_t n, int64_t block, void* out) {
  const DequantArgs a{payload, scales, n, block, out};
  auto* fn = use_avx2() ? &dequantize_range_avx2<F, D> : &dequantize_range_base<F, D>;
  parallel_ranges(num_blocks(n, block), threads_for(n), [&](int64_t k0, int64_t k1) { fn(k0, k1, a); });
}

// ---- compress_delta -------------------------------------------------------------------------
struct CompressArgs {
  const float* anchor;
  const void* params;
  float* residual;
  int64_t n, block;
  uint32_t key;
  uint64_t off;
  uint8_t* payload;
  float* scales;
  float* delta_out;
};

template <Format F, DType D, bool SR, bool EF>
LSG_INLINE void compress_range(int64_t k0, int64_t k1, const CompressArgs& a) {
  using T = typename Elem<D>::T;
  const T* __restrict params = static_cast<const T*>(a.params);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t start = k * a.block;
    const int64_t len = (a.n - start) < a.block ? (a.n - start) : a.block;
    const float* __restrict ab = a.anchor + start;
    const T* __restrict pb = params + start;
    alignas(64) float v[kMaxBlockSize];
    uint32_t mb = 0;
    if constexpr (EF) {
      const float* __restrict rb = a.residual + start;
      for (int64_t i = 0; i < len; ++i) {
        const float d = ab[i] - Elem<D>::load(pb[i]);
        const float f = d + rb[i];  // two fp32 roundings, as kernels.h specifies
        v[i] = f;
        const uint32_t bits = abs_bits(f);
        mb = bits > mb ? bits : mb;
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const float f = ab[i] - Elem<D>::load(pb[i]);
        v[i] = f;
        const uint32_t bits = abs_bits(f);
        mb = bits > mb ? bits : mb;
      }
    }
    if (a.delta_out != nullptr) std::memcpy(a.delta_out + start, v, static_cast<size_t>(len) * sizeof(float));
    quantize_block<F, SR, EF>(v, len, mb, a.off + start, a.key, a.payload + payload_offset<F>(start), a.scales + k,
                              EF ? a.residual + start : nullptr);
  }
}
template <Format F, DType D, bool SR, bool EF>
LSG_AVX2 void compress_range_avx2(int64_t k0, int64_t k1, const CompressArgs& a) { compress_range<F, D, SR, EF>(k0, k1, a); }
template <Format F, DType D, bool SR, bool EF>
void compress_range_base(int64_t k0, int64_t k1, const CompressArgs& a) { compress_range<F, D, SR, EF>(k0, k1, a); }

template <Format F, DType D, bool SR, bool EF>
void compress_delta_impl(const float* anchor, const void* params, float* residual, int64_t n, int64_t block,
                         RoundingMode rm, uint8_t* payload, float* scales, float* delta_out) {
  const CompressArgs a{anchor, params, residual, n, block, seed_key(rm.seed), static_cast<uint64_t>(rm.index_offset),
                       payload, scales, delta_out};
  auto* fn = use_avx2() ? &compress_range_avx2<F, D, SR, EF> : &compress_range_base<F, D, SR, EF>;
  parallel_ranges(num_blocks(n, block), threads_for(n), [&](int64_t k0, int64_t k1) { fn(k0, k1, a); });
}

// ---- dispatch: one switch per call, never inside a loop ----------------------------------
#define LSG_DTYPE_CASES(FMT, SRV, CALL)                         \
  switch (d) {                                                  \
    case DType::F32: CALL(FMT, DType::F32, SRV); break;         \
    case DType::BF16: CALL(FMT, DType::BF16, SRV); break;       \
    case DType::F16: CALL(FMT, DType::F16, SRV); break;         \
  }
#define LSG_FMT_SR_CASES(CALL)                                                  \
  switch (f) {                                                                  \
    case Format::Int8:                                                          \
      if (sr) { LSG_DTYPE_CASES(Format::Int8, true, CALL) } else { LSG_DTYPE_CASES(Format::Int8, false, CALL) } \
      break;                                                                    \
    case Format::Int4:                                                          \
      if (sr) { LSG_DTYPE_CASES(Format::Int4, true, CALL) } else { LSG_DTYPE_CASES(Format::Int4, false, CALL) } \
      break;                                                                    \
    case Format::Fp8:                                                           \
      if (sr) { LSG_DTYPE_CASES(Format::Fp8, true, CALL) } else { LSG_DTYPE_CASES(Format::Fp8, false, CALL) } \
      break;                                                                    \
    case Format::None:                                                          \
      break;                                                                    \
  }

}  // namespace

void quantize(Format fmt, DType in_dtype, const void* x, int64_t n, int64_t block, RoundingMode rm,
              uint8_t* payload, float* scales) {
  if (n <= 0) return;
  const Format f = fmt;
  const DType d = in_dtype;
  const bool sr = rm.stochastic;
#define LSG_CALL(FMT, DT, SRV) quantize_impl<FMT, DT, SRV>(x, n, block, rm, payload, scales)
  LSG_FMT_SR_CASES(LSG_CALL)
#undef LSG_CALL
}

void dequantize(Format fmt, const uint8_t* payload, const float* scales, int64_t n, int64_t block,
                DType out_dtype, void* out) {
  if (n <= 0) return;
  const Format f = fmt;
  const DType d = out_dtype;
  const bool sr = false;
#define LSG_CALL(FMT, DT, SRV) dequantize_impl<FMT, DT>(payload, scales, n, block, out)
  LSG_FMT_SR_CASES(LSG_CALL)
#undef LSG_CALL
}

void compress_delta(Format fmt, const float* anchor, DType params_dtype, const void* params, float* residual,
                    int64_t n, int64_t block, RoundingMode rm, uint8_t* payload, float* scales,
                    float* delta_out) {
  if (n <= 0) return;
  const Format f = fmt;
  const DType d = params_dtype;
  const bool sr = rm.stochastic;
#define LSG_CALL(FMT, DT, SRV)                                                                   \
  do {                                                                                           \
    if (residual != nullptr)                                                                     \
      compress_delta_impl<FMT, DT, SRV, true>(anchor, params, residual, n, block, rm, payload,    \
                                              scales, delta_out);                                \
    else                                                                                         \
      compress_delta_impl<FMT, DT, SRV, false>(anchor, params, residual, n, block, rm, payload,  \
                                               scales, delta_out);                               \
  } while (0)
  LSG_FMT_SR_CASES(LSG_CALL)
#undef LSG_CALL
}

}  // namespace cpu
}  // namespace localsgd
