// PostedWorks: the inner point-to-point messages of one call (its header, or its data phases),
// each wait bounded by the call's deadline and abortable by abort().
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "call_header.h"
#include "work.h"

namespace localsgd {

// The inner point-to-point works of one call. Each is registered in `state` while it is posted
// (abort() aborts it); every wait is bounded by the call's deadline and names the peer; any
// work not waited for when this goes out of scope (an error on the way, a cancelled call) is
// aborted, best effort, so no receive is left writing into reused memory.
class PostedWorks {
 public:
  PostedWorks(GroupState* state, const Call& call) : state_(state), call_(&call) {}
  size_t add(c10::intrusive_ptr<c10d::Work> w, int64_t peer, bool send) {
    uint64_t id = 0;
    if (state_) {
      std::lock_guard<std::mutex> lk(state_->mu);
      id = state_->next_inflight++;
      state_->inflight.emplace(id, w);
      if (state_->aborted) w->abort();
    }
    works_.push_back({std::move(w), id, peer, send});
    return works_.size() - 1;
  }
  // The first failure propagates (the destructor aborts the rest): one timeout, not one per
  // message. An inner wait that returns false was aborted: its buffer holds no message.
  void wait(size_t i) {
    Entry& e = works_[i];
    if (!e.work) return;
    // Rounded up, never down: the inner wait must not end before our deadline, or a peer that
    // never comes would be reported as the inner group's error ("Timed out waiting 2999ms")
    // instead of this call's timeout, depending on how the millisecond fell (seen under load).
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(call_->deadline -
                                                                   std::chrono::steady_clock::now());
    const char* dir = e.send ? "sending to" : "receiving from";
    TORCH_CHECK(left.count() > 0, "localsgd ", call_->spec.what, " (collective #", call_->seq, "): timed out after ",
                call_->timeout.count(), " ms ", dir, " rank ", e.peer,
                " (the call's timeout; is that rank still running, and did it make the same collective?)");
    bool ok = false;
    try {
      ok = e.work->wait(std::max<std::chrono::milliseconds>(left, std::chrono::milliseconds(1)));
    } catch (const std::exception& err) {
      const bool timed_out = std::chrono::steady_clock::now() >= call_->deadline;
      TORCH_CHECK(false, "localsgd ", call_->spec.what, " (collective #", call_->seq, "): ",
                  timed_out ? "timed out " : "failed ", dir, " rank ", e.peer,
                  timed_out ? c10::str(" after ", call_->timeout.count(), " ms (the call's timeout)") : std::string(),
                  ": ", c10::GetExceptionString(err));
    }
    TORCH_CHECK(ok, "localsgd ", call_->spec.what, " (collective #", call_->seq, "): the message ", dir, " rank ",
                e.peer, " was aborted (the process group was aborted or is shutting down)");
    release(e);
  }
  void wait_all() {
    for (size_t i = 0; i < works_.size(); ++i) wait(i);
  }
  void wait_receives() {
    for (size_t i = 0; i < works_.size(); ++i) {
      if (!works_[i].send) wait(i);
    }
  }
  ~PostedWorks() {
    for (auto& e : works_) {
      if (!e.work) continue;
      try {
        e.work->abort();
      } catch (...) {
      }
      release(e);
    }
  }

 private:
  struct Entry {
    c10::intrusive_ptr<c10d::Work> work;
    uint64_t id;
    int64_t peer;
    bool send;
  };
  void release(Entry& e) {
    if (state_) {
      std::lock_guard<std::mutex> lk(state_->mu);
      state_->inflight.erase(e.id);
    }
    e.work.reset();
  }
  GroupState* state_;
  const Call* call_;
  std::vector<Entry> works_;
};

}  // namespace localsgd
