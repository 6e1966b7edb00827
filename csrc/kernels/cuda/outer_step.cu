// CUDA fused outer Nesterov step (kernels.h outer_nesterov_step): one pass reading the
// gradient (fp32 or compressed), anchor and momentum, writing momentum, anchor and params.
#include "common.cuh"
#include "localsgd/kernels_cuda.h"

namespace localsgd {
namespace cuda {
using namespace detail;

namespace {

// GF: Format::None = fp32 gradient, else the compressed gradient's format.
// has_mom / nesterov / params != null are uniform runtime branches (no extra instantiations).
// Each thread: kUnroll chunks of 4 elements, kThreads chunks apart, every load issued first.
template <DType D, Format GF>
__global__ void __launch_bounds__(kThreads) kOuterNesterovStep(
    float* __restrict__ anchor, float* __restrict__ momentum, void* __restrict__ params,
    const float* __restrict__ grad, const uint8_t* __restrict__ grad_payload, const float* __restrict__ grad_scales,
    float grad_factor, int64_t n, int lb, float lr, float mu, bool has_mom, bool nesterov) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; c0 < chunks; c0 += step) {
    float g[kUnroll][4], a[kUnroll][4], b[kUnroll][4], s[kUnroll];
    int m[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = (c0 + u * kThreads) * kChunk;
      m[u] = chunk_len(n, i);
      if (m[u] == 0) continue;
      if constexpr (GF == Format::None) {
        load_f32(grad, i, m[u], g[u]);
      } else {
        decode4<GF>(grad_payload, i, m[u], g[u]);  // float(q), scaled below
        s[u] = grad_scales[i >> lb];
      }
      load_f32(anchor, i, m[u], a[u]);
      if (has_mom) load_f32(momentum, i, m[u], b[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (m[u] == 0) continue;
      const int64_t i = (c0 + u * kThreads) * kChunk;
      if constexpr (GF != Format::None) {
#pragma unroll
        for (int k = 0; k < 4; ++k) g[u][k] = (g[u][k] * s[u]) * grad_factor;  // two roundings, this order
      }
      float d[4];
      if (has_mom) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          b[u][k] = mu * b[u][k] + g[u][k];                   // buf = mu * buf + g   (no FMA)
          d[k] = nesterov ? g[u][k] + mu * b[u][k] : b[u][k];  // d = g + mu * buf     (no FMA)
        }
        store_f32(momentum, i, m[u], b[u]);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) d[k] = g[u][k];
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) a[u][k] = a[u][k] - lr * d[k];
      store_f32(anchor, i, m[u], a[u]);
      if (params != nullptr) store_n<D>(params, i, m[u], a[u]);
    }
  }
}

}  // namespace

void outer_nesterov_step(float* anchor, float* momentum, DType params_dtype, void* params, const float* grad,
                         Format grad_fmt, const uint8_t* grad_payload, const float* grad_scales, float grad_factor,
                         int64_t n, int64_t block, float lr, float mu, bool nesterov, cudaStream_t stream) {
  clear_error();
  if (n <= 0) return;
  const bool has_mom = mu != 0.0f;
  if (has_mom && momentum == nullptr) { set_error("localsgd cuda: momentum buffer is required when mu != 0"); return; }
  const int grid = grid_for((n + kChunk - 1) / kChunk, kThreads * kUnroll);
  // params == null: the dtype does not matter; use the fp32 instantiation.
  const DType d = params != nullptr ? params_dtype : DType::F32;
  dispatch_dtype(d, [&](auto D) {
    if (grad_payload == nullptr) {
      kOuterNesterovStep<D.value, Format::None><<<grid, kThreads, 0, stream>>>(
          anchor, momentum, params, grad, nullptr, nullptr, grad_factor, n, 0, lr, mu, has_mom, nesterov);
      check_launch("kOuterNesterovStep");
      return;
    }
    if (!valid_block_size(block)) { set_error("localsgd cuda: invalid block size"); return; }
    dispatch_format(grad_fmt, [&](auto F) {
      kOuterNesterovStep<D.value, F.value><<<grid, kThreads, 0, stream>>>(
          anchor, momentum, params, nullptr, grad_payload, grad_scales, grad_factor, n, log2_block(block), lr, mu,
          has_mom, nesterov);
      check_launch("kOuterNesterovStepCompressed");
    });
  });
}

}  // namespace cuda
}  // namespace localsgd
