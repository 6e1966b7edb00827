// The all-reduces: the quantized all-reduce of one tensor (quantized_allreduce), all_reduce and
// all_reduce_coalesced (compressed or passed through, by reason), all_reduce_compressed (bytes
// already encoded), their scratch buffers and their counters.
#include <algorithm>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "call_header.h"
#include "common.h"
#include "inner_collective.h"
#include "localsgd_backend.h"
#include "pipeline.h"

namespace localsgd {

const char* LocalSGDBackend::passthrough_reason(const at::Tensor& t, c10d::ReduceOp op) const {
  if (format_ == Format::None) return "format_none";
  const auto s = t.scalar_type();
  if (s != at::kFloat && s != at::kBFloat16 && s != at::kHalf) return "dtype";
  if (op != c10d::ReduceOp::SUM && op != c10d::ReduceOp::AVG) return "op";
  if (static_cast<int64_t>(t.numel() * t.element_size()) < threshold_) return "small";
  return nullptr;
}

void LocalSGDBackend::count_passthrough(const char* reason, int64_t bytes, bool log) {
  const int64_t p = getSize();
  bool first = false;
  {
    std::lock_guard<std::mutex> lk(stats_mu_);
    stats_.passthrough_calls += 1;
    stats_.passthrough_reasons[reason] += 1;
    // A ring all-reduce sends 2 (p-1)/p of the tensor per rank (gloo's own algorithm may differ).
    stats_.bytes_sent += 2 * (p - 1) * bytes / std::max<int64_t>(p, 1);
    stats_.bytes_received += 2 * (p - 1) * bytes / std::max<int64_t>(p, 1);
    const uint32_t bit = std::string(reason) == "small" ? 1u : (std::string(reason) == "op" ? 2u : 4u);
    if (log && !(logged_reasons_ & bit)) {
      logged_reasons_ |= bit;
      first = true;
    }
  }
  if (first) {
    TORCH_WARN("localsgd: an all-reduce of a floating tensor was sent uncompressed (reason: ", reason,
               "; format ", format_name(format_), ", threshold_bytes ", threshold_,
               "). Logged once per reason; counts are in localsgd_comm.get_backend_stats().");
  }
}

at::Tensor LocalSGDBackend::scratch(int64_t nbytes, const at::TensorOptions& opts) {
  // CUDA tensors come from torch's caching allocator already; only CPU scratch is kept.
  if (!opts.device().is_cpu()) return at::empty({nbytes}, opts);
  if (!cpu_workspace_.defined() || cpu_workspace_.numel() < nbytes) {
    cpu_workspace_ = at::Tensor();  // drop the old one first: peak memory is the new size only
    cpu_workspace_ = at::empty({nbytes}, opts);
  }
  return cpu_workspace_.narrow(0, 0, nbytes);
}

at::Tensor LocalSGDBackend::pinned_scratch(int64_t nbytes) {
  // Host mirror of a CUDA workspace for gloo; pinned so that the stream copies are asynchronous.
  if (!pinned_workspace_.defined() || pinned_workspace_.numel() < nbytes) {
    pinned_workspace_ = at::Tensor();
    pinned_workspace_ = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }
  return pinned_workspace_.narrow(0, 0, nbytes);
}

// CUDA: the kernels queued on the backend stream (the call's `stream`) read and write the
// caller's tensor `t`, which was allocated on another stream. Recorded with the caching allocator,
// its memory is not handed to a new allocation, once the caller frees it, before the backend
// stream has passed the point it had reached at the free (after every kernel of this call, which
// holds `t` until they are queued). Nothing for CPU calls.
namespace {
void used_on_backend_stream(const Call& call, const at::Tensor& t) {
  if (call.stream && t.is_cuda()) t.record_stream(*call.stream);
}
}  // namespace

// ---- the quantized all-reduce (runs on the worker) -----------------------------------------------
// Steps as in docs/design.md: (1) quantize the local tensor per chunk, (2) all-to-all of the p
// records, (3+4) fused dequantize + fp32 sum (+ 1/p) + requantize of the owned chunk, (5)
// all-gather of the reduced records, (6) dequantize into the tensor. Two roundings per element;
// every rank dequantizes the same bytes, so results are bitwise identical. The steps run piece by
// piece (pipelined_allreduce, whatever the device); the kernels are given the pieces' global
// element offsets, so the bytes are those of whole-chunk calls.
void LocalSGDBackend::quantized_allreduce(const c10::intrusive_ptr<c10d::Backend>& inner, at::Tensor t,
                                          bool average, uint64_t call_id, const Call& call) {
  const int64_t p = getSize(), me = getRank(), n = t.numel(), B = block_;
  const Format f = format_;
  const DType dt = to_dtype(t.scalar_type());
  // Non-contiguous tensors are reduced in a contiguous copy and copied back.
  at::Tensor x = t.is_contiguous() ? t : t.contiguous();
  const Chunking ch = make_chunking(f, n, B, p);
  const int64_t R = ch.record, esize = x.element_size();
  auto bytes = at::TensorOptions().dtype(at::kByte).device(x.device());
  // CUDA: the current stream is the backend's (the call's guard), so the workspace and a
  // contiguous copy belong to it; the caller's tensor is recorded as used there.
  used_on_backend_stream(call, t);
  at::Tensor ws = scratch((3 * p + 1) * R, bytes);
  RoundingMode rm;
  uint64_t call_seed = 0;
  if (seed_ >= 0) {
    rm.stochastic = true;
    call_seed = mix64(static_cast<uint64_t>(seed_), call_id);
  }
  // Each rank draws its own random numbers for step (1) (seed mixed with the rank) so stochastic
  // rounding errors average out across ranks; step (4) uses the call's seed.
  RoundingMode rm_local = rm, rm_reduce = rm;
  rm_local.seed = mix64(call_seed, static_cast<uint64_t>(me) + 1);
  rm_reduce.seed = call_seed;
  const float factor = average ? 1.0f / static_cast<float>(p) : 1.0f;

  auto ops = make_ops(x.device());
  char* data = static_cast<char*>(x.data_ptr());
  ProduceFn produce = [&](const Piece& pc, uint8_t* rec) {
    RoundingMode q = rm_local;
    q.index_offset = pc.g0;
    ops->quantize(f, dt, data + pc.g0 * esize, pc.valid, B, q, rec + payload_offset(f, pc.e0),
                  reinterpret_cast<float*>(rec + ch.cap) + pc.b0);
  };
  ConsumeFn consume = [&](const Piece& pc, const uint8_t* rec) {
    ops->dequantize(f, rec + payload_offset(f, pc.e0), reinterpret_cast<const float*>(rec + ch.cap) + pc.b0, pc.valid,
                    B, dt, data + pc.g0 * esize);
  };
  run_pipeline(inner, *ops, p, me, f, B, ch, n, ws, [this](int64_t nb) { return pinned_scratch(nb); }, factor,
               rm_reduce, produce, consume, state_.get(), call, next_tag_call_++);
  if (!x.is_same(t)) t.copy_(x);
  std::lock_guard<std::mutex> lk(stats_mu_);
  // Per rank: p-1 records out (and in) in each of the two phases (the call header is counted
  // when it is posted).
  const int64_t wire = (p - 1) * 2 * R;
  stats_.bytes_sent += wire;
  stats_.bytes_received += wire;
  stats_.compressed_calls += 1;
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                          const c10d::AllreduceOptions& opts) {
  TORCH_CHECK(!tensors.empty(), "localsgd all_reduce: expected at least one tensor, got none");
  const at::Tensor& t = tensors[0];
  const c10::DeviceType dev = t.device().type();
  auto inner = inner_for(t);
  const char* reason = tensors.size() == 1 ? passthrough_reason(t, opts.reduceOp) : "multi_tensor";
  if (reason != nullptr) {
    const bool floating = at::isFloatingType(t.scalar_type());
    count_passthrough(reason, t.numel() * t.element_size(),
                      /*log=*/floating && std::string(reason) != "format_none" && std::string(reason) != "dtype");
    const bool avg = opts.reduceOp == c10d::ReduceOp::AVG;
    c10d::AllreduceOptions o = opts;
    // gloo has no AVG: sum, then divide (floating tensors) before the Work completes.
    if (avg && dev == c10::DeviceType::CPU) {
      TORCH_CHECK(at::isFloatingType(t.scalar_type()), "localsgd all_reduce: ReduceOp.AVG needs a floating tensor, got ",
                  t.scalar_type());
      o.reduceOp = c10d::ReduceOp::SUM;
    }
    std::vector<at::Tensor> ts = tensors;
    const int64_t p = getSize();
    const bool divide = avg && dev == c10::DeviceType::CPU;
    const CallSpec spec = spec_for("all_reduce", c10d::OpType::ALLREDUCE, ts, static_cast<int64_t>(opts.reduceOp.op_),
                                   0, opts.timeout);
    return passthrough(c10d::OpType::ALLREDUCE, spec, ts, dev, [inner, ts, o, divide, p, state = state_]() mutable {
      record_on_current_stream(ts);
      auto w = inner->allreduce(ts, o);
      if (!divide) return w;
      wait_inner(state, w);  // CPU only: divide after the sum, still on the worker and in order
      for (auto& x : ts) x.div_(static_cast<double>(p));
      return w;
    });
  }
  for (const auto& x : tensors) {
    TORCH_CHECK(!x.is_sparse(), "localsgd all_reduce: sparse tensors are not supported");
  }
  const bool avg = opts.reduceOp == c10d::ReduceOp::AVG;
  std::vector<c10::Device> devs;
  if (dev == c10::DeviceType::CUDA) devs.push_back(t.device());
  auto work = c10::make_intrusive<LocalSGDWork>(c10d::OpType::ALLREDUCE, tensors, devs, state_);
  at::Tensor tt = t;
  CallSpec spec = spec_for("all_reduce", c10d::OpType::ALLREDUCE, {t}, static_cast<int64_t>(opts.reduceOp.op_), block_,
                           opts.timeout);
  spec.format = static_cast<int64_t>(format_);
  enqueue(spec, t.device(), [this, work, inner, tt, avg](std::exception_ptr cancel, Call& call) {
    if (cancel) {
      work->complete(cancel);
      return;
    }
    try {
      quantized_allreduce(inner, tt, avg, next_call_id_++, call);
      work->complete(nullptr);
    } catch (...) {
      finish(work, std::current_exception());
    }
  });
  return work;
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                                    const c10d::AllreduceCoalescedOptions& opts) {
  // One result per tensor (dist.all_reduce_coalesced): each tensor is compressed or passed
  // through on its own, all inside one queued task so the sequence is identical on every rank.
  TORCH_CHECK(!tensors.empty(), "localsgd all_reduce_coalesced: expected at least one tensor, got none");
  const c10::DeviceType dev = tensors[0].device().type();
  for (const auto& x : tensors) {
    TORCH_CHECK(x.device().type() == dev, "localsgd all_reduce_coalesced: expected all tensors on one device type, got ",
                tensors[0].device(), " and ", x.device());
  }
  auto inner = inner_for(tensors[0]);
  if (opts.reduceOp == c10d::ReduceOp::AVG && dev == c10::DeviceType::CPU) {
    // Checked before anything is issued (as all_reduce does): otherwise the worker would sum the
    // integer tensor and only then fail in the division, leaving it summed.
    for (const auto& x : tensors) {
      TORCH_CHECK(at::isFloatingType(x.scalar_type()),
                  "localsgd all_reduce_coalesced: ReduceOp.AVG needs floating tensors, got ", x.scalar_type());
    }
  }
  std::vector<const char*> reasons;
  for (const auto& x : tensors) {
    const char* r = passthrough_reason(x, opts.reduceOp);
    reasons.push_back(r);
    if (r) count_passthrough(r, x.numel() * x.element_size(), at::isFloatingType(x.scalar_type()) &&
                             std::string(r) != "format_none" && std::string(r) != "dtype");
  }
  const bool avg = opts.reduceOp == c10d::ReduceOp::AVG;
  std::vector<c10::Device> devs;
  if (dev == c10::DeviceType::CUDA) devs.push_back(tensors[0].device());
  auto work = c10::make_intrusive<LocalSGDWork>(c10d::OpType::ALLREDUCE_COALESCED, tensors, devs, state_);
  std::vector<at::Tensor> ts = tensors;
  c10d::AllreduceOptions o;
  o.reduceOp = opts.reduceOp;
  o.timeout = opts.timeout;
  const int64_t p = getSize();
  // One header for the list: its digest covers every tensor's size, dtype and path.
  uint64_t digest = static_cast<uint64_t>(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    digest = mix64(digest, static_cast<uint64_t>(ts[i].numel()));
    digest = mix64(digest, static_cast<uint64_t>(ts[i].scalar_type()) * 2 + (reasons[i] == nullptr ? 1 : 0));
  }
  CallSpec spec = spec_for("all_reduce_coalesced", c10d::OpType::ALLREDUCE_COALESCED, ts,
                           static_cast<int64_t>(opts.reduceOp.op_), static_cast<int64_t>(digest >> 1), opts.timeout);
  spec.format = static_cast<int64_t>(format_);
  enqueue(spec, ts[0].device(), [this, work, inner, ts, reasons, avg, o, p](std::exception_ptr cancel,
                                                                            Call& call) mutable {
    if (cancel) {
      work->complete(cancel);
      return;
    }
    try {
      for (size_t i = 0; i < ts.size(); ++i) {
        if (reasons[i] == nullptr) {
          quantized_allreduce(inner, ts[i], avg, next_call_id_++, call);
          continue;
        }
        std::vector<at::Tensor> one{ts[i]};
        record_on_current_stream(one);
        c10d::AllreduceOptions oi = o;
        const bool divide = avg && ts[i].device().is_cpu();
        if (divide) oi.reduceOp = c10d::ReduceOp::SUM;
        wait_inner(state_, inner->allreduce(one, oi));
        if (divide) ts[i].div_(static_cast<double>(p));
      }
      work->complete(nullptr);
    } catch (...) {
      finish(work, std::current_exception());
    }
  });
  return work;
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allreduce_compressed(at::Tensor payload, at::Tensor scales,
                                                                     int64_t numel, int format, int64_t block,
                                                                     bool average, int64_t seed) {
  TORCH_CHECK(format >= 1 && format <= 3, "localsgd all_reduce_compressed: expected format int8/int4/fp8, got code ",
              format);
  const Format f = static_cast<Format>(format);
  TORCH_CHECK(valid_block_size(block), "localsgd all_reduce_compressed: block_size must be a power of two in [",
              kMinBlockSize, ", ", kMaxBlockSize, "], got ", block);
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.dim() == 1 && payload.is_contiguous() &&
                  payload.numel() == payload_bytes(f, numel),
              "localsgd all_reduce_compressed: expected a contiguous 1-D uint8 payload of ", payload_bytes(f, numel),
              " bytes, got ", payload.scalar_type(), " ", payload.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.is_contiguous() &&
                  scales.numel() == num_blocks(numel, block),
              "localsgd all_reduce_compressed: expected contiguous 1-D float32 scales of ", num_blocks(numel, block),
              " blocks, got ", scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(payload.device() == scales.device(), "localsgd all_reduce_compressed: payload and scales on ",
              payload.device(), " and ", scales.device());
  TORCH_CHECK(payload.device().is_cpu() || payload.device().is_cuda(),
              "localsgd all_reduce_compressed: expected CPU or CUDA tensors, got ", payload.device());
  auto inner = inner_for(payload);
  std::vector<c10::Device> devs;
  if (payload.is_cuda()) devs.push_back(payload.device());
  auto work = c10::make_intrusive<LocalSGDWork>(c10d::OpType::ALLREDUCE, std::vector<at::Tensor>{payload, scales}, devs,
                                                state_);
  CallSpec spec;
  spec.what = "all_reduce_compressed";
  spec.kind = kKindCompressed;
  spec.format = format;
  spec.op = average ? 1 : 0;
  spec.numel = numel;
  spec.extra = block;
  enqueue(spec, payload.device(), [this, work, inner, payload, scales, numel, f, block, average,
                                   seed](std::exception_ptr cancel, Call& call) {
    if (cancel) {
      work->complete(cancel);
      return;
    }
    try {
      const int64_t p = getSize(), me = getRank(), n = numel, B = block;
      const Chunking ch = make_chunking(f, n, B, p);
      const int64_t R = ch.record;
      auto bytes = at::TensorOptions().dtype(at::kByte).device(payload.device());
      used_on_backend_stream(call, payload);
      used_on_backend_stream(call, scales);
      at::Tensor ws = scratch((3 * p + 1) * R, bytes);
      RoundingMode q;
      q.stochastic = seed >= 0;
      q.seed = seed >= 0 ? static_cast<uint64_t>(seed) : 0;
      const float factor = average ? 1.0f / static_cast<float>(p) : 1.0f;
      // Records are filled from and emptied into the caller's encoded tensor by byte copies.
      auto ops = make_ops(payload.device());
      uint8_t* pay = payload.data_ptr<uint8_t>();
      uint8_t* sc = reinterpret_cast<uint8_t*>(scales.data_ptr<float>());
      ProduceFn produce = [&](const Piece& pc, uint8_t* rec) {
        ops->copy(rec + payload_offset(f, pc.e0), pay + payload_offset(f, pc.g0), payload_bytes(f, pc.valid));
        ops->copy(rec + ch.cap + 4 * pc.b0, sc + 4 * (pc.g0 / B), 4 * num_blocks(pc.valid, B));
      };
      ConsumeFn consume = [&](const Piece& pc, const uint8_t* rec) {
        ops->copy(pay + payload_offset(f, pc.g0), rec + payload_offset(f, pc.e0), payload_bytes(f, pc.valid));
        ops->copy(sc + 4 * (pc.g0 / B), rec + ch.cap + 4 * pc.b0, 4 * num_blocks(pc.valid, B));
      };
      run_pipeline(inner, *ops, p, me, f, B, ch, n, ws, [this](int64_t nb) { return pinned_scratch(nb); }, factor, q,
                   produce, consume, state_.get(), call, next_tag_call_++);
      {
        std::lock_guard<std::mutex> lk(stats_mu_);
        const int64_t wire = (p - 1) * 2 * R;
        stats_.bytes_sent += wire;
        stats_.bytes_received += wire;
        stats_.compressed_calls += 1;
      }
      work->complete(nullptr);
    } catch (...) {
      finish(work, std::current_exception());
    }
  });
  return work;
}

}  // namespace localsgd
