// The "localsgd" c10d backend: a c10d::Backend that runs the quantized all-reduce of docs/design.md
// (quantize -> all-to-all -> fused dequantize + fp32 sum + requantize -> all-gather ->
// dequantize) on top of inner backends created in Python (gloo for CPU tensors; NCCL, or gloo,
// for CUDA tensors) and passes every other collective through to them.
//
// Limitations, in plain words:
//  - Every collective of the group runs on one FIFO worker thread (see "Ordering" in worker.cpp), so
//    collectives of one group never overlap each other (gloo with 2 threads could overlap two).
//  - send/recv/recvAnysource go straight to the inner backend (they carry user tags); tags from
//    0x40000000 up are reserved for the backend's own messages and refused.
//  - Every collective carries a call header (sequence number, kind, format, op, dtype, element
//    count, block size or root) that each rank sends every peer when the call is made; the
//    worker compares them before any data moves, so ranks that disagree raise
//    "ranks disagree" on every rank instead of hanging or exchanging mismatched messages
//    (check_calls=false turns this off: one 64-byte message per peer and call less).
//  - After any collective of the group fails, the group is failed: every later call fails at
//    once with the first error (destroy the group and create a new one).
//  - Every message of a collective is waited for within the call's timeout (the collective's
//    options.timeout when set, else the group's), counted from when the worker starts the call.
//  - A Work's wait(timeout) blocks the calling thread until the worker is done with the call
//    (for CUDA tensors over gloo: until the data has moved, gloo being a host transport); for
//    CUDA tensors it (and synchronize()) then makes the waiting thread's current stream wait for
//    the call's completion event. CUDA calls run on a stream of the backend's own per device,
//    ordered after the caller's stream by an event recorded when the call is made, never with a
//    host sync of the caller's stream ("Streams" in worker.cpp). CI compiles the CUDA paths
//    (tests/test_compile_checks.py); tools/gpu_check.sh runs them when a GPU is available.
//  - all-reduce of a *list* of several tensors keeps gloo's legacy meaning (all list entries of
//    all ranks are reduced together) and passes through; dist.all_reduce_coalesced (one result
//    per tensor) is compressed tensor by tensor.
//  - Ranks whose tensor sizes straddle threshold_bytes (some compress, some pass through) issue
//    different collectives; that is a user error like any size mismatch, and gloo reports it
//    as an error or a timeout. Sizes that both compress are checked (metadata exchange).
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#include <memory>
#include <optional>

#include <c10/core/Stream.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "localsgd/format.h"
#include "call_header.h"
#include "work.h"

namespace localsgd {


struct BackendStats {
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  int64_t compressed_calls = 0;
  int64_t passthrough_calls = 0;
  std::map<std::string, int64_t> passthrough_reasons;
  // Every other pass-through collective (broadcast, all-gather, all-to-all, send, ...): calls
  // and bytes this rank sends, by op name. Included in bytes_sent / bytes_received.
  std::map<std::string, int64_t> op_calls;
  std::map<std::string, int64_t> op_bytes_sent;
  // The call headers this rank sent (64 bytes per peer and collective); in bytes_sent too.
  int64_t header_bytes = 0;
};


class LocalSGDBackend : public c10d::Backend {
 public:
  // cuda_inner may be null (no CUDA, or a CPU-only group). seed < 0: round to nearest.
  LocalSGDBackend(int rank, int size, c10::intrusive_ptr<c10d::Backend> cpu_inner,
                  c10::intrusive_ptr<c10d::Backend> cuda_inner, int format, int64_t block_size,
                  int64_t threshold_bytes, int64_t seed, int64_t timeout_ms, bool check_calls = true);
  ~LocalSGDBackend() override;

  const std::string getBackendName() const override { return "localsgd"; }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override;
  // Callers that already hold compressed bytes (format.h layout): reduced in place.
  c10::intrusive_ptr<c10d::Work> allreduce_compressed(at::Tensor payload, at::Tensor scales,
                                                      int64_t numel, int format,
                                                      int64_t block_size, bool average,
                                                      int64_t seed);

  // ---- pass-through ----
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(
      std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& output_splits,
                                               std::vector<int64_t>& input_splits,
                                               const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs,
                                          std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dst, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int src, int tag) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override;

  // Sequence numbers: every rank numbers its collectives from 0 in program order (the call
  // headers carry them), so there is nothing to agree on at creation.
  void setSequenceNumberForGroup() override {}
  uint64_t getSequenceNumberForGroup() override;
  void setTimeout(std::chrono::milliseconds timeout) override;

  void shutdown() override;
  // Puts the group in the failed state, fails every queued collective, aborts the point-to-point
  // messages of the one in flight and the inner groups (NCCL's abort; gloo has none), and
  // returns without waiting for the worker thread.
  void abort() override;
  // At interpreter exit (an atexit handler, before Python finalizes): wait up to grace_ms for the
  // outstanding Works, abort if some are still running, and join the worker. Afterwards no
  // thread of ours touches a Python object: a thread that needs the GIL once finalization has
  // begun is ended by CPython with a forced unwind, which aborts the process ("terminate called
  // without an active exception") when it crosses C++ frames.
  void exit_shutdown(int64_t grace_ms);
  // The group's first error ("" while healthy): after it every call fails at once with it.
  std::string failure() const { return state_->error(); }

