// CUDA launchers: the same operations and arguments as kernels.h (namespace localsgd::cuda),
// plus the stream to launch on as the last argument. Every launch goes on that stream; nothing
// uses stream 0 implicitly, nothing synchronizes. Pointers are device pointers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>
#include "localsgd/kernels.h"

namespace localsgd {
namespace cuda {

void quantize(Format fmt, DType in_dtype, const void* x, int64_t n, int64_t block,
              RoundingMode rm, uint8_t* payload, float* scales, cudaStream_t stream);

void dequantize(Format fmt, const uint8_t* payload, const float* scales, int64_t n,
                int64_t block, DType out_dtype, void* out, cudaStream_t stream);

void compress_delta(Format fmt, const float* anchor, DType params_dtype, const void* params,
                    float* residual, int64_t n, int64_t block, RoundingMode rm,
                    uint8_t* payload, float* scales, float* delta_out, cudaStream_t stream);

void dequantize_reduce(Format fmt, int64_t p, const uint8_t* payload, int64_t payload_stride,
                       const float* scales, int64_t scales_stride, int64_t n, int64_t block,
                       float factor, RoundingMode rm, float* out_sum, uint8_t* out_payload,
                       float* out_scales, cudaStream_t stream);

void outer_nesterov_step(float* anchor, float* momentum, DType params_dtype, void* params,
                         const float* grad, Format grad_fmt, const uint8_t* grad_payload,
                         const float* grad_scales, float grad_factor, int64_t n, int64_t block,
                         float lr, float mu, bool nesterov, cudaStream_t stream);

// Returns the last launch error as text ("" when none): bindings turn it into an exception.
const char* last_error();

// Launch geometry for benchmarks: cap grids at ctas_per_sm CTAs per SM (0, the default: one
// CTA per work unit, no cap). Process-wide.
void set_grid_cap(int ctas_per_sm);
int grid_cap();

}  // namespace cuda
}  // namespace localsgd
