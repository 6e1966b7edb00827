// LocalSGDWork (completed by the worker or an inner future's callback, never inside wait()) and
// GroupState's record of the first failure.
#include "work.h"

#include <c10/util/Exception.h>

namespace localsgd {

// ---- Work ---------------------------------------------------------------------------------------
LocalSGDWork::LocalSGDWork(c10d::OpType op, std::vector<at::Tensor> outputs, std::vector<c10::Device> devices,
                           std::shared_ptr<GroupState> state)
    : c10d::Work(-1, op),
      outputs_(std::move(outputs)),
      future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()),
                                                       std::move(devices))),
      state_(std::move(state)) {
  if (state_) {
    std::lock_guard<std::mutex> lk(state_->mu);
    ++state_->outstanding;
  }
}

void LocalSGDWork::complete(std::exception_ptr eptr) {
  // Future first, then wake wait(): once wait() returns, get_future().done() must be true
  // (the other order was a measured race in test_async_*). Same order as gloo's AsyncWork.
  if (eptr) {
    future_->setError(eptr);
  } else {
    future_->markCompleted(c10::IValue(outputs_));
  }
  finish(eptr);
  if (state_) {
    std::lock_guard<std::mutex> lk(state_->mu);
    if (--state_->outstanding == 0) state_->idle.notify_all();
  }
}

bool LocalSGDWork::wait(std::chrono::milliseconds timeout) {
  const bool ok = c10d::Work::wait(timeout);  // the worker completed it; raises its error
  synchronize();
  return ok;
}

void LocalSGDWork::synchronize() {
  // The future was completed on the worker under the backend stream: it recorded its events
  // there. Waiting on it makes the *current* stream of the thread that waits (which may be
  // another stream than the one the call was made on) wait for those events; no host sync.
  if (!future_->devices().empty() && future_->completed()) future_->wait();
}

void GroupState::fail(const std::string& what) {
  std::lock_guard<std::mutex> lk(mu);
  if (first_error.empty()) first_error = what.empty() ? std::string("unknown error") : what;
}

void GroupState::fail(std::exception_ptr e) {
  std::string what = "unknown error";
  try {
    std::rethrow_exception(e);
  } catch (const c10::Error& err) {
    what = err.what_without_backtrace();
  } catch (const std::exception& err) {
    what = err.what();
  } catch (...) {
  }
  fail(what);
}

}  // namespace localsgd
