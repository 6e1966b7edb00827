// CUDA quantize, dequantize and fused compress_delta (kernels.h / format.h).
#include "common.cuh"
#include "localsgd/kernels_cuda.h"

namespace localsgd {
namespace cuda {
using namespace detail;

namespace {

template <DType D>
struct InputSrc {
  const void* x;
  __device__ __forceinline__ void load(int64_t i, int m, float v[4]) const {
    if (m == 4) load4<D>(x, i, v); else load_tail<D>(x, i, m, v);
  }
};

// v = anchor - float(params) (+ residual): the error-feedback input of compress_delta.
template <DType D, bool RES>
struct DeltaSrc {
  const float* anchor;
  const void* params;
  const float* residual;
  __device__ __forceinline__ void load(int64_t i, int m, float v[4]) const {
    float a[4], p[4];
    load_f32(anchor, i, m, a);
    if (m == 4) load4<D>(params, i, p); else load_tail<D>(params, i, m, p);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = a[k] - p[k];
    if constexpr (RES) {
      float r[4];
      load_f32(residual, i, m, r);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = v[k] + r[k];
    }
  }
};

struct DeltaSink {
  float* residual;   // may be null
  float* delta_out;  // may be null
  __device__ __forceinline__ void put(int64_t i, int m, const float v[4], const float d[4]) const {
    if (residual) {
      float e[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) e[k] = v[k] - d[k];  // NaN blocks keep a NaN residual
      store_f32(residual, i, m, e);
    }
    if (delta_out) store_f32(delta_out, i, m, v);
  }
};

template <Format F, bool SR, class Src, class Sink>
__global__ void __launch_bounds__(kThreads) kQuantize(Src src, Sink sink, int64_t n, int64_t block,
                                                      int64_t nblocks, uint32_t key, uint64_t index_offset,
                                                      uint8_t* __restrict__ payload, float* __restrict__ scales) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / kWarp);
  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp; blk < nblocks;
       blk += warps) {
    quantize_block_warp<F, SR>(src, sink, blk, n, block, key, index_offset, payload, scales, lane);
  }
}

// One thread per 4 consecutive elements (grid-stride); the scale is a broadcast load per block.
template <Format F, DType D>
__global__ void __launch_bounds__(kThreads) kDequantize(const uint8_t* __restrict__ payload,
                                                        const float* __restrict__ scales, int64_t n,
                                                        int64_t block, void* __restrict__ out) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < chunks; c += stride) {
    const int64_t i = c * kChunk;
    const int m = (n - i) < kChunk ? static_cast<int>(n - i) : kChunk;
    const float s = scales[i / block];  // block >= 16: the 4 elements share one block
    float q[4], v[4];
    decode4<F>(payload, i, m, q);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = q[k] * s;
    store_n<D>(out, i, m, v);
  }
}

}  // namespace

void quantize(Format fmt, DType in_dtype, const void* x, int64_t n, int64_t block, RoundingMode rm,
              uint8_t* payload, float* scales, cudaStream_t stream) {
  clear_error();
  if (n <= 0) return;
  if (!valid_block_size(block)) { set_error("localsgd cuda: invalid block size"); return; }
  const int64_t nb = num_blocks(n, block);
  const int grid = grid_for(nb, kThreads / kWarp);
  const uint32_t key = seed_key(rm.seed);
  dispatch_format(fmt, [&](auto F) {
    dispatch_dtype(in_dtype, [&](auto D) {
      dispatch_bool(rm.stochastic, [&](auto SR) {
        kQuantize<F.value, SR.value><<<grid, kThreads, 0, stream>>>(
            InputSrc<D.value>{x}, NoSink{}, n, block, nb, key, static_cast<uint64_t>(rm.index_offset), payload,
            scales);
        check_launch("kQuantize");
      });
    });
  });
}

void dequantize(Format fmt, const uint8_t* payload, const float* scales, int64_t n, int64_t block,
                DType out_dtype, void* out, cudaStream_t stream) {
  clear_error();
  if (n <= 0) return;
  if (!valid_block_size(block)) { set_error("localsgd cuda: invalid block size"); return; }
  const int grid = grid_for((n + kChunk - 1) / kChunk, kThreads);
  dispatch_format(fmt, [&](auto F) {
    dispatch_dtype(out_dtype, [&](auto D) {
      kDequantize<F.value, D.value><<<grid, kThreads, 0, stream>>>(payload, scales, n, block, out);
      check_launch("kDequantize");
    });
  });
}

void compress_delta(Format fmt, const float* anchor, DType params_dtype, const void* params, float* residual,
                    int64_t n, int64_t block, RoundingMode rm, uint8_t* payload, float* scales, float* delta_out,
                    cudaStream_t stream) {
  clear_error();
  if (n <= 0) return;
  if (!valid_block_size(block)) { set_error("localsgd cuda: invalid block size"); return; }
  const int64_t nb = num_blocks(n, block);
  const int grid = grid_for(nb, kThreads / kWarp);
  const uint32_t key = seed_key(rm.seed);
  dispatch_format(fmt, [&](auto F) {
    dispatch_dtype(params_dtype, [&](auto D) {
      dispatch_bool(rm.stochastic, [&](auto SR) {
        dispatch_bool(residual != nullptr, [&](auto RES) {
          kQuantize<F.value, SR.value><<<grid, kThreads, 0, stream>>>(
              DeltaSrc<D.value, RES.value>{anchor, params, residual}, DeltaSink{residual, delta_out}, n, block, nb,
              key, static_cast<uint64_t>(rm.index_offset), payload, scales);
          check_launch("kCompressDelta");
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace localsgd
