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
  int64_t block;
  float factor;
  __device__ __forceinline__ void load(int64_t i, int m, float v[4]) const {
    const int64_t blk = i / block;  // i is a multiple of 4 <= block: one block per chunk
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

template <Format F>
__global__ void __launch_bounds__(kThreads) kDequantizeReduce(ReduceSrc<F> src, int64_t n, float* __restrict__ out) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < chunks; c += stride) {
    const int64_t i = c * kChunk;
    const int m = (n - i) < kChunk ? static_cast<int>(n - i) : kChunk;
    float v[4];
    src.load(i, m, v);
    store_f32(out, i, m, v);
  }
}

template <Format F, bool SR>
__global__ void __launch_bounds__(kThreads) kDequantizeReduceRequantize(ReduceSrc<F> src, SumSink sink, int64_t n,
                                                                        int64_t block, int64_t nblocks, uint32_t key,
                                                                        uint64_t index_offset,
                                                                        uint8_t* __restrict__ payload,
                                                                        float* __restrict__ scales) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / kWarp);
  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp; blk < nblocks;
       blk += warps) {
    quantize_block_warp<F, SR>(src, sink, blk, n, block, key, index_offset, payload, scales, lane);
  }
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
    const ReduceSrc<F.value> src{p, payload, payload_stride, scales, scales_stride, block, factor};
    if (out_payload == nullptr) {
      if (out_sum == nullptr) return;
      const int grid = grid_for((n + kChunk - 1) / kChunk, kThreads);
      kDequantizeReduce<F.value><<<grid, kThreads, 0, stream>>>(src, n, out_sum);
      check_launch("kDequantizeReduce");
      return;
    }
    const int64_t nb = num_blocks(n, block);
    const int grid = grid_for(nb, kThreads / kWarp);
    dispatch_bool(rm.stochastic, [&](auto SR) {
      kDequantizeReduceRequantize<F.value, SR.value><<<grid, kThreads, 0, stream>>>(
          src, SumSink{out_sum}, n, block, nb, seed_key(rm.seed), static_cast<uint64_t>(rm.index_offset),
          out_payload, out_scales);
      check_launch("kDequantizeReduceRequantize");
    });
  });
}

}  // namespace cuda
}  // namespace localsgd
