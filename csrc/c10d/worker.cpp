// The FIFO worker: every collective of the group is queued (enqueue) and issued in program order
// by one thread (worker_loop).
//
//
// Ordering (the hazard this file is built around)
// -----------------------------------------------
// gloo matches the messages of a collective by a tag taken from a per-group counter when the
// collective is *enqueued*. The quantized all-reduce issues three collectives (metadata
// all-gather, all-to-all, all-gather) and the later ones can only be issued once the earlier
// ones finished (data dependency). If those were issued from a callback or another thread while
// the user's thread issued pass-through collectives directly, rank 0 could enqueue
// [all-to-all, broadcast, all-gather] and rank 1 [all-to-all, all-gather, broadcast]: the tags
// then pair a broadcast with an all-gather -> mismatched sizes, garbage or a hang.
// Design chosen: ONE FIFO worker thread per backend issues every collective of the group,
// pass-through included, in program order; the quantized all-reduce runs on that thread to its
// end (waiting for each phase) before the next queued collective is issued. Program order is
// the same on every rank (the c10d contract), so the inner tags line up on every rank. The
// alternative (a second inner group for phase 2 with its own strictly ordered issuer) still
// needs an ordered issuer and doubles the connections; the worker is simpler and costs one
// thread hand-off per collective. Pass-through collectives are only *issued* on the worker; their
// completion comes from the inner future's callback, so they still overlap with later work.
// send/recv bypass the queue: gloo matches them by the user's tag, not the collective counter,
// and queueing them behind a blocking all-reduce could deadlock send/recv pairs that plain gloo
// allows.
//
// Streams (CUDA tensors)
// -----------------------
// A CUDA call runs on a stream of the backend's own, one per device (a high-priority stream of
// c10's pool, taken the first time the device is used: backend_stream()), never on the caller's:
//   - enqueue (the caller's thread) records an event on the caller's current stream of the
//     tensor's device (`Call::ready`): it covers the work that produced the tensor;
//   - the worker makes the backend stream wait for that event (cudaStreamWaitEvent: no host
//     sync) and runs the call under a guard of the backend stream: the kernels and copies of the
//     compressed all-reduce, the inner collectives (NCCL orders its own stream after the current
//     one, i.e. the backend stream; gloo's CUDA path copies on streams ordered after it);
//   - the tensors the call's kernels touch are recorded with the caching allocator as used on
//     the backend stream (record_stream), so memory the caller frees meanwhile is not handed to
//     another allocation before those kernels are done (pass-through collectives: their
//     tensors too, as the backend stream waits for the inner collective before the worker
//     drops them); workspaces are allocated on the backend stream itself;
//   - the Work's future is completed on the worker with the backend stream current, so it
//     records its completion event there; wait()/synchronize() and the future's wait() make the
//     *waiting* thread's current stream wait for that event (no host sync of any stream).
// The host waits that the staged transport (CUDA tensors over gloo) cannot avoid (a piece's
// device-to-host copy must be done before gloo sends it) wait for events on the backend stream
// and so block only the worker, never behind the caller's next forward/backward: the collective
// overlaps the caller's compute. Every CUDA call of the group, compressed or passed through, is
// queued on the one backend stream of its device in program order (the worker's order), so
// device-side they never reorder with each other either. CPU calls take none of these steps.
//
// Deadlocks documented in docs/platform.md: Works are completed from the worker / inner callbacks,
// never from wait(); the destructor and shutdown() release the GIL before joining the worker and
// dropping the gloo backends (gloo's threads may need the GIL while the main thread joins them).
#include <chrono>
#include <deque>
#include <mutex>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/StreamGuard.h>
#include <c10/util/Exception.h>

#include "localsgd_backend.h"
#include "posted_works.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef LOCALSGD_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace localsgd {

