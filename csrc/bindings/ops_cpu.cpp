// CPU implementations of the localsgd_comm ops (schemas: localsgd_comm/_ops.py).
// Thin layer: validate tensors (one TORCH_CHECK per precondition), allocate outputs, call the
// torch-free kernels of csrc/kernels/cpu/ (kernels.h).
//
// Tensor conventions:
//  - read-only inputs are made contiguous (.contiguous() is free when they already are);
//  - tensors the op mutates in place (residual, anchor, momentum, params) must already be
//    contiguous: a copy would silently drop the update, so a non-contiguous one is an error;
//  - payloads/scales of dequantize_reduce* are [p, bytes] / [p, blocks] and may be strided in
//    dim 0 (e.g. rows of a larger receive buffer): only the rows must be dense.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "localsgd/format.h"
#include "localsgd/kernels.h"

namespace localsgd {
namespace {

Format parse_format(c10::string_view op, c10::string_view fmt) {
  if (fmt == "int8") return Format::Int8;
  if (fmt == "int4") return Format::Int4;
  if (fmt == "fp8") return Format::Fp8;
  TORCH_CHECK(false, op, ": unknown compression format '", std::string(fmt),
              "': expected one of 'int8', 'int4', 'fp8' ('none' is handled before the op)");
  return Format::None;  // unreachable
}

void check_block(c10::string_view op, int64_t block_size) {
  TORCH_CHECK(valid_block_size(block_size), op, ": block_size must be a power of two in [", kMinBlockSize, ", ",
              kMaxBlockSize, "], got ", block_size);
}

DType float_dtype(c10::string_view op, const char* what, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DType::F32;  // unreachable
}

void check_cpu(c10::string_view op, const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got device ", t.device());
}

void check_f32(c10::string_view op, const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ", t.scalar_type());
}

void check_inplace(c10::string_view op, const char* what, const at::Tensor& t, int64_t n) {
  check_cpu(op, what, t);
  TORCH_CHECK(t.numel() == n, op, ": ", what, " must have ", n, " elements, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what,
              " must be contiguous (it is updated in place; a copy would lose the update)");
}

RoundingMode rounding(c10::string_view op, std::optional<int64_t> seed, int64_t index_offset, int64_t block) {
  TORCH_CHECK(index_offset >= 0 && index_offset % block == 0, op,
              ": index_offset must be a non-negative multiple of block_size (", block, "), got ", index_offset);
  RoundingMode rm;
  rm.stochastic = seed.has_value();
  rm.seed = seed.has_value() ? static_cast<uint64_t>(*seed) : 0;  // int64 bits reinterpreted as uint64
  rm.index_offset = index_offset;
  return rm;
}

std::tuple<at::Tensor, at::Tensor> alloc_encoded(Format f, int64_t n, int64_t block, const at::Tensor& like) {
  return {at::empty({payload_bytes(f, n)}, like.options().dtype(at::kByte)),
          at::empty({num_blocks(n, block)}, like.options().dtype(at::kFloat))};
}

// payload [bytes] + scales [blocks] of one encoded tensor with numel elements.
void check_encoded(c10::string_view op, const at::Tensor& payload, const at::Tensor& scales, Format f,
                   int64_t numel, int64_t block) {
  check_cpu(op, "payload", payload);
  check_cpu(op, "scales", scales);
  TORCH_CHECK(payload.scalar_type() == at::kByte, op, ": payload must be uint8, got ", payload.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK(payload.dim() == 1 && payload.size(0) == payload_bytes(f, numel), op, ": payload must have shape [",
              payload_bytes(f, numel), "] for numel=", numel, ", got ", payload.sizes());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == num_blocks(numel, block), op, ": scales must have shape [",
              num_blocks(numel, block), "] for numel=", numel, " and block_size=", block, ", got ", scales.sizes());
}

// Rows of a [p, cols] tensor must be dense; dim 0 may be strided. Returns a tensor that satisfies it.
at::Tensor dense_rows(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= 0 ? t : t.contiguous();
}

// ---- ops ------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x_, c10::string_view fmt, int64_t block_size,
                                                std::optional<int64_t> seed, int64_t index_offset) {
  constexpr const char* op = "quantize";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  check_cpu(op, "x", x_);
  const DType d = float_dtype(op, "x", x_);
  const RoundingMode rm = rounding(op, seed, index_offset, block_size);
  const at::Tensor x = x_.contiguous();
  const int64_t n = x.numel();
  auto [payload, scales] = alloc_encoded(f, n, block_size, x);
  cpu::quantize(f, d, x.data_ptr(), n, block_size, rm, payload.data_ptr<uint8_t>(), scales.data_ptr<float>());
  return {payload, scales};
}

at::Tensor dequantize_cpu(const at::Tensor& payload_, const at::Tensor& scales_, c10::string_view fmt,
                          int64_t numel, int64_t block_size, at::ScalarType dtype) {
  constexpr const char* op = "dequantize";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  check_encoded(op, payload_, scales_, f, numel, block_size);
  DType d;
  switch (dtype) {
    case at::kFloat: d = DType::F32; break;
    case at::kBFloat16: d = DType::BF16; break;
    case at::kHalf: d = DType::F16; break;
    default: TORCH_CHECK(false, op, ": dtype must be float32, bfloat16 or float16, got ", dtype);
  }
  const at::Tensor payload = payload_.contiguous(), scales = scales_.contiguous();
  at::Tensor out = at::empty({numel}, payload.options().dtype(dtype));
  cpu::dequantize(f, payload.data_ptr<uint8_t>(), scales.data_ptr<float>(), numel, block_size, d, out.data_ptr());
  return out;
}

std::tuple<at::Tensor, at::Tensor> compress_delta_cpu(const at::Tensor& anchor_, const at::Tensor& params_,
                                                      const std::optional<at::Tensor>& residual,
                                                      c10::string_view fmt, int64_t block_size,
                                                      std::optional<int64_t> seed) {
  constexpr const char* op = "compress_delta";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  check_cpu(op, "anchor", anchor_);
  check_cpu(op, "params", params_);
  check_f32(op, "anchor", anchor_);
  const DType d = float_dtype(op, "params", params_);
  const int64_t n = anchor_.numel();
  TORCH_CHECK(params_.numel() == n, op, ": params has ", params_.numel(), " elements but anchor has ", n);
  float* res = nullptr;
  if (residual.has_value()) {
    check_f32(op, "residual", *residual);
    check_inplace(op, "residual", *residual, n);
    res = residual->data_ptr<float>();
  }
  const RoundingMode rm = rounding(op, seed, 0, block_size);
  const at::Tensor anchor = anchor_.contiguous(), params = params_.contiguous();
  auto [payload, scales] = alloc_encoded(f, n, block_size, anchor);
  cpu::compress_delta(f, anchor.data_ptr<float>(), d, params.data_ptr(), res, n, block_size, rm,
                      payload.data_ptr<uint8_t>(), scales.data_ptr<float>(), nullptr);
  return {payload, scales};
}

// Shared checks of dequantize_reduce / _requantize; returns the dense-row views.
std::pair<at::Tensor, at::Tensor> reduce_inputs(c10::string_view op, const at::Tensor& payloads,
                                                const at::Tensor& scales, Format f, int64_t numel, int64_t block) {
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  check_cpu(op, "payloads", payloads);
  check_cpu(op, "scales", scales);
  TORCH_CHECK(payloads.scalar_type() == at::kByte, op, ": payloads must be uint8, got ", payloads.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK(payloads.dim() == 2, op, ": payloads must be 2-D [p, bytes], got shape ", payloads.sizes());
  TORCH_CHECK(scales.dim() == 2, op, ": scales must be 2-D [p, blocks], got shape ", scales.sizes());
  const int64_t p = payloads.size(0);
  TORCH_CHECK(payloads.size(1) == payload_bytes(f, numel), op, ": payloads must have shape [", p, ", ",
              payload_bytes(f, numel), "] for numel=", numel, ", got ", payloads.sizes());
  TORCH_CHECK(scales.size(0) == p && scales.size(1) == num_blocks(numel, block), op, ": scales must have shape [",
              p, ", ", num_blocks(numel, block), "] for block_size=", block, " and numel=", numel, ", got ",
              scales.sizes());
  return {dense_rows(payloads), dense_rows(scales)};
}

at::Tensor dequantize_reduce_cpu(const at::Tensor& payloads_, const at::Tensor& scales_, c10::string_view fmt,
                                 int64_t numel, int64_t block_size, double factor) {
  constexpr const char* op = "dequantize_reduce";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  auto [payloads, scales] = reduce_inputs(op, payloads_, scales_, f, numel, block_size);
  at::Tensor out = at::empty({numel}, scales.options());
  cpu::dequantize_reduce(f, payloads.size(0), payloads.data_ptr<uint8_t>(), payloads.stride(0),
                         scales.data_ptr<float>(), scales.stride(0), numel, block_size, static_cast<float>(factor),
                         RoundingMode{}, out.data_ptr<float>(), nullptr, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> dequantize_reduce_requantize_cpu(const at::Tensor& payloads_,
                                                                    const at::Tensor& scales_, c10::string_view fmt,
                                                                    int64_t numel, int64_t block_size, double factor,
                                                                    std::optional<int64_t> seed,
                                                                    int64_t index_offset) {
  constexpr const char* op = "dequantize_reduce_requantize";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  auto [payloads, scales] = reduce_inputs(op, payloads_, scales_, f, numel, block_size);
  const RoundingMode rm = rounding(op, seed, index_offset, block_size);
  auto [out_payload, out_scales] = alloc_encoded(f, numel, block_size, scales);
  cpu::dequantize_reduce(f, payloads.size(0), payloads.data_ptr<uint8_t>(), payloads.stride(0),
                         scales.data_ptr<float>(), scales.stride(0), numel, block_size, static_cast<float>(factor),
                         rm, nullptr, out_payload.data_ptr<uint8_t>(), out_scales.data_ptr<float>());
  return {out_payload, out_scales};
}

// Shared checks of the two outer-step ops. Returns params' dtype (F32 when params is absent).
DType outer_checks(c10::string_view op, const at::Tensor& anchor, const std::optional<at::Tensor>& momentum,
                   const std::optional<at::Tensor>& params, double mu) {
  check_f32(op, "anchor", anchor);
  const int64_t n = anchor.numel();
  check_inplace(op, "anchor", anchor, n);
  TORCH_CHECK(mu == 0.0 || momentum.has_value(), op, ": momentum buffer is required when mu != 0, got mu=", mu);
  if (momentum.has_value()) {
    check_f32(op, "momentum", *momentum);
    check_inplace(op, "momentum", *momentum, n);
  }
  DType d = DType::F32;
  if (params.has_value()) {
    d = float_dtype(op, "params", *params);
    check_inplace(op, "params", *params, n);
  }
  return d;
}

void outer_nesterov_step_cpu(const at::Tensor& anchor, const std::optional<at::Tensor>& momentum,
                             const std::optional<at::Tensor>& params, const at::Tensor& grad_, double lr, double mu,
                             bool nesterov) {
  constexpr const char* op = "outer_nesterov_step";
  const DType d = outer_checks(op, anchor, momentum, params, mu);
  check_cpu(op, "grad", grad_);
  check_f32(op, "grad", grad_);
  TORCH_CHECK(grad_.numel() == anchor.numel(), op, ": grad has ", grad_.numel(), " elements, anchor has ",
              anchor.numel());
  const at::Tensor grad = grad_.contiguous();
  cpu::outer_nesterov_step(anchor.data_ptr<float>(), momentum.has_value() ? momentum->data_ptr<float>() : nullptr, d,
                           params.has_value() ? params->data_ptr() : nullptr, grad.data_ptr<float>(), Format::None,
                           nullptr, nullptr, 1.0f, anchor.numel(), kDefaultBlockSize, static_cast<float>(lr),
                           static_cast<float>(mu), nesterov);
}

void outer_nesterov_step_compressed_cpu(const at::Tensor& anchor, const std::optional<at::Tensor>& momentum,
                                        const std::optional<at::Tensor>& params, const at::Tensor& payload_,
                                        const at::Tensor& scales_, c10::string_view fmt, int64_t block_size,
                                        double grad_factor, double lr, double mu, bool nesterov) {
  constexpr const char* op = "outer_nesterov_step_compressed";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  const DType d = outer_checks(op, anchor, momentum, params, mu);
  check_encoded(op, payload_, scales_, f, anchor.numel(), block_size);
  const at::Tensor payload = payload_.contiguous(), scales = scales_.contiguous();
  cpu::outer_nesterov_step(anchor.data_ptr<float>(), momentum.has_value() ? momentum->data_ptr<float>() : nullptr, d,
                           params.has_value() ? params->data_ptr() : nullptr, nullptr, f,
                           payload.data_ptr<uint8_t>(), scales.data_ptr<float>(), static_cast<float>(grad_factor),
                           anchor.numel(), block_size, static_cast<float>(lr), static_cast<float>(mu), nesterov);
}

}  // namespace
}  // namespace localsgd

TORCH_LIBRARY_IMPL(localsgd_comm, CPU, m) {
  m.impl("quantize", &localsgd::quantize_cpu);
  m.impl("dequantize", &localsgd::dequantize_cpu);
  m.impl("compress_delta", &localsgd::compress_delta_cpu);
  m.impl("dequantize_reduce", &localsgd::dequantize_reduce_cpu);
  m.impl("dequantize_reduce_requantize", &localsgd::dequantize_reduce_requantize_cpu);
  m.impl("outer_nesterov_step", &localsgd::outer_nesterov_step_cpu);
  m.impl("outer_nesterov_step_compressed", &localsgd::outer_nesterov_step_compressed_cpu);
}
