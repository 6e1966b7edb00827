// The Work the backend returns (LocalSGDWork) and the state its callbacks share with the backend
// (GroupState: the group's first error, the inner messages in flight, the outstanding Works).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/Work.hpp>

namespace localsgd {

// A Work whose completion is driven by the backend's worker thread (or an inner future's
// callback): complete() runs there, never inside wait(), so that work.get_future().wait() and
// work.wait() both return (completing inside wait() deadlocks get_future().wait()).
struct GroupState;

class LocalSGDWork : public c10d::Work {
 public:
  // state: counts the Work as outstanding until it completes (exit_shutdown waits for that)
  LocalSGDWork(c10d::OpType op, std::vector<at::Tensor> outputs,
               std::vector<c10::Device> devices, std::shared_ptr<GroupState> state = nullptr);
  void complete(std::exception_ptr eptr);
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }
  // Status reads the future (completed first), wait() the base flag (set right after): so
  // after get_future().wait() the Work reads completed, and after wait() the future is done.
  bool isCompleted() override { return future_->completed(); }
  bool isSuccess() const override { return future_->completed() && !future_->hasError(); }
  std::exception_ptr exception() const override {
    return future_->completed() && future_->hasError() ? future_->exception_ptr() : nullptr;
  }
  std::vector<at::Tensor> result() override { return outputs_; }
  // Blocks the calling thread until the worker is done with the call (and raises its error).
  // CUDA: then makes the waiting thread's current stream wait for the work's completion event
  // (recorded on the backend stream when the future completed), so a wait from another stream
  // is ordered too; no stream is synchronized with the host. synchronize(): that stream wait
  // alone (as ProcessGroupNCCL's), once the work is complete.
  bool wait(std::chrono::milliseconds timeout) override;
  void synchronize() override;

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  std::shared_ptr<GroupState> state_;
};

// State shared by a backend and the callbacks of its in-flight works: the group's first error
// (after it every collective fails at once) and the point-to-point works of the collective in
// flight (abort() aborts them). Held by shared_ptr so that a callback never outlives it.
struct GroupState {
  std::mutex mu;
  std::string first_error;  // empty while the group is healthy
  bool aborted = false;
  // Inner point-to-point works posted and not yet finished (call headers of queued calls, the
  // messages of the call in flight): abort() aborts them. Keyed by a registration number.
  std::map<uint64_t, c10::intrusive_ptr<c10d::Work>> inflight;
  uint64_t next_inflight = 0;
  int64_t outstanding = 0;  // Works created and not yet completed
  std::condition_variable idle;  // notified when outstanding drops to 0
  // Record the first failure (later ones are consequences of it).
  void fail(const std::string& what);
  void fail(std::exception_ptr e);
  std::string error() {
    std::lock_guard<std::mutex> lk(mu);
    return first_error;
  }
};

}  // namespace localsgd
