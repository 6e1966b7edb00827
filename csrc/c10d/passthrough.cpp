// Every collective the backend does not compress, passed through to the inner group in order on
// the worker, and counted; send/recv go straight to the inner group.
#include <functional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "call_header.h"
#include "inner_collective.h"
#include "localsgd_backend.h"
#include "tags.h"

namespace localsgd {

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::passthrough(
    c10d::OpType op, const CallSpec& spec, std::vector<at::Tensor> outputs, c10::DeviceType device,
    std::function<c10::intrusive_ptr<c10d::Work>()> issue) {
  std::vector<c10::Device> devs;
  if (device == c10::DeviceType::CUDA && !outputs.empty()) devs.push_back(outputs[0].device());
  const c10::Device where = devs.empty() ? c10::Device(device) : devs[0];
  auto work = c10::make_intrusive<LocalSGDWork>(op, std::move(outputs), devs, state_);
  enqueue(spec, where, [this, work, issue = std::move(issue)](std::exception_ptr cancel, Call& call) {
    if (cancel) {
      work->complete(cancel);
      return;
    }
    try {
      if (call.stream) {
        // Issued with the backend stream current ("Streams" in worker.cpp): NCCL orders its
        // stream after it (gloo's CUDA path its copy streams); wait() on the inner work makes
        // the backend stream wait for the collective, then the Work completes (its event is
        // recorded on the backend stream). Its tensors were recorded with the caching
        // allocator as used on the backend stream when it was issued (record_on_current_stream).
        wait_inner(state_, issue());
        work->complete(nullptr);
        return;
      }
      auto inner = issue();
      c10::intrusive_ptr<c10::ivalue::Future> fut;
      try {
        fut = inner->getFuture();
      } catch (const std::exception&) {
        fut.reset();  // an inner Work without futures: fall back to a blocking wait
      }
      if (!fut) {
        inner->wait();
        work->complete(nullptr);
        return;
      }
      // completes the Work when the inner collective ends, or at abort() (gloo cannot abort it)
      InnerCollective::track(state_, inner, work);
    } catch (...) {
      finish(work, std::current_exception());
    }
  });
  return work;
}

void LocalSGDBackend::count_ring_share(const char* op, int64_t bytes) { count_op(op, bytes, bytes); }

void LocalSGDBackend::count_op(const char* op, int64_t sent, int64_t received) {
  std::lock_guard<std::mutex> lk(stats_mu_);
  stats_.op_calls[op] += 1;
  stats_.op_bytes_sent[op] += sent;
  stats_.bytes_sent += sent;
  stats_.bytes_received += received;
}

// ---- pass-through -----------------------------------------------------------------------------

namespace {
int64_t nbytes_of(const at::Tensor& t) { return t.numel() * t.element_size(); }
int64_t nbytes_of(const std::vector<at::Tensor>& ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += nbytes_of(t);
  return n;
}
int64_t nbytes_of(const std::vector<std::vector<at::Tensor>>& tss) {
  int64_t n = 0;
  for (const auto& ts : tss) n += nbytes_of(ts);
  return n;
}
// Children of `rank` in a binomial broadcast tree rooted at `root` (gloo's broadcast): each one
// receives the whole tensor from it.
int64_t binomial_children(int64_t rank, int64_t root, int64_t p) {
  const int64_t v = (rank - root + p) % p;
  int64_t children = 0;
  for (int64_t mask = 1; mask < p; mask <<= 1) {
    if (v < mask && v + mask < p) ++children;
  }
  return children;
}
// Bytes of the rows of an all-to-all buffer that go to (or come from) other ranks.
int64_t alltoall_bytes(const at::Tensor& t, const std::vector<int64_t>& splits, int64_t me, int64_t p) {
  const int64_t total = nbytes_of(t);
  if (splits.empty()) return p > 0 ? total - total / p : 0;
  const int64_t rows = t.dim() > 0 ? t.size(0) : 0;
  const int64_t row_bytes = rows > 0 ? total / rows : 0;
  int64_t others = 0;
  for (int64_t r = 0; r < static_cast<int64_t>(splits.size()); ++r) {
    if (r != me) others += splits[r];
  }
  return others * row_bytes;
}
}  // namespace

// ---- the pass-through collectives ----------------------------------------------------------------
// Each override says only what is particular to its collective: the tensor that picks the inner
// group (checked to exist), the bytes this rank sends and receives under the inner backend's
// algorithm, the call header's fields and the Work's outputs. call_inner() and passthrough() do
// the rest, the same way for all of them.

namespace {
// `ts`' first tensor (the one that picks the inner group); "localsgd <what>: expected at least
// one <noun>" when there is none.
const at::Tensor& first_of(const char* what, const std::vector<at::Tensor>& ts, const char* noun) {
  TORCH_CHECK(!ts.empty(), "localsgd ", what, ": expected at least one ", noun);
  return ts[0];
}
std::vector<at::Tensor> flatten(const std::vector<std::vector<at::Tensor>>& tss) {
  std::vector<at::Tensor> flat;
  for (const auto& v : tss) flat.insert(flat.end(), v.begin(), v.end());
  return flat;
}
c10::DeviceType device_type_of(const at::Tensor& t) { return t.device().type(); }
// The worker's side of a pass-through collective: `method` of `inner`, called with copies of
// `args` taken now, on the caller's thread.
template <typename... Params, typename... Args>
std::function<c10::intrusive_ptr<c10d::Work>()> call_inner(
    c10::intrusive_ptr<c10d::Backend> inner, c10::intrusive_ptr<c10d::Work> (c10d::Backend::*method)(Params...),
    Args... args) {
  return [inner = std::move(inner), method, args = std::make_tuple(std::move(args)...)]() mutable {
    return std::apply([&](auto&... a) {
      (record_on_current_stream(a), ...);
      return (inner.get()->*method)(a...);
    }, args);
  };
}
}  // namespace

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                          const c10d::BroadcastOptions& opts) {
  const at::Tensor& on = first_of("broadcast", tensors, "tensor");
  auto inner = inner_for(on);
  const int64_t p = getSize(), me = getRank(), n = nbytes_of(tensors), root = opts.rootRank;
  count_op("broadcast", n * binomial_children(me, root, p), me == root ? 0 : n);
  return passthrough(c10d::OpType::BROADCAST,
                     spec_for("broadcast", c10d::OpType::BROADCAST, tensors, -1, opts.rootRank, opts.timeout),
                     tensors, device_type_of(on), call_inner(inner, &c10d::Backend::broadcast, tensors, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::reduce(std::vector<at::Tensor>& tensors,
                                                       const c10d::ReduceOptions& opts) {
  const at::Tensor& on = first_of("reduce", tensors, "tensor");
  auto inner = inner_for(on);
  // reduce-scatter then gather to the root: (p-1)/p of the tensor out of every rank.
  const int64_t p = getSize(), n = nbytes_of(tensors);
  count_op("reduce", n - n / p, getRank() == opts.rootRank ? n - n / p : 0);
  return passthrough(c10d::OpType::REDUCE,
                     spec_for("reduce", c10d::OpType::REDUCE, tensors, static_cast<int64_t>(opts.reduceOp.op_),
                              opts.rootRank, opts.timeout),
                     tensors, device_type_of(on), call_inner(inner, &c10d::Backend::reduce, tensors, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                          std::vector<at::Tensor>& inputs,
                                                          const c10d::AllgatherOptions& opts) {
  const at::Tensor& on = first_of("allgather", inputs, "input tensor");
  auto inner = inner_for(on);
  count_ring_share("allgather", (getSize() - 1) * nbytes_of(inputs));
  return passthrough(c10d::OpType::ALLGATHER,
                     spec_for("all_gather", c10d::OpType::ALLGATHER, inputs, -1, 0, opts.timeout), flatten(outputs),
                     device_type_of(on), call_inner(inner, &c10d::Backend::allgather, outputs, inputs, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                                const c10d::AllgatherOptions& opts) {
  auto inner = inner_for(input);
  count_ring_share("allgather", (getSize() - 1) * nbytes_of(input));
  return passthrough(c10d::OpType::_ALLGATHER_BASE,
                     spec_for("all_gather_into_tensor", c10d::OpType::_ALLGATHER_BASE, {input}, -1, 0, opts.timeout),
                     {output}, device_type_of(input),
                     call_inner(inner, &c10d::Backend::_allgather_base, output, input, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                                    std::vector<at::Tensor>& inputs,
                                                                    const c10d::AllgatherOptions& opts) {
  const at::Tensor& on = first_of("allgather_coalesced", inputs, "input tensor");
  auto inner = inner_for(on);
  count_ring_share("allgather", (getSize() - 1) * nbytes_of(inputs));
  return passthrough(c10d::OpType::ALLGATHER_COALESCED,
                     spec_for("all_gather_coalesced", c10d::OpType::ALLGATHER_COALESCED, inputs, -1, 0, opts.timeout),
                     flatten(outputs), device_type_of(on),
                     call_inner(inner, &c10d::Backend::allgather_coalesced, outputs, inputs, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                                std::vector<at::Tensor>& inputs,
                                                                                const c10d::AllgatherOptions& opts) {
  const at::Tensor& on = first_of("allgather_into_tensor_coalesced", inputs, "input tensor");
  auto inner = inner_for(on);
  count_ring_share("allgather", (getSize() - 1) * nbytes_of(inputs));
  return passthrough(
      c10d::OpType::COALESCED,
      spec_for("all_gather_into_tensor_coalesced", c10d::OpType::COALESCED, inputs, -1, 1, opts.timeout), outputs,
      device_type_of(on), call_inner(inner, &c10d::Backend::allgather_into_tensor_coalesced, outputs, inputs, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::gather(std::vector<std::vector<at::Tensor>>& outputs,
                                                       std::vector<at::Tensor>& inputs,
                                                       const c10d::GatherOptions& opts) {
  const at::Tensor& on = first_of("gather", inputs, "input tensor");
  auto inner = inner_for(on);
  const int64_t p = getSize(), n = nbytes_of(inputs);
  const bool root = getRank() == opts.rootRank;
  count_op("gather", root ? 0 : n, root ? (p - 1) * n : 0);
  return passthrough(c10d::OpType::GATHER,
                     spec_for("gather", c10d::OpType::GATHER, inputs, -1, opts.rootRank, opts.timeout),
                     flatten(outputs), device_type_of(on),
                     call_inner(inner, &c10d::Backend::gather, outputs, inputs, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::scatter(std::vector<at::Tensor>& outputs,
                                                        std::vector<std::vector<at::Tensor>>& inputs,
                                                        const c10d::ScatterOptions& opts) {
  const at::Tensor& on = first_of("scatter", outputs, "output tensor");
  auto inner = inner_for(on);
  const int64_t p = getSize(), n = nbytes_of(outputs);
  const bool root = getRank() == opts.rootRank;
  count_op("scatter", root ? (p - 1) * n : 0, root ? 0 : n);
  return passthrough(c10d::OpType::SCATTER,
                     spec_for("scatter", c10d::OpType::SCATTER, outputs, -1, opts.rootRank, opts.timeout), outputs,
                     device_type_of(on), call_inner(inner, &c10d::Backend::scatter, outputs, inputs, opts));
}

// gloo reduces the whole input with its all-reduce, then keeps this rank's part: the three
// reduce-scatters count as a ring all-reduce of their input.
c10::intrusive_ptr<c10d::Work> LocalSGDBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                               std::vector<std::vector<at::Tensor>>& inputs,
                                                               const c10d::ReduceScatterOptions& opts) {
  const at::Tensor& on = first_of("reduce_scatter", outputs, "output tensor");
  auto inner = inner_for(on);
  count_ring_share("reduce_scatter", 2 * (getSize() - 1) * nbytes_of(inputs) / getSize());
  return passthrough(c10d::OpType::REDUCE_SCATTER,
                     spec_for("reduce_scatter", c10d::OpType::REDUCE_SCATTER, outputs,
                              static_cast<int64_t>(opts.reduceOp.op_), 0, opts.timeout),
                     outputs, device_type_of(on),
                     call_inner(inner, &c10d::Backend::reduce_scatter, outputs, inputs, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                     const c10d::ReduceScatterOptions& opts) {
  auto inner = inner_for(input);
  count_ring_share("reduce_scatter", 2 * (getSize() - 1) * nbytes_of(input) / getSize());
  return passthrough(c10d::OpType::_REDUCE_SCATTER_BASE,
                     spec_for("reduce_scatter_tensor", c10d::OpType::_REDUCE_SCATTER_BASE, {output},
                              static_cast<int64_t>(opts.reduceOp.op_), 0, opts.timeout),
                     {output}, device_type_of(input),
                     call_inner(inner, &c10d::Backend::_reduce_scatter_base, output, input, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::ReduceScatterOptions& opts) {
  const at::Tensor& on = first_of("reduce_scatter_tensor_coalesced", inputs, "input tensor");
  auto inner = inner_for(on);
  count_ring_share("reduce_scatter", 2 * (getSize() - 1) * nbytes_of(inputs) / getSize());
  return passthrough(c10d::OpType::COALESCED,
                     spec_for("reduce_scatter_tensor_coalesced", c10d::OpType::COALESCED, outputs,
                              static_cast<int64_t>(opts.reduceOp.op_), 2, opts.timeout),
                     outputs, device_type_of(on),
                     call_inner(inner, &c10d::Backend::reduce_scatter_tensor_coalesced, outputs, inputs, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                              std::vector<int64_t>& output_splits,
                                                              std::vector<int64_t>& input_splits,
                                                              const c10d::AllToAllOptions& opts) {
  auto inner = inner_for(input);
  const int64_t p = getSize(), me = getRank();
  count_op("alltoall", alltoall_bytes(input, input_splits, me, p), alltoall_bytes(output, output_splits, me, p));
  CallSpec spec = spec_for("all_to_all_single", c10d::OpType::ALLTOALL_BASE, {input}, -1, 0, opts.timeout);
  if (!input_splits.empty() || !output_splits.empty()) spec.numel = -1;  // uneven splits: sizes may differ
  return passthrough(c10d::OpType::ALLTOALL_BASE, spec, {output}, device_type_of(input),
                     call_inner(inner, &c10d::Backend::alltoall_base, output, input, output_splits, input_splits,
                                opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::alltoall(std::vector<at::Tensor>& outputs,
                                                         std::vector<at::Tensor>& inputs,
                                                         const c10d::AllToAllOptions& opts) {
  const at::Tensor& on = first_of("alltoall", inputs, "input tensor");
  auto inner = inner_for(on);
  const int64_t me = getRank();
  int64_t sent = 0, received = 0;
  for (int64_t r = 0; r < static_cast<int64_t>(inputs.size()); ++r) {
    if (r != me) sent += nbytes_of(inputs[r]);
  }
  for (int64_t r = 0; r < static_cast<int64_t>(outputs.size()); ++r) {
    if (r != me) received += nbytes_of(outputs[r]);
  }
  count_op("alltoall", sent, received);
  CallSpec spec = spec_for("all_to_all", c10d::OpType::ALLTOALL, inputs, -1, 0, opts.timeout);
  spec.numel = -1;  // the list's sizes may differ between ranks
  return passthrough(c10d::OpType::ALLTOALL, spec, outputs, device_type_of(on),
                     call_inner(inner, &c10d::Backend::alltoall, outputs, inputs, opts));
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::barrier(const c10d::BarrierOptions& opts) {
  // A barrier orders after every collective queued before it (FIFO), like gloo's.
  return passthrough(c10d::OpType::BARRIER, spec_for("barrier", c10d::OpType::BARRIER, {}, -1, 0, opts.timeout), {},
                     c10::DeviceType::CPU, call_inner(cpu_inner_, &c10d::Backend::barrier, opts));
}

void LocalSGDBackend::check_user_tag(const char* what, int tag) const {
  check_healthy(what);
  TORCH_CHECK(tag < kPhaseTag[0], "localsgd ", what, ": tag ", tag, " is reserved (tags from ", kPhaseTag[0],
              " up carry the compressed all-reduce's messages, on the same inner connections); use a tag below ",
              kPhaseTag[0]);
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::send(std::vector<at::Tensor>& tensors, int dst, int tag) {
  TORCH_CHECK(!tensors.empty(), "localsgd send: expected a tensor");
  check_user_tag("send", tag);
  count_op("send", nbytes_of(tensors), 0);
  return inner_for(tensors[0])->send(tensors, dst, tag);
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::recv(std::vector<at::Tensor>& tensors, int src, int tag) {
  TORCH_CHECK(!tensors.empty(), "localsgd recv: expected a tensor");
  check_user_tag("recv", tag);
  count_op("recv", 0, nbytes_of(tensors));
  return inner_for(tensors[0])->recv(tensors, src, tag);
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  TORCH_CHECK(!tensors.empty(), "localsgd recvAnysource: expected a tensor");
  check_user_tag("recv", tag);
  count_op("recv", 0, nbytes_of(tensors));
  return inner_for(tensors[0])->recvAnysource(tensors, tag);
}

}  // namespace localsgd
