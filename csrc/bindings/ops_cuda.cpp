// pybind11 functions over the CUDA launchers (kernels_cuda.h), compiled only in CUDA builds
// (LOCALSGD_WITH_CUDA). localsgd_comm/kernels/cuda.py registers them as the ops' "cuda"
// kernels (or the Triton ones, by LOCALSGD_COMM_CUDA_IMPL). Arguments are those of the op
// schemas (localsgd_comm/_ops.py).
//
// Each function: one TORCH_CHECK per precondition, a device guard on the tensors' device,
// outputs allocated there, the launch on the current stream of that device (never stream 0),
// and launch errors turned into exceptions. Nothing synchronizes.
// Tensor conventions as in ops_cpu.cpp: read-only inputs are made contiguous, tensors mutated
// in place must already be contiguous, [p, k] inputs may be strided in dim 0 only.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <tuple>

#include "localsgd/format.h"
#include "localsgd/kernels.h"
#include "localsgd/kernels_cuda.h"

namespace localsgd {
namespace {

Format parse_format(const char* op, const std::string& fmt) {
  if (fmt == "int8") return Format::Int8;
  if (fmt == "int4") return Format::Int4;
  if (fmt == "fp8") return Format::Fp8;
  TORCH_CHECK(false, op, ": unknown compression format '", fmt,
              "': expected one of 'int8', 'int4', 'fp8' ('none' is handled before the op)");
  return Format::None;  // unreachable
}

void check_block(const char* op, int64_t block_size) {
  TORCH_CHECK(valid_block_size(block_size), op, ": block_size must be a power of two in [", kMinBlockSize, ", ",
              kMaxBlockSize, "], got ", block_size);
}

DType to_dtype(const char* op, const char* what, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, op, ": ", what, " must be float32, bfloat16 or float16, got ", t);
  }
  return DType::F32;  // unreachable
}

void check_cuda(const char* op, const char* what, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), op, ": ", what, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == dev, op, ": ", what, " must be on ", dev, " (the device of the first input), got ",
              t.device());
}

void check_f32(const char* op, const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ", t.scalar_type());
}

void check_inplace(const char* op, const char* what, const at::Tensor& t, int64_t n, const at::Device& dev) {
  check_cuda(op, what, t, dev);
  TORCH_CHECK(t.numel() == n, op, ": ", what, " must have ", n, " elements, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what,
              " must be contiguous (it is updated in place; a copy would lose the update)");
}

RoundingMode rounding(const char* op, std::optional<int64_t> seed, int64_t index_offset, int64_t block) {
  TORCH_CHECK(index_offset >= 0 && index_offset % block == 0, op,
              ": index_offset must be a non-negative multiple of block_size (", block, "), got ", index_offset);
  RoundingMode rm;
  rm.stochastic = seed.has_value();
  rm.seed = seed.has_value() ? static_cast<uint64_t>(*seed) : 0;  // int64 bits reinterpreted as uint64
  rm.index_offset = index_offset;
  return rm;
}

void raise_on_launch_error(const char* op) {
  const char* err = cuda::last_error();
  TORCH_CHECK(err == nullptr || err[0] == '\0', op, ": ", err);
}

std::tuple<at::Tensor, at::Tensor> alloc_encoded(Format f, int64_t n, int64_t block, const at::Tensor& like) {
  return {at::empty({payload_bytes(f, n)}, like.options().dtype(at::kByte)),
          at::empty({num_blocks(n, block)}, like.options().dtype(at::kFloat))};
}

void check_encoded(const char* op, const at::Tensor& payload, const at::Tensor& scales, Format f, int64_t numel,
                   int64_t block, const at::Device& dev) {
  check_cuda(op, "payload", payload, dev);
  check_cuda(op, "scales", scales, dev);
  TORCH_CHECK(payload.scalar_type() == at::kByte, op, ": payload must be uint8, got ", payload.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK(payload.dim() == 1 && payload.size(0) == payload_bytes(f, numel), op, ": payload must have shape [",
              payload_bytes(f, numel), "] for numel=", numel, ", got ", payload.sizes());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == num_blocks(numel, block), op, ": scales must have shape [",
              num_blocks(numel, block), "] for numel=", numel, " and block_size=", block, ", got ", scales.sizes());
}

at::Tensor dense_rows(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= 0 ? t : t.contiguous();
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// ---- ops ------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> cuda_quantize(const at::Tensor& x_, const std::string& fmt, int64_t block_size,
                                                 std::optional<int64_t> seed, int64_t index_offset) {
  constexpr const char* op = "quantize";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  check_cuda(op, "x", x_, x_.device());
  const DType d = to_dtype(op, "x", x_.scalar_type());
  const RoundingMode rm = rounding(op, seed, index_offset, block_size);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const int64_t n = x.numel();
  auto [payload, scales] = alloc_encoded(f, n, block_size, x);
  cuda::quantize(f, d, x.data_ptr(), n, block_size, rm, payload.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                 stream_of(x));
  raise_on_launch_error(op);
  return {payload, scales};
}

