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

template <Format F, bool SR>
void dequantize_reduce_impl(int64_t p, const uint8_t* payload, int64_t payload_stride, const float* scales,
                            int64_t scales_stride, int64_t n, int64_t block, float factor, RoundingMode rm,
                            float* out_sum, uint8_t* out_payload, float* out_scales) {
  const int64_t nblocks = num_blocks(n, block);
  const uint32_t key = seed_key(rm.seed);
  const uint64_t off = static_cast<uint64_t>(rm.index_offset);
  const bool requant = out_payload != nullptr && out_scales != nullptr;
  const int nt = threads_for(n * (p > 0 ? p : 1));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < nblocks; ++k) {
    const int64_t start = k * block;
    const int64_t len = (n - start) < block ? (n - start) : block;
    alignas(64) float acc[kMaxBlockSize];
    alignas(64) float q[kMaxBlockSize];
    // acc = 0 first (not the first chunk's values): 0 + (-0) = +0, as in format.h's order.
    for (int64_t i = 0; i < len; ++i) acc[i] = 0.0f;
    for (int64_t r = 0; r < p; ++r) {
      const float s = scales[r * scales_stride + k];
      decode_block<F>(payload + r * payload_stride + payload_offset<F>(start), len, q);
      for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + q[i] * s;
    }
    uint32_t mb = 0;
    for (int64_t i = 0; i < len; ++i) {
      const float f = acc[i] * factor;
      acc[i] = f;
      const uint32_t a = abs_bits(f);
      mb = a > mb ? a : mb;
    }
    if (out_sum != nullptr) std::memcpy(out_sum + start, acc, static_cast<size_t>(len) * sizeof(float));
    if (requant)
      quantize_block<F, SR, false>(acc, len, mb, off + start, key, out_payload + payload_offset<F>(start),
                                   out_scales + k, nullptr);
  }
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
