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
template <DType D, Format GF>
__global__ void __launch_bounds__(kThreads) kOuterNesterovStep(
    float* __restrict__ anchor, float* __restrict__ momentum, void* __restrict__ params,
    const float* __restrict__ grad, const uint8_t* __restrict__ grad_payload, const float* __restrict__ grad_scales,
    float grad_factor, int64_t n, int64_t block, float lr, float mu, bool has_mom, bool nesterov) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < chunks; c += stride) {
    const int64_t i = c * kChunk;
    const int m = (n - i) < kChunk ? static_cast<int>(n - i) : kChunk;
    float g[4], a[4], d[4];
    if constexpr (GF == Format::None) {
      load_f32(grad, i, m, g);
    } else {
      float q[4];
      decode4<GF>(grad_payload, i, m, q);
      const float s = grad_scales[i / block];
#pragma unroll
      for (int k = 0; k < 4; ++k) g[k] = (q[k] * s) * grad_factor;  // two roundings, this order
    }
    if (has_mom) {
      float b[4];
      load_f32(momentum, i, m, b);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        b[k] = mu * b[k] + g[k];                   // buf = mu * buf + g   (no FMA)
        d[k] = nesterov ? g[k] + mu * b[k] : b[k];  // d = g + mu * buf     (no FMA)
      }
      store_f32(momentum, i, m, b);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] = g[k];
    }
    load_f32(anchor, i, m, a);
#pragma unroll
    for (int k = 0; k < 4; ++k) a[k] = a[k] - lr * d[k];
    store_f32(anchor, i, m, a);
    if (params != nullptr) store_n<D>(params, i, m, a);
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
  const int grid = grid_for((n + kChunk - 1) / kChunk, kThreads);
  // params == null: the dtype does not matter; use the fp32 instantiation.
  const DType d = params != nullptr ? params_dtype : DType::F32;
  dispatch_dtype(d, [&](auto D) {
    if (grad_payload == nullptr) {
      kOuterNesterovStep<D.value, Format::None><<<grid, kThreads, 0, stream>>>(
          anchor, momentum, params, grad, nullptr, nullptr, grad_factor, n, block, lr, mu, has_mom, nesterov);
      check_launch("kOuterNesterovStep");
      return;
    }
    if (!valid_block_size(block)) { set_error("localsgd cuda: invalid block size"); return; }
    dispatch_format(grad_fmt, [&](auto F) {
      kOuterNesterovStep<D.value, F.value><<<grid, kThreads, 0, stream>>>(
          anchor, momentum, params, nullptr, grad_payload, grad_scales, grad_factor, n, block, lr, mu, has_mom,
          nesterov);
      check_launch("kOuterNesterovStepCompressed");
    });
  });
}

}  // namespace cuda
}  // namespace localsgd
