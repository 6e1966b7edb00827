// An inner collective in flight (a pass-through issued to gloo or NCCL), registered in
// GroupState::inflight next to the point-to-point messages, where abort() finds it. gloo cannot
// abort a collective: a peer that stopped without closing its connections (a hung host, a
// partition) keeps it waiting until gloo's own timeout, 30 min by default. abort() does not wait
// for that: the entry's abort() fails the Work that waits for the collective at once, and ends the
// worker's wait when the worker waits for it. The collective itself goes on inside the inner group;
// an aborted group with one still running is not destroyed (see LocalSGDBackend's teardown).
#pragma once

#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>

#include <ATen/ATen.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "work.h"

namespace localsgd {

class InnerCollective : public c10d::Work {
 public:
  InnerCollective(std::shared_ptr<GroupState> state, c10::intrusive_ptr<c10d::Work> inner,
                  c10::intrusive_ptr<LocalSGDWork> work)
      : state_(std::move(state)), inner_(std::move(inner)), work_(std::move(work)) {}

  // Registers the inner work `inner` (it must have a future) until it ends. `work`: completed when
  // it ends, with its error, or at abort(), whichever comes first (null: none, the worker waits).
  static c10::intrusive_ptr<InnerCollective> track(const std::shared_ptr<GroupState>& state,
                                                   const c10::intrusive_ptr<c10d::Work>& inner,
                                                   c10::intrusive_ptr<LocalSGDWork> work) {
    auto fut = inner->getFuture();
    auto t = c10::make_intrusive<InnerCollective>(state, inner, std::move(work));
    bool aborted = false;
    {
      std::lock_guard<std::mutex> lk(state->mu);
      t->id_ = state->next_inflight++;
      state->inflight.emplace(t->id_, t);
      aborted = state->aborted;
    }
    if (aborted) t->abort();
    fut->addCallback([t](c10::ivalue::Future& f) { t->ended(f.hasError() ? f.exception_ptr() : nullptr); });
    return t;
  }

  // abort() (LocalSGDBackend::abort, for every entry of GroupState::inflight): the Work fails now
  // and a worker waiting in wait_done() raises.
  void abort() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      aborted_ = true;
    }
    cv_.notify_all();
    complete(std::make_exception_ptr(std::runtime_error(
        "localsgd: the process group was aborted (abort() was called) before this collective finished")));
  }

  // On the worker: until the inner collective ends (then its error, if any, is raised) or abort().
  void wait_done() {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return ended_ || aborted_; });
      TORCH_CHECK(ended_, "localsgd: the process group was aborted (abort() was called) while this collective "
                  "waited for the inner group");
    }
    inner_->wait();  // ended: raises the inner error; for CUDA, orders the current stream after it
  }

 private:
  // The inner collective's future completed (gloo's thread, or inline when it already had).
  void ended(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      ended_ = true;
    }
    cv_.notify_all();
    if (e && work_) state_->fail(e);
    complete(e);
    std::lock_guard<std::mutex> lk(state_->mu);
    state_->inflight.erase(id_);
  }
  // The first of the collective's end and abort() completes the Work; the other does nothing.
  void complete(std::exception_ptr e) {
    if (work_ && !completed_.exchange(true)) work_->complete(e);
  }

  std::shared_ptr<GroupState> state_;
  c10::intrusive_ptr<c10d::Work> inner_;
  c10::intrusive_ptr<LocalSGDWork> work_;
  uint64_t id_ = 0;
  std::atomic<bool> completed_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  bool ended_ = false;
  bool aborted_ = false;
};

// CUDA tensors of a pass-through collective: recorded with the caching allocator as used on the
// worker's current stream, the backend stream ("Streams" in worker.cpp). The worker drops its
// references only after the backend stream was made to wait for the inner collective, so memory
// the caller frees meanwhile is not reused before the collective is done, whatever the inner
// backend does for allocator safety (NCCL with TORCH_NCCL_AVOID_RECORD_STREAMS=1 keeps its
// references only until the worker's wait). CPU tensors and non-tensor arguments: nothing.
inline void record_on_current_stream(const at::Tensor& t) {
  if (t.defined() && t.is_cuda()) {
    t.record_stream(c10::impl::VirtualGuardImpl(t.device().type()).getStream(t.device()));
  }
}
inline void record_on_current_stream(const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts) record_on_current_stream(t);
}
inline void record_on_current_stream(const std::vector<std::vector<at::Tensor>>& tss) {
  for (const auto& ts : tss) record_on_current_stream(ts);
}
template <typename T>
inline void record_on_current_stream(const T&) {}
// On the worker: wait for an inner collective that must end before the next call is issued;
// abort() ends the wait with an error (the collective itself goes on inside the inner group).
inline void wait_inner(const std::shared_ptr<GroupState>& state, const c10::intrusive_ptr<c10d::Work>& inner) {
  c10::intrusive_ptr<c10::ivalue::Future> fut;
  try {
    fut = inner->getFuture();
  } catch (const std::exception&) {
    fut.reset();
  }
  if (!fut) {
    inner->wait();  // an inner Work without a future: a plain wait
    return;
  }
  InnerCollective::track(state, inner, nullptr)->wait_done();
}

}  // namespace localsgd
