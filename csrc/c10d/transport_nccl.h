// CUDA tensors over NCCL: each phase one collective on NCCL's stream (CollectiveTransport).
#pragma once

#ifdef LOCALSGD_WITH_CUDA
#include <algorithm>
#include <chrono>
#include <vector>

#include "pipeline.h"

namespace localsgd {

// CUDA tensors over NCCL: each phase is one collective on NCCL's stream, ordered after the
// current stream, the backend's (NCCL's own discipline), which then waits for it by a stream
// wait (the inner Work's wait()), never a host sync:
// phase A an all-to-all of the p records, phase B an all-gather of our reduced record.
class CollectiveTransport final : public Transport {
 public:
  CollectiveTransport(c10::intrusive_ptr<c10d::Backend> inner, at::Tensor ws, int64_t p, int64_t R, const Call& call)
      : inner_(std::move(inner)), ws_(std::move(ws)), p_(p), R_(R), call_(call) {}
  bool pipelined() const override { return false; }
  bool own_record_in_send_area() const override { return true; }
  void recv(int, int64_t, int, int64_t, int64_t, int64_t) override {}
  void send(int, int64_t, int, int64_t, int64_t, int64_t) override {}
  void flush(int phase, int64_t) override {
    if (p_ == 1) return;
    const auto left = std::max<std::chrono::milliseconds>(
        std::chrono::milliseconds(1),
        std::chrono::duration_cast<std::chrono::milliseconds>(call_.deadline - std::chrono::steady_clock::now()));
    if (phase == 0) {
      at::Tensor send = ws_.narrow(0, 0, p_ * R_), recv = ws_.narrow(0, p_ * R_, p_ * R_);
      std::vector<int64_t> splits;  // equal split
      c10d::AllToAllOptions o;
      o.timeout = left;
      inner_->alltoall_base(recv, send, splits, splits, o)->wait();
    } else {
      at::Tensor mine = ws_.narrow(0, 2 * p_ * R_, R_), gathered = ws_.narrow(0, 2 * p_ * R_ + R_, p_ * R_);
      c10d::AllgatherOptions o;
      o.timeout = left;
      inner_->_allgather_base(gathered, mine, o)->wait();
    }
  }
  void wait_recv(int, int64_t, int, int64_t) override {}
  void wait_all() override {}

 private:
  c10::intrusive_ptr<c10d::Backend> inner_;
  at::Tensor ws_;
  int64_t p_, R_;
  const Call& call_;
};

}  // namespace localsgd
#endif
