// CPU tensors over gloo: the host kernels (CpuOps) and point-to-point messages from host memory
// (P2PTransport; the staged CUDA transport builds on it).
#pragma once

#include <cstring>
#include <map>
#include <vector>

#include "localsgd/kernels.h"
#include "pipeline.h"
#include "posted_works.h"
#include "tags.h"

namespace localsgd {

struct CpuOps final : DeviceOps {
  void zero(uint8_t* dst, int64_t len) override { std::memset(dst, 0, len); }
  void copy(void* dst, const void* src, int64_t len) override { std::memcpy(dst, src, len); }
  void quantize(Format f, DType dt, const void* x, int64_t n, int64_t block, const RoundingMode& rm, uint8_t* payload,
                float* scales) override {
    cpu::quantize(f, dt, x, n, block, rm, payload, scales);
  }
  void dequantize(Format f, const uint8_t* payload, const float* scales, int64_t n, int64_t block, DType dt,
                  void* out) override {
    cpu::dequantize(f, payload, scales, n, block, dt, out);
  }
  void reduce(Format f, int64_t p, const uint8_t* in, int64_t stride, const float* in_scales, int64_t scales_stride,
              int64_t n, int64_t block, float factor, const RoundingMode& rm, uint8_t* out,
              float* out_scales) override {
    cpu::dequantize_reduce(f, p, in, stride, in_scales, scales_stride, n, block, factor, rm, nullptr, out, out_scales);
  }
};

// gloo point-to-point messages from host memory (CPU tensors), each receive posted up front.
class P2PTransport : public Transport {
 public:
  P2PTransport(c10::intrusive_ptr<c10d::Backend> inner, at::Tensor host, GroupState* state, const Call& call,
               uint64_t call_id)
      : inner_(std::move(inner)), host_(std::move(host)), works_(state, call), call_id_(call_id) {}
  void recv(int phase, int64_t j, int m, int64_t peer, int64_t off, int64_t len) override {
    std::vector<at::Tensor> t{host_.narrow(0, off, len)};
    recvs_[key(phase, j, m, peer)] =
        works_.add(inner_->recv(t, static_cast<int>(peer), phase_tag(phase, call_id_, j, m)), peer, false);
  }
  void send(int phase, int64_t j, int m, int64_t peer, int64_t off, int64_t len) override { post_send(phase, j, m, peer, off, len); }
  void wait_recv(int phase, int64_t j, int m, int64_t peer) override { works_.wait(recvs_.at(key(phase, j, m, peer))); }
  void wait_all() override { works_.wait_all(); }

 protected:
  void post_send(int phase, int64_t j, int m, int64_t peer, int64_t off, int64_t len) {
    std::vector<at::Tensor> t{host_.narrow(0, off, len)};
    works_.add(inner_->send(t, static_cast<int>(peer), phase_tag(phase, call_id_, j, m)), peer, true);
  }
  static uint64_t key(int phase, int64_t j, int m, int64_t peer) {
    return (((static_cast<uint64_t>(peer) << 20) | static_cast<uint64_t>(j)) << 2) | (phase << 1) | m;
  }
  c10::intrusive_ptr<c10d::Backend> inner_;
  at::Tensor host_;
  PostedWorks works_;
  uint64_t call_id_;
  std::map<uint64_t, size_t> recvs_;
};

}  // namespace localsgd
