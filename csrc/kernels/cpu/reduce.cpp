// CPU kernel: dequantize p compressed chunks, sum them in fp32 in the fixed order r = 0..p-1,
// scale by `factor`, and optionally requantize the result (the middle step of the quantized
// all-reduce). Per block the running sum lives in an L1-resident stack buffer, so the p input
// chunks are each read once and the outputs written once.
#include <cstring>

#include "cpu_common.h"

namespace localsgd {
namespace cpu {
namespace {

using namespace detail;

struct ReduceArgs {
  int64_t p;
  const uint8_t* payload;
  int64_t payload_stride;
  const float* scales;
  int64_t scales_stride;
  int64_t n, block;
  float factor;
  uint32_t key;
  uint64_t off;
  float* out_sum;
  uint8_t* out_payload;
  float* out_scales;
};

template <Format F, bool SR>
LSG_INLINE void reduce_range(int64_t k0, int64_t k1, const ReduceArgs& a) {
  const bool requant = a.out_payload != nullptr && a.out_scales != nullptr;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t start = k * a.block;
    const int64_t len = (a.n - start) < a.block ? (a.n - start) : a.block;
    alignas(64) float acc[kMaxBlockSize];
    alignas(64) float q[kMaxBlockSize];
    // acc = 0 first (not the first chunk's values): 0 + (-0) = +0, as in format.h's order.
    for (int64_t i = 0; i < len; ++i) acc[i] = 0.0f;
    for (int64_t r = 0; r < a.p; ++r) {
      const float s = a.scales[r * a.scales_stride + k];
      decode_block<F>(a.payload + r * a.payload_stride + payload_offset<F>(start), len, q);
      for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + q[i] * s;
    }
    uint32_t mb = 0;
    for (int64_t i = 0; i < len; ++i) {
      const float f = acc[i] * a.factor;
      acc[i] = f;
      const uint32_t bits = abs_bits(f);
      mb = bits > mb ? bits : mb;
    }
    if (a.out_sum != nullptr) std::memcpy(a.out_sum + start, acc, static_cast<size_t>(len) * sizeof(float));
    if (requant)
      quantize_block<F, SR, false>(acc, len, mb, a.off + start, a.key, a.out_payload + payload_offset<F>(start),
                                   a.out_scales + k, nullptr);
  }
}
template <Format F, bool SR>
LSG_AVX2 void reduce_range_avx2(int64_t k0, int64_t k1, const ReduceArgs& a) { reduce_range<F, SR>(k0, k1, a); }
template <Format F, bool SR>
void reduce_range_base(int64_t k0, int64_t k1, const ReduceArgs& a) { reduce_range<F, SR>(k0, k1, a); }

template <Format F, bool SR>
void dequantize_reduce_impl(int64_t p, const uint8_t* payload, int64_t payload_stride, const float* scales,
                            int64_t scales_stride, int64_t n, int64_t block, float factor, RoundingMode rm,
                            float* out_sum, uint8_t* out_payload, float* out_scales) {
  const ReduceArgs a{p, payload, payload_stride, scales, scales_stride, n, block, factor, seed_key(rm.seed),
                     static_cast<uint64_t>(rm.index_offset), out_sum, out_payload, out_scales};
  auto* fn = use_avx2() ? &reduce_range_avx2<F, SR> : &reduce_range_base<F, SR>;
  parallel_ranges(num_blocks(n, block), threads_for(n * (p > 0 ? p : 1)),
                  [&](int64_t k0, int64_t k1) { fn(k0, k1, a); });
}

template <Format F>
void dispatch_sr(bool sr, int64_t p, const uint8_t* payload, int64_t payload_stride, const float* scales,
                 int64_t scales_stride, int64_t n, int64_t block, float factor, RoundingMode rm, float* out_sum,
                 uint8_t* out_payload, float* out_scales) {
  if (sr && out_payload != nullptr)
    dequantize_reduce_impl<F, true>(p, payload, payload_stride, scales, scales_stride, n, block, factor, rm,
                                    out_sum, out_payload, out_scales);
  else
    dequantize_reduce_impl<F, false>(p, payload, payload_stride, scales, scales_stride, n, block, factor, rm,
                                     out_sum, out_payload, out_scales);
}

}  // namespace

void dequantize_reduce(Format fmt, int64_t p, const uint8_t* payload, int64_t payload_stride,
                       const float* scales, int64_t scales_stride, int64_t n, int64_t block, float factor,
                       RoundingMode rm, float* out_sum, uint8_t* out_payload, float* out_scales) {
  if (n <= 0) return;
  const bool sr = rm.stochastic;
  switch (fmt) {
    case Format::Int8:
      dispatch_sr<Format::Int8>(sr, p, payload, payload_stride, scales, scales_stride, n, block, factor, rm,
                                out_sum, out_payload, out_scales);
      break;
    case Format::Int4:
      dispatch_sr<Format::Int4>(sr, p, payload, payload_stride, scales, scales_stride, n, block, factor, rm,
                                out_sum, out_payload, out_scales);
      break;
    case Format::Fp8:
      dispatch_sr<Format::Fp8>(sr, p, payload, payload_stride, scales, scales_stride, n, block, factor, rm,
                               out_sum, out_payload, out_scales);
      break;
    case Format::None:
      break;
  }
}

}  // namespace cpu
}  // namespace localsgd
