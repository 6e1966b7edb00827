// Torch-free kernel entry points. Raw pointers and sizes only; no allocation, no torch.
// CPU versions live in csrc/kernels/cpu/, CUDA versions (same names, suffix _cuda, an
// explicit cudaStream_t) in csrc/kernels/cuda/ and are declared in kernels_cuda.h.
//
// Conventions:
//  - n: number of elements; block: block size (valid_block_size); fmt: Int8/Int4/Fp8 (None is
//    never passed to a kernel: the callers handle pass-through).
//  - payload / scales layouts are those of format.h. A kernel that quantizes a slice of a
//    larger buffer gets index_offset (the slice's first element index in that buffer) so that
//    stochastic rounding draws the same random numbers as a whole-buffer call. index_offset is
//    always a multiple of the block size.
//  - stochastic == false: round to nearest (seed ignored).
//  - Input/output element type: DType below. Accumulation is always fp32.
//  - All CPU kernels parallelize over blocks with OpenMP when it is available.
#pragma once

#include <cstdint>
#include "localsgd/format.h"

namespace localsgd {

enum class DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

struct RoundingMode {
  bool stochastic = false;
  uint64_t seed = 0;
  int64_t index_offset = 0;
};

namespace cpu {

// payload[payload_bytes(fmt, n)], scales[num_blocks(n, block)] <- Q(x[n])
void quantize(Format fmt, DType in_dtype, const void* x, int64_t n, int64_t block,
              RoundingMode rm, uint8_t* payload, float* scales);

// out[n] (out_dtype) <- deQ(payload, scales)
void dequantize(Format fmt, const uint8_t* payload, const float* scales, int64_t n,
                int64_t block, DType out_dtype, void* out);

// Fused pseudo-gradient compression, one pass:
//   delta = anchor (fp32) - float(params) ; if residual: v = delta + residual else v = delta
//   (payload, scales) <- Q(v);  if residual: residual <- v - deQ(payload, scales)
// residual may be null (no error feedback). delta_out, if non-null, receives v (fp32): used by
// tests and by callers that also want the uncompressed value; null in the hot path.
void compress_delta(Format fmt, const float* anchor, DType params_dtype, const void* params,
                    float* residual, int64_t n, int64_t block, RoundingMode rm,
                    uint8_t* payload, float* scales, float* delta_out);

// p compressed chunks of the same n elements -> fp32 sum (fixed order r = 0..p-1), times
// factor. Chunk r's payload starts at payload + r * payload_stride (bytes) and its scales at
// scales + r * scales_stride (floats): so both a [p, bytes] tensor pair and the backend's
// interleaved records (payload then scales in one buffer per rank) are served.
//   out_sum (fp32, may be null): receives the reduced values.
//   out_payload/out_scales (may be null): receive Q(reduced values) (requantize, fused).
void dequantize_reduce(Format fmt, int64_t p, const uint8_t* payload, int64_t payload_stride,
                       const float* scales, int64_t scales_stride, int64_t n, int64_t block,
                       float factor, RoundingMode rm, float* out_sum, uint8_t* out_payload,
                       float* out_scales);

// Fused outer Nesterov step (torch.optim.SGD(lr, momentum=mu, nesterov, dampening=0)
// applied to anchor with gradient g), one pass:
//   g = grad[i]                      (grad_payload == null: fp32 gradient)
//     or float(q_i) * scale_block * grad_factor   (compressed gradient)
//   if mu != 0: buf = mu * buf + g; d = nesterov ? g + mu * buf : buf   else d = g
//   anchor = anchor - lr * d ; params = cast(anchor)   (params may be null)
// momentum may be null when mu == 0.
void outer_nesterov_step(float* anchor, float* momentum, DType params_dtype, void* params,
                         const float* grad, Format grad_fmt, const uint8_t* grad_payload,
                         const float* grad_scales, float grad_factor, int64_t n, int64_t block,
                         float lr, float mu, bool nesterov);

}  // namespace cpu
}  // namespace localsgd
