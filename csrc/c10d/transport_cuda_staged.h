// CUDA tensors over gloo: the CUDA kernels on the backend's stream (CudaOps) and messages staged
// through a pinned host mirror of the workspace (StagedTransport).
#pragma once

#ifdef LOCALSGD_WITH_CUDA
#include <map>
#include <utility>
#include <vector>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "localsgd/kernels_cuda.h"
#include "transport_gloo.h"

namespace localsgd {

inline void check_launch(const char* what) {
  const char* err = cuda::last_error();
  TORCH_CHECK(err[0] == '\0', "localsgd: CUDA ", what, " failed: ", err);
}

struct CudaOps final : DeviceOps {
  explicit CudaOps(cudaStream_t s) : stream(s) {}
  void zero(uint8_t* dst, int64_t len) override { C10_CUDA_CHECK(cudaMemsetAsync(dst, 0, len, stream)); }
  void copy(void* dst, const void* src, int64_t len) override {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, len, cudaMemcpyDeviceToDevice, stream));
  }
  void quantize(Format f, DType dt, const void* x, int64_t n, int64_t block, const RoundingMode& rm, uint8_t* payload,
                float* scales) override {
    cuda::quantize(f, dt, x, n, block, rm, payload, scales, stream);
    check_launch("quantize");
  }
  void dequantize(Format f, const uint8_t* payload, const float* scales, int64_t n, int64_t block, DType dt,
                  void* out) override {
    cuda::dequantize(f, payload, scales, n, block, dt, out, stream);
    check_launch("dequantize");
  }
  void reduce(Format f, int64_t p, const uint8_t* in, int64_t stride, const float* in_scales, int64_t scales_stride,
              int64_t n, int64_t block, float factor, const RoundingMode& rm, uint8_t* out,
              float* out_scales) override {
    cuda::dequantize_reduce(f, p, in, stride, in_scales, scales_stride, n, block, factor, rm, nullptr, out, out_scales,
                            stream);
    check_launch("dequantize_reduce");
  }
  cudaStream_t stream;
};

// CUDA tensors over gloo: messages stage through a pinned host mirror of the workspace. The
// sends of a piece are copied device -> host on the backend stream and posted once those copies
// are done; a receive is copied host -> device on the stream when it arrives, ordered before the
// kernels that read it. The host waits this needs (one per piece and phase, inherent to a host
// transport, and one at the end so that the host mirror is free for the next call) wait for an
// event recorded on the backend stream right after the copies (cudaEventSynchronize): they block
// the worker thread until the backend stream gets there, never the caller's stream, and never
// behind work queued after the copies (the stream is the backend's own: "Streams" in
// worker.cpp). The backend stream itself only waits for the caller's work that preceded the
// call (the event recorded at enqueue).
class StagedTransport final : public P2PTransport {
 public:
  StagedTransport(c10::intrusive_ptr<c10d::Backend> inner, at::Tensor host, uint8_t* device, cudaStream_t stream,
                  GroupState* state, const Call& call, uint64_t call_id)
      : P2PTransport(std::move(inner), std::move(host), state, call, call_id), device_(device), stream_(stream) {
    // on the stream's device (the call's guard made it current)
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming));
  }
  ~StagedTransport() override {
    // An error mid-call: copies may still be queued; the host mirror must not be reused (nor
    // freed) before they are done. Never throws.
    C10_CUDA_CHECK_WARN(cudaEventRecord(copied_, stream_));
    C10_CUDA_CHECK_WARN(cudaEventSynchronize(copied_));
    C10_CUDA_CHECK_WARN(cudaEventDestroy(copied_));
  }
  StagedTransport(const StagedTransport&) = delete;
  StagedTransport& operator=(const StagedTransport&) = delete;
  void send(int phase, int64_t j, int m, int64_t peer, int64_t off, int64_t len) override {
    C10_CUDA_CHECK(cudaMemcpyAsync(host_.data_ptr<uint8_t>() + off, device_ + off, len, cudaMemcpyDeviceToHost,
                                   stream_));
    pending_.push_back({phase, j, m, peer, off, len});
  }
  void flush(int, int64_t) override {
    if (pending_.empty()) return;
    reached();
    for (const auto& s : pending_) post_send(s.phase, s.j, s.m, s.peer, s.off, s.len);
    pending_.clear();
  }
  void recv(int phase, int64_t j, int m, int64_t peer, int64_t off, int64_t len) override {
    P2PTransport::recv(phase, j, m, peer, off, len);
    spans_[key(phase, j, m, peer)] = {off, len};
  }
  void wait_recv(int phase, int64_t j, int m, int64_t peer) override {
    P2PTransport::wait_recv(phase, j, m, peer);
    const auto [off, len] = spans_.at(key(phase, j, m, peer));
    C10_CUDA_CHECK(cudaMemcpyAsync(device_ + off, host_.data_ptr<uint8_t>() + off, len, cudaMemcpyHostToDevice,
                                   stream_));
  }
  void wait_all() override {
    flush(0, 0);
    P2PTransport::wait_all();
    reached();  // the host -> device copies have read the host mirror
  }

 private:
  // Blocks this (the worker's) thread until the backend stream has done everything queued on it
  // so far by this call.
  void reached() {
    C10_CUDA_CHECK(cudaEventRecord(copied_, stream_));
    C10_CUDA_CHECK(cudaEventSynchronize(copied_));
  }
  struct Pending {
    int phase;
    int64_t j;
    int m;
    int64_t peer, off, len;
  };
  uint8_t* device_;
  cudaStream_t stream_;
  cudaEvent_t copied_ = nullptr;
  std::vector<Pending> pending_;
  std::map<uint64_t, std::pair<int64_t, int64_t>> spans_;
};


}  // namespace localsgd
#endif
