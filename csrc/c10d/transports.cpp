// Picks the kernels (make_ops) and the transport (run_pipeline) that fit a workspace's device and
// the inner backend.
#include <memory>

#include <c10/util/Exception.h>

#include "pipeline.h"
#include "transport_cuda_staged.h"
#include "transport_gloo.h"
#include "transport_nccl.h"

namespace localsgd {

std::unique_ptr<DeviceOps> make_ops(const at::Device& device) {
  if (device.is_cpu()) return std::make_unique<CpuOps>();
#ifdef LOCALSGD_WITH_CUDA
  return std::make_unique<CudaOps>(c10::cuda::getCurrentCUDAStream(device.index()).stream());
#else
  TORCH_CHECK(false, "localsgd: got a ", device, " tensor but this build has no CUDA kernels");
#endif
}

void run_pipeline(const c10::intrusive_ptr<c10d::Backend>& inner, DeviceOps& ops, int64_t p, int64_t me, Format f,
                  int64_t block, const Chunking& ch, int64_t n, const at::Tensor& ws,
                  const std::function<at::Tensor(int64_t)>& pinned, float factor, const RoundingMode& rm,
                  const ProduceFn& produce, const ConsumeFn& consume, GroupState* state, const Call& call,
                  uint64_t call_id) {
  uint8_t* base = ws.data_ptr<uint8_t>();
  if (ws.is_cpu()) {
    P2PTransport net(inner, ws, state, call, call_id);
    pipelined_allreduce(net, ops, p, me, f, block, ch, n, base, factor, rm, produce, consume);
    return;
  }
#ifdef LOCALSGD_WITH_CUDA
  if (inner->getBackendName() == "nccl") {
    CollectiveTransport net(inner, ws, p, ch.record, call);
    pipelined_allreduce(net, ops, p, me, f, block, ch, n, base, factor, rm, produce, consume);
  } else {
    StagedTransport net(inner, pinned(ws.numel()), base, static_cast<CudaOps&>(ops).stream, state, call, call_id);
    pipelined_allreduce(net, ops, p, me, f, block, ch, n, base, factor, rm, produce, consume);
  }
#else
  TORCH_CHECK(false, "localsgd: this build has no CUDA kernels");
#endif
}

}  // namespace localsgd