void LocalSGDBackend::enqueue(const CallSpec& spec, const c10::Device& device, TaskFn fn) {
  check_healthy(spec.what);  // a failed group: the call raises at once with the first error
  // CUDA: the event is recorded here, on the caller's thread and on the tensor's device (the
  // worker thread's own current stream is the default stream of device 0, wrong for a tensor on
  // another device and unordered with the caller's work); see "Streams" above.
  std::optional<c10::Stream> stream;
  std::optional<c10::Event> ready;
#ifdef LOCALSGD_WITH_CUDA
  if (device.is_cuda()) {
    const c10::Stream caller = c10::cuda::getCurrentCUDAStream(device.index());
    stream = backend_stream(caller.device_index());
    ready.emplace(c10::DeviceType::CUDA);
    ready->record(caller);
  }
#endif
  {
    std::lock_guard<std::mutex> lk(mu_);
    TORCH_CHECK(!stopping_, "localsgd ", spec.what, ": the process group was shut down; no new collectives can be "
                "issued");
    try {
      std::shared_ptr<Call> call;
      if (!preposted_.empty() && preposted_.front()->seq == next_seq_) {
        call = std::move(preposted_.front());
        preposted_.pop_front();
      } else {
        call = new_call(next_seq_);
      }
      call->spec = spec;
      call->stream = stream;
      call->ready = std::move(ready);
      call->timeout = spec.timeout.count() > 0 ? spec.timeout : timeout_;
      post_header(*call);
      ++next_seq_;
      queue_.push_back({std::move(call), std::move(fn)});
      // The header receives of the next calls are posted ahead, in batches: gloo moves a message
      // at once when its receive is already posted (else it needs a notification round trip),
      // and a batch of receive notifications wakes the peer once, not once per call.
      if (check_calls_ && getSize() > 1) {
        while (static_cast<int64_t>(preposted_.size()) < kPrepostCalls) {
          preposted_.push_back(new_call(next_seq_ + preposted_.size()));
        }
      }
    } catch (...) {
      state_->fail(std::current_exception());  // peers may hold our earlier headers: the group is unusable
      throw;
    }
  }
  cv_.notify_one();
}

#ifdef LOCALSGD_WITH_CUDA
c10::Stream LocalSGDBackend::backend_stream(c10::DeviceIndex index) {
  std::lock_guard<std::mutex> lk(streams_mu_);
  auto it = streams_.find(index);
  if (it == streams_.end()) {
    // High priority: the collective's short kernels are scheduled ahead of the caller's compute
    // kernels as SMs free up, so the link is fed while the model computes. The pool hands its
    // streams out round-robin (32 per device and priority), so another user of the pool (a
    // torch.cuda.Stream(priority=-1), gloo's CUDA copies) may get the same stream: correct
    // (one stream orders everything on it), only less overlapped with that user's work.
    it = streams_.emplace(index, c10::Stream(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, index))).first;
  }
  return it->second;
}
#else
c10::Stream LocalSGDBackend::backend_stream(c10::DeviceIndex) {
  TORCH_CHECK(false, "localsgd: this build has no CUDA support (no backend stream)");
}
#endif

void LocalSGDBackend::worker_loop() {
  // Grad mode is thread-local and on by default in a fresh thread: the in-place writes done here
  // (t.copy_ of a non-contiguous tensor, the AVG division of a pass-through) would then raise
  // "a leaf Variable that requires grad is being used in an in-place operation" for an
  // nn.Parameter. Collectives write raw data, as gloo and NCCL do: no autograd here.
  at::NoGradGuard no_grad;
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      if (stopping_) {
        // Shut down: collectives that were queued but never issued fail (their peers may be
        // gone and each could wait a full timeout); only the in-flight one was allowed to end.
        std::deque<Task> rest;
        rest.swap(queue_);
        lk.unlock();
        auto err = std::make_exception_ptr(std::runtime_error(
            "localsgd: the process group was shut down before this collective was issued"));
        for (auto& t : rest) t.fn(err, *t.call);
        return;
      }
      task = std::move(queue_.front());
      queue_.pop_front();
    }
#ifdef _OPENMP
    // OpenMP's thread count is per thread: a fresh std::thread gets the process default
    // (all cores), not torch.set_num_threads(). Follow torch's setting, read per task so a later
    // set_num_threads() applies. Measured: without this, 2 ranks x 2 OpenMP threads on 2 cores
    // made a 256 KiB int8 all-reduce take ~42 ms instead of ~1 ms (spinning thread teams).
    {
      const int want = at::get_num_threads();
      if (want > 0 && want != omp_get_max_threads()) omp_set_num_threads(want);
    }
#endif
    // A group that failed while this call waited in the queue, or peers that disagree: the call
    // fails without moving data. Tasks catch their own exceptions and complete their Work.
    std::exception_ptr err;
    try {
      check_healthy(task.call->spec.what);
      check_call(*task.call);
    } catch (...) {
      err = std::current_exception();
      state_->fail(err);
    }
    {
      // CUDA calls run on the backend stream of the tensor's device, after the caller's work
      // that preceded the call (kernels, inner collectives issued on it, the future's events
      // recorded on it; "Streams" above); nothing for CPU calls.
      std::optional<c10::StreamGuard> guard;
      if (task.call->stream) {
        guard.emplace(*task.call->stream);
        if (task.call->ready) task.call->ready->block(*task.call->stream);
      }
      task.fn(err, *task.call);
    }
    if (task.call->header) {
      try {
        task.call->header->wait_all();  // our header's sends
      } catch (...) {
        state_->fail(std::current_exception());
      }
    }
  }
}

}  // namespace localsgd
