// The data phases of the quantized all-reduce, written once for every device and inner backend:
// the pieces, the device's kernels (DeviceOps), how messages move (Transport), the orchestration.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "call_header.h"
#include "common.h"
#include "localsgd/format.h"
#include "localsgd/kernels.h"
#include "work.h"

namespace localsgd {

// The data phases of the quantized all-reduce: ONE orchestration for every device and inner
// backend (pipelined_allreduce below). What differs is supplied from outside:
//   - DeviceOps: the kernels (zero-fill, fused dequantize + sum + requantize) and where they run
//     (host, or the backend's CUDA stream of the device: "Streams" in worker.cpp);
//   - produce / consume: how a piece of a record is filled from the caller's tensor and emptied
//     into it (quantize / dequantize kernels, or byte copies for all_reduce_compressed);
//   - Transport: how a message moves: gloo point-to-point from host memory (CPU tensors), the
//     same through pinned host staging (CUDA tensors over gloo), or whole-phase NCCL
//     collectives on the stream (CUDA tensors over NCCL).
// So the CPU tests exercise the orchestration (pieces, tags, padding, phase order, error
// handling) that a GPU user runs.
//
// Why point-to-point messages: measured on a 1 Gbit/s shaped link (2 ranks, 8.25 MB each way),
// gloo's all_to_all with one large message per peer took 115-140 ms and its all-gather 85-110
// ms, because the two directions of the link barely overlapped; the same bytes as concurrently
// posted 1 MiB isend/irecv pieces took 72 ms, the wire time of one direction.
//
// Why pieces of blocks, pipelined: with whole phases (compress everything, exchange, reduce
// everything, exchange, decompress everything) the ~35 ms of compression compute of a 64 MB
// tensor (2 ranks, one thread) added to the wire time. Every record is therefore cut into pieces
// of whole blocks; piece j of a record travels as two messages (its payload bytes, then its
// scales), so the record layout (and the bytes) are those of the unpipelined algorithm:
//   A  for each piece j: compress piece j of every peer's chunk and post its sends at once;
//   B  for each piece j: wait for piece j of our chunk from every peer, reduce + requantize it,
//      post its sends to every peer (they queue on the link behind phase A's);
//   C  decompress our own reduced chunk, then every peer's pieces as they arrive.
// Compute then runs while the link is busy with earlier pieces: only the first piece's compress
// and the last piece's decompress are not hidden. A transport that moves whole phases (NCCL:
// the GPU computes a piece in microseconds, nothing to hide) gets one piece per record.

// The elements of one piece of a chunk's record: blocks from b0 on, elements [e0, e0 + valid)
// of the chunk (e0 = b0 * block), i.e. [g0, g0 + valid) of the whole tensor. valid is 0 for a
// piece wholly past the chunk's end; the callbacks below only ever see valid > 0. padded: the
// piece's blocks reach past the chunk's end.
struct Piece {
  int64_t b0, e0, g0, valid;
  bool padded;
};

// produce(pc, rec): write the piece's elements of its chunk (payload and scales) into the record
//   at rec.
// consume(pc, rec): read the piece of a reduced record at rec.
// Payload and scales of a piece sit at rec + payload_offset(f, pc.e0) and
// reinterpret_cast<float*>(rec + ch.cap) + pc.b0; rec is a pointer on the workspace's device.
// Padding is the pipeline's business.
using ProduceFn = std::function<void(const Piece&, uint8_t*)>;
using ConsumeFn = std::function<void(const Piece&, const uint8_t*)>;

// The kernels of one call and where they run: the host, or the backend's CUDA stream of the
// device (current on the worker under the call's guard, ordered after the caller's stream by an
// event recorded at enqueue). Pointers are on that device.
struct DeviceOps {
  virtual ~DeviceOps() = default;
  virtual void zero(uint8_t* dst, int64_t len) = 0;
  virtual void copy(void* dst, const void* src, int64_t len) = 0;
  virtual void quantize(Format f, DType dt, const void* x, int64_t n, int64_t block, const RoundingMode& rm,
                        uint8_t* payload, float* scales) = 0;
  virtual void dequantize(Format f, const uint8_t* payload, const float* scales, int64_t n, int64_t block, DType dt,
                          void* out) = 0;
  // p records' pieces at in (stride bytes; scales at in_scales, scales_stride floats) -> fp32
  // sum in rank order, times factor, requantized into out / out_scales.
  virtual void reduce(Format f, int64_t p, const uint8_t* in, int64_t stride, const float* in_scales,
                      int64_t scales_stride, int64_t n, int64_t block, float factor, const RoundingMode& rm,
                      uint8_t* out, float* out_scales) = 0;
};


// How the messages of one call move. Offsets are bytes into the workspace (on its device).
// Receives are posted before sends; flush(phase, j) follows the sends of piece j of a phase.
class Transport {
 public:
  virtual ~Transport() = default;
  // false: one piece per record, each phase moved as a whole
  virtual bool pipelined() const { return true; }
  // true: this rank's own record of phase A goes to slot `me` of the send area (a collective
  // moves it into place); false: straight into the receive area
  virtual bool own_record_in_send_area() const { return false; }
  virtual void recv(int phase, int64_t j, int m, int64_t peer, int64_t off, int64_t len) = 0;
  virtual void send(int phase, int64_t j, int m, int64_t peer, int64_t off, int64_t len) = 0;
  virtual void flush(int /*phase*/, int64_t /*j*/) {}
  virtual void wait_recv(int phase, int64_t j, int m, int64_t peer) = 0;
  virtual void wait_all() = 0;
};

// The orchestration (phases A, B, C above) for a tensor of n elements in chunks `ch`. `ws`
// holds (3 p + 1) R bytes on the tensor's device: send records, received records, our reduced
// record, gathered records. Record bytes past a chunk's end are zeroed here (never send
// uninitialized memory). `rm`'s index_offset is set per piece.
void pipelined_allreduce(Transport& net, DeviceOps& dev, int64_t p, int64_t me, Format f, int64_t block,
                         const Chunking& ch, int64_t n, uint8_t* base, float factor, RoundingMode rm,
                         const ProduceFn& produce, const ConsumeFn& consume);

// The kernels for a workspace on `device` (CUDA: the worker's current stream there, i.e. the
// backend stream, set by the call's guard).
std::unique_ptr<DeviceOps> make_ops(const at::Device& device);

// The orchestration over the transport that fits the workspace's device and the inner backend.
// pinned(nbytes): a pinned host buffer (only CUDA tensors over gloo ask for one).
void run_pipeline(const c10::intrusive_ptr<c10d::Backend>& inner, DeviceOps& ops, int64_t p, int64_t me, Format f,
                  int64_t block, const Chunking& ch, int64_t n, const at::Tensor& ws,
                  const std::function<at::Tensor(int64_t)>& pinned, float factor, const RoundingMode& rm,
                  const ProduceFn& produce, const ConsumeFn& consume, GroupState* state, const Call& call,
                  uint64_t call_id);

}  // namespace localsgd
