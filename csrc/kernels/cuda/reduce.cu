// CUDA dequantize-and-reduce of p compressed chunks, optionally fused with requantizing the
// result (kernels.h dequantize_reduce; format.h "Reductions").
#include "common.cuh"
#include "localsgd/kernels_cuda.h"

namespace localsgd {
namespace cuda {
using namespace detail;

namespace {

// acc = sum_{r=0..p-1} float(q_r) * s_r in this order, fp32 (no FMA: --fmad=false), then
// acc * factor.
template <Format F>
struct ReduceSrc {
  int64_t p;
  const uint8_t* payload;
  int64_t payload_stride;
  const float* scales;
  int64_t scales_stride;
  int lb;  // log2(block)
  float factor;
  __device__ __forceinline__ void load(int64_t i, int m, float v[4]) const {
    const int64_t blk = i >> lb;  // i is a multiple of 4 <= block: one block per chunk
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t r = 0; r < p; ++r) {
      float q[4];
      decode4<F>(payload + r * payload_stride, i, m, q);
      const float s = scales[r * scales_stride + blk];
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] = acc[k] + q[k] * s;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = k < m ? acc[k] * factor : 0.0f;
  }
};

struct SumSink {
  float* out;  // may be null
  __device__ __forceinline__ void put(int64_t i, int m, const float v[4], const float*) const {
    if (out) store_f32(out, i, m, v);
  }
};

// Each thread: kUnroll chunks of 4 elements, kThreads chunks apart, every row's loads of all
// chunks issued before the sums (rows in order: the sum's order is format.h's).
template <Format F>
__global__ void __launch_bounds__(kThreads) kDequantizeReduce(ReduceSrc<F> src, int64_t n, float* __restrict__ out) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; c0 < chunks; c0 += step) {
    float acc[kUnroll][4];
    int m[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      m[u] = chunk_len(n, (c0 + u * kThreads) * kChunk);
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[u][k] = 0.0f;
    }
#pragma unroll 2
    for (int64_t r = 0; r < src.p; ++r) {  // unrolled by 2: two rows' loads in flight at once
      float q[kUnroll][4], s[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = (c0 + u * kThreads) * kChunk;
        if (m[u] > 0) {
          decode4<F>(src.payload + r * src.payload_stride, i, m[u], q[u]);
          s[u] = src.scales[r * src.scales_stride + (i >> src.lb)];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (m[u] == 0) continue;
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[u][k] = acc[u][k] + q[u][k] * s[u];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (m[u] == 0) continue;
      float v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = acc[u][k] * src.factor;
      store_f32(out, (c0 + u * kThreads) * kChunk, m[u], v);
    }
  }
}

template <Format F, bool SR>
__global__ void __launch_bounds__(kThreads) kDequantizeReduceRequantize(ReduceSrc<F> src, SumSink sink, int64_t n,
                                                                        uint32_t key, uint64_t index_offset,
                                                                        uint8_t* __restrict__ payload,
                                                                        float* __restrict__ scales) {
  quantize_all<F, SR>(src, sink, n, src.lb, key, index_offset, payload, scales);
}

}  // namespace

void dequantize_reduce(Format fmt, int64_t p, const uint8_t* payload, int64_t payload_stride, const float* scales,
                       int64_t scales_stride, int64_t n, int64_t block, float factor, RoundingMode rm,
                       float* out_sum, uint8_t* out_payload, float* out_scales, cudaStream_t stream) {
  clear_error();
  if (n <= 0) return;
  if (!valid_block_size(block)) { set_error("localsgd cuda: invalid block size"); return; }
  if (p < 0) { set_error("localsgd cuda: p must be >= 0"); return; }
  if ((out_payload == nullptr) != (out_scales == nullptr)) {
    set_error("localsgd cuda: out_payload and out_scales must both be given or both be null");
    return;
  }
  dispatch_format(fmt, [&](auto F) {
    const ReduceSrc<F.value> src{p, payload, payload_stride, scales, scales_stride, log2_block(block), factor};
    if (out_payload == nullptr) {
      if (out_sum == nullptr) return;
      const int grid = grid_for((n + kChunk - 1) / kChunk, kThreads * kUnroll);
      kDequantizeReduce<F.value><<<grid, kThreads, 0, stream>>>(src, n, out_sum);
      check_launch("kDequantizeReduce");
      return;
    }
    const int grid = grid_for(quant_work_items(n, block), kThreads / kWarp);
    dispatch_bool(rm.stochastic, [&](auto SR) {
      kDequantizeReduceRequantize<F.value, SR.value><<<grid, kThreads, 0, stream>>>(
          src, SumSink{out_sum}, n, seed_key(rm.seed), static_cast<uint64_t>(rm.index_offset), out_payload,
          out_scales);
      check_launch("kDequantizeReduceRequantize");
    });
  });
}

}  // namespace cuda
}  // namespace localsgd