  // ---- statistics (queried by localsgd_comm.get_backend_stats) ----
  BackendStats stats() const;
  void reset_stats();
  // Test hook: start the call sequence number and the tag counter of the pipelined calls near
  // their wrap points (seq mod 2^24, call mod 256). Only before the first collective.
  void set_counters_for_test(uint64_t seq, uint64_t tag_call);
  Format format() const { return format_; }
  int64_t block_size() const { return block_; }
  int64_t threshold_bytes() const { return threshold_; }

 private:
  // A queued collective. Called once on the worker: with nullptr to run it, or with an error
  // (shutdown before it was issued) that it must complete its Work with.
  using TaskFn = std::function<void(std::exception_ptr, Call&)>;
  struct Task {
    std::shared_ptr<Call> call;
    TaskFn fn;
  };
  // Numbers the call, posts its header to every peer, records an event on the caller's current
  // stream of `device` (CUDA), queues it (one critical section, so sequence numbers follow the
  // queue's order).
  void enqueue(const CallSpec& spec, const c10::Device& device, TaskFn fn);
  // The backend's own stream on CUDA device `index` (taken from c10's pool at first use): the
  // worker runs every CUDA call of the group on it ("Streams" in worker.cpp).
  c10::Stream backend_stream(c10::DeviceIndex index);
  std::mutex streams_mu_;
  std::map<c10::DeviceIndex, c10::Stream> streams_;  // guarded by streams_mu_
  // A call numbered seq with its header receives posted; post_header sends ours.
  std::shared_ptr<Call> new_call(uint64_t seq);
  void post_header(Call& call);
  static constexpr int64_t kPrepostCalls = 1;
  std::deque<std::shared_ptr<Call>> preposted_;  // guarded by mu_: calls next_seq_, next_seq_ + 1, ...
  // On the worker, before the call's data moves: wait for every peer's header (within the
  // call's timeout) and raise "ranks disagree (...)" naming the fields that differ.
  void check_call(Call& call);
  void worker_loop();
  void stop_worker();
  c10::intrusive_ptr<c10d::Backend> inner_for(const at::Tensor& t) const;
  c10::intrusive_ptr<c10d::Backend> inner_for_device(c10::DeviceType type) const;
  // Enqueue a pass-through collective: issue() runs on the worker and returns the inner Work.
  c10::intrusive_ptr<c10d::Work> passthrough(c10d::OpType op, const CallSpec& spec,
                                             std::vector<at::Tensor> outputs, c10::DeviceType device,
                                             std::function<c10::intrusive_ptr<c10d::Work>()> issue);
  // On the worker: the quantized all-reduce of one tensor (in place).
  void quantized_allreduce(const c10::intrusive_ptr<c10d::Backend>& inner, at::Tensor t,
                           bool average, uint64_t call_id, const Call& call);
  void count_passthrough(const char* reason, int64_t bytes, bool log);
  // A pass-through collective other than all-reduce: what this rank sends and receives under
  // the inner backend's algorithm (ring all-gather, binomial-tree broadcast, pairwise
  // all-to-all; see count_op's callers), added to the byte counters.
  void count_op(const char* op, int64_t sent, int64_t received);
  // A ring-shaped op (all-gather, gloo's all-reduce-based reduce-scatter): as many bytes in as out.
  void count_ring_share(const char* op, int64_t bytes);
  // Why an all-reduce of t with op cannot be compressed (nullptr: it can).
  const char* passthrough_reason(const at::Tensor& t, c10d::ReduceOp op) const;

  // Complete `work` with `e`; an error also puts the group in the failed state.
  void finish(const c10::intrusive_ptr<LocalSGDWork>& work, std::exception_ptr e);
  void check_healthy(const char* what) const;
  void check_user_tag(const char* what, int tag) const;

  std::shared_ptr<GroupState> state_ = std::make_shared<GroupState>();
  c10::intrusive_ptr<c10d::Backend> cpu_inner_;
  c10::intrusive_ptr<c10d::Backend> cuda_inner_;
  Format format_;
  int64_t block_;
  int64_t threshold_;
  int64_t seed_;
  std::chrono::milliseconds timeout_;  // guarded by mu_ (setTimeout)
  bool check_calls_;
  uint64_t next_seq_ = 0;              // guarded by mu_

  mutable std::mutex stats_mu_;
  // Scratch of the quantized all-reduce for CPU tensors, grown on demand and reused. Only the
  // worker thread touches it, and it runs one all-reduce at a time. A fresh multi-MB buffer is
  // mmapped and page-faulted on every call: measured at 16M elements, dequantizing into a fresh
  // buffer took 46 ms against 4.4 ms into a reused one, more than the kernels themselves.
  at::Tensor cpu_workspace_;
  at::Tensor scratch(int64_t nbytes, const at::TensorOptions& opts);
  // Pinned host mirror of a CUDA workspace (CUDA tensors over gloo), grown on demand; worker only.
  at::Tensor pinned_workspace_;
  at::Tensor pinned_scratch(int64_t nbytes);
  BackendStats stats_;
  uint32_t logged_reasons_ = 0;
  uint64_t next_call_id_ = 0;   // stochastic-rounding stream of all_reduce; only the worker touches it
  uint64_t next_tag_call_ = 0;  // numbers the pipelined calls for their message tags; worker only

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  bool stopped_ = false;
  std::thread worker_;
};

}  // namespace localsgd
