// The backend's lifecycle: construction, the inner group for a device, timeouts and counters,
// statistics, failure (finish, check_healthy), shutdown, abort and interpreter exit.
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#include <c10/util/Exception.h>
#include <torch/extension.h>

#include "localsgd_backend.h"
#include "inner_collective.h"
#include "posted_works.h"

namespace localsgd {
namespace {
// Drops the inner groups. After abort() with an inner collective still running (a pass-through
// whose peer stopped without closing its connections), destroying a gloo group would join its
// threads, which wait inside the collective until gloo's own timeout: the inner groups are then
// left to the end of the process instead (their threads and connections are not reclaimed).
void drop_inner(GroupState& state, c10::intrusive_ptr<c10d::Backend>& cpu, c10::intrusive_ptr<c10d::Backend>& cuda) {
  int64_t running = 0;
  {
    std::lock_guard<std::mutex> lk(state.mu);
    if (state.aborted) {
      for (auto& [id, w] : state.inflight) running += dynamic_cast<InnerCollective*>(w.get()) != nullptr;
    }
  }
  if (running > 0) {
    TORCH_WARN("localsgd: ", running, " collective(s) of an aborted process group still wait inside its inner group "
               "(gloo cannot abort a collective; it ends at gloo's timeout): the inner group is left to the end of "
               "the process instead of being destroyed");
    (void)cpu.release();  // owning pointers, never freed: leaked on purpose
    (void)cuda.release();
    return;
  }
  cpu.reset();
  cuda.reset();
}
}  // namespace

// ---- Backend ------------------------------------------------------------------------------------
LocalSGDBackend::LocalSGDBackend(int rank, int size, c10::intrusive_ptr<c10d::Backend> cpu_inner,
                                 c10::intrusive_ptr<c10d::Backend> cuda_inner, int format, int64_t block_size,
                                 int64_t threshold_bytes, int64_t seed, int64_t timeout_ms, bool check_calls)
    : c10d::Backend(rank, size),
      cpu_inner_(std::move(cpu_inner)),
      cuda_inner_(std::move(cuda_inner)),
      format_(static_cast<Format>(format)),
      block_(block_size),
      threshold_(threshold_bytes),
      seed_(seed),
      timeout_(timeout_ms),
      check_calls_(check_calls) {
  TORCH_CHECK(cpu_inner_, "localsgd: expected an inner backend for CPU tensors, got None");
  TORCH_CHECK(format >= 0 && format <= 3, "localsgd: expected format code 0..3 (none/int8/int4/fp8), got ", format);
  TORCH_CHECK(valid_block_size(block_size), "localsgd: block_size must be a power of two in [", kMinBlockSize, ", ",
              kMaxBlockSize, "], got ", block_size);
  TORCH_CHECK(threshold_bytes >= 0, "localsgd: threshold_bytes must be >= 0, got ", threshold_bytes);
  TORCH_CHECK(timeout_ms > 0, "localsgd: timeout must be > 0 ms, got ", timeout_ms);
  worker_ = std::thread([this] { worker_loop(); });
}

void LocalSGDBackend::stop_worker() {
  std::deque<Task> dropped;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopped_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) {
    if (worker_.get_id() == std::this_thread::get_id()) {
      worker_.detach();  // last reference dropped from a callback on the worker itself
    } else {
      worker_.join();
    }
  }
  std::deque<std::shared_ptr<Call>> preposted;
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopped_ = true;
    preposted.swap(preposted_);
  }
  preposted.clear();  // aborts their header receives, before the inner groups go
}

void LocalSGDBackend::shutdown() {
  // Joining the worker can wait for an in-flight collective, whose gloo threads (or a DDP hook
  // run from our callbacks) may need the GIL: never hold it here.
  if (Py_IsInitialized() && PyGILState_Check()) {
    pybind11::gil_scoped_release nogil;
    stop_worker();
  } else {
    stop_worker();
  }
}

LocalSGDBackend::~LocalSGDBackend() {
  auto drop = [this] {
    stop_worker();
    drop_inner(*state_, cpu_inner_, cuda_inner_);  // ~ProcessGroupGloo joins gloo's threads
  };
  if (Py_IsInitialized() && PyGILState_Check()) {
    pybind11::gil_scoped_release nogil;
    drop();
  } else {
    drop();
  }
}

void LocalSGDBackend::finish(const c10::intrusive_ptr<LocalSGDWork>& work, std::exception_ptr e) {
  if (e) state_->fail(e);
  work->complete(e);
}