at::Tensor cuda_dequantize(const at::Tensor& payload_, const at::Tensor& scales_, const std::string& fmt,
                           int64_t numel, int64_t block_size, at::ScalarType dtype) {
  constexpr const char* op = "dequantize";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  const at::Device dev = payload_.device();
  check_encoded(op, payload_, scales_, f, numel, block_size, dev);
  const DType d = to_dtype(op, "dtype", dtype);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor payload = payload_.contiguous(), scales = scales_.contiguous();
  at::Tensor out = at::empty({numel}, payload.options().dtype(dtype));
  cuda::dequantize(f, payload.data_ptr<uint8_t>(), scales.data_ptr<float>(), numel, block_size, d, out.data_ptr(),
                   stream_of(payload));
  raise_on_launch_error(op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> cuda_compress_delta(const at::Tensor& anchor_, const at::Tensor& params_,
                                                       const std::optional<at::Tensor>& residual,
                                                       const std::string& fmt, int64_t block_size,
                                                       std::optional<int64_t> seed) {
  constexpr const char* op = "compress_delta";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  const at::Device dev = anchor_.device();
  check_cuda(op, "anchor", anchor_, dev);
  check_cuda(op, "params", params_, dev);
  check_f32(op, "anchor", anchor_);
  const DType d = to_dtype(op, "params", params_.scalar_type());
  const int64_t n = anchor_.numel();
  TORCH_CHECK(params_.numel() == n, op, ": params has ", params_.numel(), " elements but anchor has ", n);
  float* res = nullptr;
  if (residual.has_value()) {
    check_f32(op, "residual", *residual);
    check_inplace(op, "residual", *residual, n, dev);
    res = residual->data_ptr<float>();
  }
  const RoundingMode rm = rounding(op, seed, 0, block_size);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor anchor = anchor_.contiguous(), params = params_.contiguous();
  auto [payload, scales] = alloc_encoded(f, n, block_size, anchor);
  cuda::compress_delta(f, anchor.data_ptr<float>(), d, params.data_ptr(), res, n, block_size, rm,
                       payload.data_ptr<uint8_t>(), scales.data_ptr<float>(), nullptr, stream_of(anchor));
  raise_on_launch_error(op);
  return {payload, scales};
}

std::pair<at::Tensor, at::Tensor> reduce_inputs(const char* op, const at::Tensor& payloads, const at::Tensor& scales,
                                                Format f, int64_t numel, int64_t block) {
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  const at::Device dev = payloads.device();
  check_cuda(op, "payloads", payloads, dev);
  check_cuda(op, "scales", scales, dev);
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

at::Tensor cuda_dequantize_reduce(const at::Tensor& payloads_, const at::Tensor& scales_, const std::string& fmt,
                                  int64_t numel, int64_t block_size, double factor) {
  constexpr const char* op = "dequantize_reduce";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  auto [payloads, scales] = reduce_inputs(op, payloads_, scales_, f, numel, block_size);
  const c10::cuda::CUDAGuard guard(payloads_.device());
  at::Tensor out = at::empty({numel}, scales.options());
  cuda::dequantize_reduce(f, payloads.size(0), payloads.data_ptr<uint8_t>(), payloads.stride(0),
                          scales.data_ptr<float>(), scales.stride(0), numel, block_size, static_cast<float>(factor),
                          RoundingMode{}, out.data_ptr<float>(), nullptr, nullptr, stream_of(scales));
  raise_on_launch_error(op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> cuda_dequantize_reduce_requantize(const at::Tensor& payloads_,
                                                                     const at::Tensor& scales_, const std::string& fmt,
                                                                     int64_t numel, int64_t block_size, double factor,
                                                                     std::optional<int64_t> seed,
                                                                     int64_t index_offset) {
  constexpr const char* op = "dequantize_reduce_requantize";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  auto [payloads, scales] = reduce_inputs(op, payloads_, scales_, f, numel, block_size);
  const c10::cuda::CUDAGuard guard(payloads_.device());
  const RoundingMode rm = rounding(op, seed, index_offset, block_size);
  auto [out_payload, out_scales] = alloc_encoded(f, numel, block_size, scales);
  cuda::dequantize_reduce(f, payloads.size(0), payloads.data_ptr<uint8_t>(), payloads.stride(0),
                          scales.data_ptr<float>(), scales.stride(0), numel, block_size, static_cast<float>(factor), rm,
                          nullptr, out_payload.data_ptr<uint8_t>(), out_scales.data_ptr<float>(), stream_of(scales));
  raise_on_launch_error(op);
  return {out_payload, out_scales};
}

DType outer_checks(const char* op, const at::Tensor& anchor, const std::optional<at::Tensor>& momentum,
                   const std::optional<at::Tensor>& params, double mu) {
  const at::Device dev = anchor.device();
  check_f32(op, "anchor", anchor);
  const int64_t n = anchor.numel();
  check_inplace(op, "anchor", anchor, n, dev);
  TORCH_CHECK(mu == 0.0 || momentum.has_value(), op, ": momentum buffer is required when mu != 0, got mu=", mu);
  if (momentum.has_value()) {
    check_f32(op, "momentum", *momentum);
    check_inplace(op, "momentum", *momentum, n, dev);
  }
  DType d = DType::F32;
  if (params.has_value()) {
    d = to_dtype(op, "params", params->scalar_type());
    check_inplace(op, "params", *params, n, dev);
  }
  return d;
}

void cuda_outer_nesterov_step(const at::Tensor& anchor, const std::optional<at::Tensor>& momentum,
                              const std::optional<at::Tensor>& params, const at::Tensor& grad_, double lr, double mu,
                              bool nesterov) {
  constexpr const char* op = "outer_nesterov_step";
  const DType d = outer_checks(op, anchor, momentum, params, mu);
  check_cuda(op, "grad", grad_, anchor.device());
  check_f32(op, "grad", grad_);
  TORCH_CHECK(grad_.numel() == anchor.numel(), op, ": grad has ", grad_.numel(), " elements, anchor has ",
              anchor.numel());
  const c10::cuda::CUDAGuard guard(anchor.device());
  const at::Tensor grad = grad_.contiguous();
  cuda::outer_nesterov_step(anchor.data_ptr<float>(), momentum.has_value() ? momentum->data_ptr<float>() : nullptr,
                            d, params.has_value() ? params->data_ptr() : nullptr, grad.data_ptr<float>(), Format::None,
                            nullptr, nullptr, 1.0f, anchor.numel(), kDefaultBlockSize, static_cast<float>(lr),
                            static_cast<float>(mu), nesterov, stream_of(anchor));
  raise_on_launch_error(op);
}

void cuda_outer_nesterov_step_compressed(const at::Tensor& anchor, const std::optional<at::Tensor>& momentum,
                                         const std::optional<at::Tensor>& params, const at::Tensor& payload_,
                                         const at::Tensor& scales_, const std::string& fmt, int64_t block_size,
                                         double grad_factor, double lr, double mu, bool nesterov) {
  constexpr const char* op = "outer_nesterov_step_compressed";
  const Format f = parse_format(op, fmt);
  check_block(op, block_size);
  const DType d = outer_checks(op, anchor, momentum, params, mu);
  check_encoded(op, payload_, scales_, f, anchor.numel(), block_size, anchor.device());
  const c10::cuda::CUDAGuard guard(anchor.device());
  const at::Tensor payload = payload_.contiguous(), scales = scales_.contiguous();
  cuda::outer_nesterov_step(anchor.data_ptr<float>(), momentum.has_value() ? momentum->data_ptr<float>() : nullptr,
                            d, params.has_value() ? params->data_ptr() : nullptr, nullptr, f,
                            payload.data_ptr<uint8_t>(), scales.data_ptr<float>(), static_cast<float>(grad_factor),
                            anchor.numel(), block_size, static_cast<float>(lr), static_cast<float>(mu), nesterov,
                            stream_of(anchor));
  raise_on_launch_error(op);
}

}  // namespace

void init_cuda_bindings(pybind11::module& m) {
  namespace py = pybind11;
  m.def("cuda_set_grid_cap", &cuda::set_grid_cap, py::arg("ctas_per_sm"),
        "Benchmarks: cap the CUDA kernels' grids at ctas_per_sm CTAs per SM (0: no cap, the default)");
  m.def("cuda_grid_cap", &cuda::grid_cap);
  m.def("cuda_quantize", &cuda_quantize, py::arg("x"), py::arg("fmt"), py::arg("block_size"),
        py::arg("seed") = py::none(), py::arg("index_offset") = 0);
  m.def("cuda_dequantize", &cuda_dequantize, py::arg("payload"), py::arg("scales"), py::arg("fmt"), py::arg("numel"),
        py::arg("block_size"), py::arg("dtype"));
  m.def("cuda_compress_delta", &cuda_compress_delta, py::arg("anchor"), py::arg("params"), py::arg("residual"),
        py::arg("fmt"), py::arg("block_size"), py::arg("seed") = py::none());
  m.def("cuda_dequantize_reduce", &cuda_dequantize_reduce, py::arg("payloads"), py::arg("scales"), py::arg("fmt"),
        py::arg("numel"), py::arg("block_size"), py::arg("factor"));
  m.def("cuda_dequantize_reduce_requantize", &cuda_dequantize_reduce_requantize, py::arg("payloads"),
        py::arg("scales"), py::arg("fmt"), py::arg("numel"), py::arg("block_size"), py::arg("factor"),
        py::arg("seed") = py::none(), py::arg("index_offset") = 0);
  m.def("cuda_outer_nesterov_step", &cuda_outer_nesterov_step, py::arg("anchor"), py::arg("momentum"),
        py::arg("params"), py::arg("grad"), py::arg("lr"), py::arg("mu"), py::arg("nesterov"));
  m.def("cuda_outer_nesterov_step_compressed", &cuda_outer_nesterov_step_compressed, py::arg("anchor"),
        py::arg("momentum"), py::arg("params"), py::arg("payload"), py::arg("scales"), py::arg("fmt"),
        py::arg("block_size"), py::arg("grad_factor"), py::arg("lr"), py::arg("mu"), py::arg("nesterov"));
}

}  // namespace localsgd
