// The call header: what every rank must agree on for one collective (CallSpec), the queued call
// that carries it (Call), and the header's wire layout.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace localsgd {

// What every rank must agree on for one collective: the fields of its call header.
struct CallSpec {
  const char* what = "collective";  // for messages: "all_reduce", "broadcast", ...
  int64_t kind = 0;                 // c10d::OpType, or kKindCompressed (all_reduce_compressed)
  int64_t format = 0;               // the compressed format code; 0 when the call passes through
  int64_t op = -1;                  // c10d::ReduceOp (-1: none)
  int64_t dtype = -1;               // at::ScalarType of the data (-1: none)
  int64_t numel = 0;                // elements (-1: may differ between ranks, e.g. uneven all-to-all)
  int64_t extra = 0;                // block size (compressed), root rank, or a digest of a tensor list
  std::chrono::milliseconds timeout{-1};  // the call's own timeout; < 0: the group's
};

class PostedWorks;  // the inner point-to-point works of one call (posted_works.h)

// One queued collective: its sequence number, its header and the header messages posted when
// it was called, and its deadline once the worker starts it.
struct Call {
  uint64_t seq = 0;
  CallSpec spec;
  std::vector<int64_t> mine;  // this rank's header words
  at::Tensor rows;            // every rank's header (p x 8 int64, CPU)
  std::shared_ptr<PostedWorks> header;
  std::chrono::steady_clock::time_point deadline;
  std::chrono::milliseconds timeout{0};
  // CUDA tensors (see "Streams" in worker.cpp): the backend's own stream on the tensor's device,
  // which the worker runs the call on (under a guard of it: device and stream), and `ready`, an
  // event recorded on the caller's current stream of that device when the call was made; the
  // backend stream waits for it (a stream wait, no host sync) before the call's first kernel.
  std::optional<c10::Stream> stream;
  std::optional<c10::Event> ready;
};

// ---- the call header ----------------------------------------------------------------------------
// 8 int64 words: magic, sequence number, kind, format, op, dtype, element count, extra (see
// CallSpec). Sent to every peer as a point-to-point message on the CPU inner group with a tag of
// its own per sequence number, posted on the caller's thread when the collective is called, so
// the exchange overlaps the hand-off to the worker (and, for CUDA tensors, never touches the GPU).
constexpr int64_t kHeaderWords = 8;
constexpr int64_t kHeaderMagic = 0x4C534732;  // "LSG2"
constexpr int64_t kKindCompressed = 1000;     // all_reduce_compressed

inline int64_t numel_of(const std::vector<at::Tensor>& ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.numel();
  return n;
}

// The header fields of a collective over `ts` (dtype: the first tensor's).
inline CallSpec spec_for(const char* what, c10d::OpType kind, const std::vector<at::Tensor>& ts, int64_t op = -1,
                  int64_t extra = 0, std::chrono::milliseconds timeout = c10d::kUnsetTimeout) {
  CallSpec c;
  c.what = what;
  c.kind = static_cast<int64_t>(kind);
  c.op = op;
  c.dtype = ts.empty() ? -1 : static_cast<int64_t>(ts[0].scalar_type());
  c.numel = numel_of(ts);
  c.extra = extra;
  c.timeout = timeout;
  return c;
}

}  // namespace localsgd
