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
__global__ void __launch_bounds__(kThreads) kQuantize(Src src, Sink sink, int64_t n, int lb, uint32_t key,
                                                      uint64_t index_offset, uint8_t* __restrict__ payload,
                                                      float* __restrict__ scales) {
  quantize_all<F, SR>(src, sink, n, lb, key, index_offset, payload, scales);
}

// Each thread: kUnroll chunks of 4 elements, kThreads chunks apart; the scale is a broadcast
// load per chunk (block >= 16: the 4 elements of a chunk share one block).
template <Format F, DType D>
__global__ void __launch_bounds__(kThreads) kDequantize(const uint8_t* __restrict__ payload,
                                                        const float* __restrict__ scales, int64_t n, int lb,
                                                        void* __restrict__ out) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; c0 < chunks; c0 += step) {
    float q[kUnroll][4], s[kUnroll];
    int m[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = (c0 + u * kThreads) * kChunk;
      m[u] = chunk_len(n, i);
      if (m[u] > 0) {
        decode4<F>(payload, i, m[u], q[u]);
        s[u] = scales[i >> lb];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (m[u] == 0) continue;
      float v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = q[u][k] * s[u];
      store_n<D>(out, (c0 + u * kThreads) * kChunk, m[u], v);
    }
  }
}

}  // namespace

void quantize(Format fmt, DType in_dtype, const void* x, int64_t n, int64_t block, RoundingMode rm,
              uint8_t* payload, float* scales, cudaStream_t stream) {
  clear_error();
  if (n <= 0) return;
  if (!valid_block_size(block)) { set_error("localsgd cuda: invalid block size"); return; }
  const int grid = grid_for(quant_work_items(n, block), kThreads / kWarp);
  const uint32_t key = seed_key(rm.seed);
  dispatch_format(fmt, [&](auto F) {
    dispatch_dtype(in_dtype, [&](auto D) {
      dispatch_bool(rm.stochastic, [&](auto SR) {
        kQuantize<F.value, SR.value><<<grid, kThreads, 0, stream>>>(
            InputSrc<D.value>{x}, NoSink{}, n, log2_block(block), key, static_cast<uint64_t>(rm.index_offset),
            payload, scales);
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
  const int grid = grid_for((n + kChunk - 1) / kChunk, kThreads * kUnroll);
  dispatch_format(fmt, [&](auto F) {
    dispatch_dtype(out_dtype, [&](auto D) {
      kDequantize<F.value, D.value><<<grid, kThreads, 0, stream>>>(payload, scales, n, log2_block(block), out);
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
  const int grid = grid_for(quant_work_items(n, block), kThreads / kWarp);
  const uint32_t key = seed_key(rm.seed);
  dispatch_format(fmt, [&](auto F) {
    dispatch_dtype(params_dtype, [&](auto D) {
      dispatch_bool(rm.stochastic, [&](auto SR) {
        dispatch_bool(residual != nullptr, [&](auto RES) {
          kQuantize<F.value, SR.value><<<grid, kThreads, 0, stream>>>(
              DeltaSrc<D.value, RES.value>{anchor, params, residual}, DeltaSink{residual, delta_out}, n,
              log2_block(block), key, static_cast<uint64_t>(rm.index_offset), payload, scales);
          check_launch("kCompressDelta");
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace localsgd
