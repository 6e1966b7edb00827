// CPU kernels: quantize, dequantize and the fused pseudo-gradient compression (compress_delta).
// Layout and arithmetic: csrc/include/localsgd/format.h. API: csrc/include/localsgd/kernels.h.
//
// Every kernel works block by block: the block's fp32 values are staged in a stack buffer
// (<= kMaxBlockSize floats = 32 KiB, L1-resident), their abs-bit max is taken on the way in,
// and the quantizer then reads the staged copy. So each input byte is read from memory once
// and each output byte written once. Blocks are independent: OpenMP splits them statically.
#include <cstring>

#include "cpu_common.h"

namespace localsgd {
namespace cpu {
namespace {

using namespace detail;

// ---- quantize -------------------------------------------------------------------------------
template <Format F, DType D, bool SR>
void quantize_impl(const void* x_, int64_t n, int64_t block, RoundingMode rm, uint8_t* payload,
                   float* scales) {
  using T = typename Elem<D>::T;
  const T* __restrict x = static_cast<const T*>(x_);
  const int64_t nblocks = num_blocks(n, block);
  const uint32_t key = seed_key(rm.seed);
  const uint64_t off = static_cast<uint64_t>(rm.index_offset);
  const int nt = threads_for(n);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < nblocks; ++k) {
    const int64_t start = k * block;
    const int64_t len = (n - start) < block ? (n - start) : block;
    const T* __restrict xb = x + start;
    uint32_t mb = 0;
    if constexpr (D == DType::F32) {
      // fp32 needs no staging copy: the block is re-read from L1 by the quantizer.
      for (int64_t i = 0; i < len; ++i) {
        const uint32_t a = abs_bits(xb[i]);
        mb = a > mb ? a : mb;
      }
      quantize_block<F, SR, false>(xb, len, mb, off + start, key, payload + payload_offset<F>(start),
                                   scales + k, nullptr);
    } else {
      alignas(64) float buf[kMaxBlockSize];
      for (int64_t i = 0; i < len; ++i) {
        const float f = Elem<D>::load(xb[i]);
        buf[i] = f;
        const uint32_t a = abs_bits(f);
        mb = a > mb ? a : mb;
      }
      quantize_block<F, SR, false>(buf, len, mb, off + start, key, payload + payload_offset<F>(start),
                                   scales + k, nullptr);
    }
  }
}

// ---- dequantize -----------------------------------------------------------------------------
template <Format F, DType D>
void dequantize_impl(const uint8_t* payload, const float* scales, int64_t n, int64_t block, void* out_) {
  using T = typename Elem<D>::T;
  T* __restrict out = static_cast<T*>(out_);
  const int64_t nblocks = num_blocks(n, block);
  const int nt = threads_for(n);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < nblocks; ++k) {
    const int64_t start = k * block;
    const int64_t len = (n - start) < block ? (n - start) : block;
    const float s = scales[k];
    alignas(64) float q[kMaxBlockSize];
    decode_block<F>(payload + payload_offset<F>(start), len, q);
    T* __restrict ob = out + start;
    for (int64_t i = 0; i < len; ++i) ob[i] = Elem<D>::store(q[i] * s);
  }
}

// ---- compress_delta -------------------------------------------------------------------------
template <Format F, DType D, bool SR, bool EF>
void compress_delta_impl(const float* anchor, const void* params_, float* residual, int64_t n,
                         int64_t block, RoundingMode rm, uint8_t* payload, float* scales,
                         float* delta_out) {
  using T = typename Elem<D>::T;
  const T* __restrict params = static_cast<const T*>(params_);
  const int64_t nblocks = num_blocks(n, block);
  const uint32_t key = seed_key(rm.seed);
  const uint64_t off = static_cast<uint64_t>(rm.index_offset);
  const int nt = threads_for(n);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < nblocks; ++k) {
    const int64_t start = k * block;
    const int64_t len = (n - start) < block ? (n - start) : block;
    const float* __restrict ab = anchor + start;
    const T* __restrict pb = params + start;
    alignas(64) float v[kMaxBlockSize];
    uint32_t mb = 0;
    if constexpr (EF) {
      const float* __restrict rb = residual + start;
      for (int64_t i = 0; i < len; ++i) {
        const float d = ab[i] - Elem<D>::load(pb[i]);
        const float f = d + rb[i];  // two fp32 roundings, as kernels.h specifies
        v[i] = f;
        const uint32_t a = abs_bits(f);
        mb = a > mb ? a : mb;
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const float f = ab[i] - Elem<D>::load(pb[i]);
        v[i] = f;
        const uint32_t a = abs_bits(f);
        mb = a > mb ? a : mb;
      }
    }
    if (delta_out != nullptr) std::memcpy(delta_out + start, v, static_cast<size_t>(len) * sizeof(float));
    quantize_block<F, SR, EF>(v, len, mb, off + start, key, payload + payload_offset<F>(start), scales + k,
                              EF ? residual + start : nullptr);
  }
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