void LocalSGDBackend::check_healthy(const char* what) const {
  const std::string err = state_->error();
  TORCH_CHECK(err.empty(), "localsgd ", what, ": this process group failed earlier and accepts no more work (first "
              "error: ", err, "); destroy it (dist.destroy_process_group) and create a new one");
}

void LocalSGDBackend::abort() {
  state_->fail(std::string("the process group was aborted (abort() was called)"));
  std::vector<c10::intrusive_ptr<c10d::Work>> inflight;
  {
    std::lock_guard<std::mutex> lk(state_->mu);
    state_->aborted = true;
    for (auto& [id, w] : state_->inflight) inflight.push_back(w);
  }
  // (inflight also holds the inner collectives in flight: InnerCollective::abort fails their Work
  // at once, and a worker waiting for one stops waiting)
  for (auto& w : inflight) {
    try {
      w->abort();
    } catch (...) {
    }
  }
  {
    // queued, never issued: the worker fails them when it wakes (stopping_); it is not joined here
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto* inner : {&cpu_inner_, &cuda_inner_}) {
    if (*inner) {
      try {
        (*inner)->abort();
      } catch (...) {
      }
    }
  }
}

void LocalSGDBackend::exit_shutdown(int64_t grace_ms) {
  bool idle;
  {
    std::unique_lock<std::mutex> lk(state_->mu);
    idle = state_->idle.wait_for(lk, std::chrono::milliseconds(grace_ms), [this] { return state_->outstanding == 0; });
  }
  if (!idle) abort();  // a peer that never comes: cut the in-flight messages, fail the rest
  state_->fail(std::string("the process is exiting (the group was shut down at interpreter exit)"));
  stop_worker();
  // gloo's own threads drop their last references to finished Works (and their tensors, whose
  // Python objects need the GIL) some time after completing them: join them now, while the
  // interpreter is whole, by dropping the inner groups (measured: a job exiting without
  // destroy_process_group aborted in ~1 of 3 runs in ~AsyncBarrierWork on gloo's thread).
  // Later calls fail at the failed-state check before any inner group is touched.
  drop_inner(*state_, cpu_inner_, cuda_inner_);
}

uint64_t LocalSGDBackend::getSequenceNumberForGroup() {
  std::lock_guard<std::mutex> lk(mu_);
  return next_seq_;
}

void LocalSGDBackend::set_counters_for_test(uint64_t seq, uint64_t tag_call) {
  std::lock_guard<std::mutex> lk(mu_);
  TORCH_CHECK(next_seq_ == 0 && preposted_.empty() && queue_.empty(),
              "localsgd: the counters can only be set before the group's first collective (", next_seq_,
              " made so far)");
  next_seq_ = seq;
  next_tag_call_ = tag_call;  // the worker reads it only for a task queued after this, under mu_
}

void LocalSGDBackend::setTimeout(std::chrono::milliseconds timeout) {
  TORCH_CHECK(timeout.count() > 0, "localsgd: timeout must be > 0 ms, got ", timeout.count());
  {
    std::lock_guard<std::mutex> lk(mu_);
    timeout_ = timeout;
  }
  // the pass-through collectives run under the inner groups' own timeouts
  for (auto* inner : {&cpu_inner_, &cuda_inner_}) {
    if (*inner) (*inner)->setTimeout(timeout);
  }
}

c10::intrusive_ptr<c10d::Backend> LocalSGDBackend::inner_for_device(c10::DeviceType type) const {
  check_healthy("collective");  // also: after exit_shutdown the inner groups are gone
  if (type == c10::DeviceType::CPU) return cpu_inner_;
  TORCH_CHECK(type == c10::DeviceType::CUDA, "localsgd: expected CPU or CUDA tensors, got device type ", type);
  TORCH_CHECK(cuda_inner_, "localsgd: got a CUDA tensor but this group has no CUDA inner backend "
              "(CUDA was not available when the group was created)");
  return cuda_inner_;
}

c10::intrusive_ptr<c10d::Backend> LocalSGDBackend::inner_for(const at::Tensor& t) const {
  return inner_for_device(t.device().type());
}

BackendStats LocalSGDBackend::stats() const {
  std::lock_guard<std::mutex> lk(stats_mu_);
  return stats_;
}

void LocalSGDBackend::reset_stats() {
  std::lock_guard<std::mutex> lk(stats_mu_);
  stats_ = BackendStats();
}

}  // namespace localsgd
