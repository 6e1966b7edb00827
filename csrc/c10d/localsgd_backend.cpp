// The "localsgd" c10d backend (see localsgd_backend.h for its limitations).
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
// Deadlocks documented in docs/platform.md: Works are completed from the worker / inner callbacks,
// never from wait(); the destructor and shutdown() release the GIL before joining the worker and
// dropping the gloo backends (gloo's threads may need the GIL while the main thread joins them).
#include "localsgd_backend.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <cstring>
#include <functional>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/StreamGuard.h>
#include <c10/util/Exception.h>
#include <torch/extension.h>

#include "localsgd/kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef LOCALSGD_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "localsgd/kernels_cuda.h"
#endif

namespace localsgd {
namespace {

const char* format_name(Format f) {
  switch (f) {
    case Format::None: return "none";
    case Format::Int8: return "int8";
    case Format::Int4: return "int4";
    case Format::Fp8: return "fp8";
  }
  return "?";
}

DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "localsgd: expected float32, bfloat16 or float16, got ", s);
  }
}

// Payload bytes of elements [0, e) when e is a block multiple (int4: e is even).
int64_t payload_offset(Format f, int64_t e) { return f == Format::Int4 ? e / 2 : e; }

struct Chunking {
  int64_t blocks_per_chunk;  // c
  int64_t elems;             // c * B
  int64_t cap;               // payload bytes reserved per record (a multiple of 8)
  int64_t record;            // cap + 4 c: one record = payload chunk then its scales
  int64_t lo(int64_t r, int64_t n) const { return std::min(r * elems, n); }
  int64_t hi(int64_t r, int64_t n) const { return std::min((r + 1) * elems, n); }
};

// Chunks are cut on block boundaries (each chunk's scales are whole blocks of the tensor, and
// int4 chunks start on a byte); the tail chunks may be short or empty and every record is
// padded to one size so the all-to-all and the all-gather are equal-split.
Chunking make_chunking(Format f, int64_t n, int64_t block, int64_t p) {
  Chunking c;
  c.blocks_per_chunk = std::max<int64_t>(1, (num_blocks(n, block) + p - 1) / p);
  c.elems = c.blocks_per_chunk * block;
  c.cap = payload_bytes(f, c.elems);
  c.record = c.cap + 4 * c.blocks_per_chunk;
  return c;
}

uint64_t mix64(uint64_t a, uint64_t b) {
  return (static_cast<uint64_t>(mix32(static_cast<uint32_t>(a ^ (b * 0x9E3779B97F4A7C15ull)))) << 32) |
         mix32(static_cast<uint32_t>((a >> 32) ^ b ^ 0x85EBCA6Bu));
}

}  // namespace

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

namespace {
// ---- the call header ----------------------------------------------------------------------------
// 8 int64 words: magic, sequence number, kind, format, op, dtype, element count, extra (see
// CallSpec). Sent to every peer as a point-to-point message on the CPU inner group with a tag of
// its own per sequence number, posted on the caller's thread when the collective is called, so
// the exchange overlaps the hand-off to the worker (and, for CUDA tensors, never touches the GPU).
constexpr int64_t kHeaderWords = 8;
constexpr int64_t kHeaderMagic = 0x4C534732;  // "LSG2"
constexpr int kHeaderTag = 0x50000000;        // + (seq mod 2^24); above both phases' ranges
constexpr int64_t kHeaderSeqMask = 0xFFFFFF;
constexpr int64_t kKindCompressed = 1000;     // all_reduce_compressed

std::string kind_name(int64_t k) {
  if (k == kKindCompressed) return "all_reduce_compressed";
  if (k < 0 || k > 255) return c10::str("kind ", k);
  std::string s = c10d::opTypeToString(static_cast<c10d::OpType>(k));
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string op_name(int64_t op) {
  static const char* names[] = {"SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR", "PREMUL_SUM"};
  if (op < 0) return "none";
  return op < 9 ? names[op] : c10::str("op ", op);
}

std::string header_value(int64_t field, int64_t v) {
  switch (field) {
    case 2: return kind_name(v);
    case 3: return v == 0 ? std::string("uncompressed") : std::string(format_name(static_cast<Format>(v)));
    case 4: return op_name(v);
    case 5: return v < 0 ? std::string("none") : std::string(c10::getDtypeNames(static_cast<at::ScalarType>(v)).first);
    default: return std::to_string(v);
  }
}

int64_t numel_of(const std::vector<at::Tensor>& ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.numel();
  return n;
}

// The header fields of a collective over `ts` (dtype: the first tensor's).
CallSpec spec_for(const char* what, c10d::OpType kind, const std::vector<at::Tensor>& ts, int64_t op = -1,
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
// The data phases of the quantized all-reduce: ONE orchestration for every device and inner
// backend (pipelined_allreduce below). What differs is supplied from outside:
//   - DeviceOps: the kernels (zero-fill, fused dequantize + sum + requantize) and where they run
//     (host, or the caller's CUDA stream);
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
//
// Tags sit in a range of their own per phase, far above what user send/recv use (those pass
// through with the user's tags and are refused from kPhaseTag[0] up): piece j of call c has
// base + (c mod 256) * 2^19 + 2j for the payload, + 1 for the scales. The FIFO worker waits for
// every message of a call before the next call starts, and a failed call fails the group, so
// tags never pair messages of two calls; the call bits make that hold even for a message that
// arrives late from a call that failed half way on another rank. Message lengths follow from
// the call header every rank agreed on before (check_call), so a message is never shorter or
// longer than the receive posted for it.
constexpr int kPhaseTag[2] = {0x40000000, 0x48000000};
constexpr int kCallTagShift = 19;
constexpr int64_t kCallTagMask = 0xFF;
constexpr int64_t kMaxPieces = int64_t{1} << (kCallTagShift - 1);
int phase_tag(int phase, uint64_t call_id, int64_t j, int m) {
  return kPhaseTag[phase] + static_cast<int>((call_id & kCallTagMask) << kCallTagShift) + static_cast<int>(2 * j + m);
}
// Every tag family has a range of its own: user tags below phase A, phase A below phase B, phase
// B below the call headers, the headers below INT_MAX. (The headers once sat inside phase B's
// range: after about 500K collectives a piece of call 224-255 mod 256 could match a pre-posted
// header receive.)
constexpr int64_t kPhaseTagSpan = (kCallTagMask << kCallTagShift) + 2 * kMaxPieces;  // tags per phase
static_assert(kPhaseTag[0] + kPhaseTagSpan <= kPhaseTag[1], "phase A's tags overlap phase B's");
static_assert(kPhaseTag[1] + kPhaseTagSpan <= kHeaderTag, "phase B's tags overlap the call headers'");
static_assert(int64_t{kHeaderTag} + kHeaderSeqMask <= int64_t{std::numeric_limits<int>::max()},
              "the call headers' tags overflow int");
static_assert(2 * kMaxPieces <= (int64_t{1} << kCallTagShift), "a call's pieces overlap the next call's tags");
constexpr int64_t kPieceBytes = 1 << 20;     // payload bytes per piece, at most ...
constexpr int64_t kMinPieceBytes = 1 << 16;  // ... and at least (unless the record is smaller)

struct Pieces {
  int64_t blocks;  // blocks per piece (the last piece of a record may be short)
  int64_t count;   // pieces per record
};

// About 8 pieces per record (so small records pipeline too), each 64 KiB - 1 MiB of payload;
// or one piece per record (whole phases).
Pieces make_pieces(Format f, const Chunking& ch, int64_t block, bool pipelined) {
  if (!pipelined) return {ch.blocks_per_chunk, 1};
  const int64_t per_block = payload_bytes(f, block);
  const int64_t target = std::clamp<int64_t>(ch.cap / 8, kMinPieceBytes, kPieceBytes);
  const int64_t blocks = std::clamp<int64_t>(target / per_block, 1, ch.blocks_per_chunk);
  const Pieces pc{blocks, (ch.blocks_per_chunk + blocks - 1) / blocks};
  TORCH_CHECK(pc.count < kMaxPieces, "localsgd all_reduce: a record of ", ch.cap, " payload bytes needs ", pc.count,
              " pieces, more than the ", kMaxPieces, " the message tags can number");
  return pc;
}

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

// The kernels of one call and where they run: the host, or the caller's CUDA stream (captured
// at enqueue, current on the worker under its guard). Pointers are on that device.
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

// The orchestration (phases A, B, C above) for a tensor of n elements in chunks `ch`. `ws`
// holds (3 p + 1) R bytes on the tensor's device: send records, received records, our reduced
// record, gathered records. Record bytes past a chunk's end are zeroed here (never send
// uninitialized memory). `rm`'s index_offset is set per piece.
void pipelined_allreduce(Transport& net, DeviceOps& dev, int64_t p, int64_t me, Format f, int64_t block,
                         const Chunking& ch, int64_t n, uint8_t* base, float factor, RoundingMode rm,
                         const ProduceFn& produce, const ConsumeFn& consume) {
  const int64_t R = ch.record, c = ch.blocks_per_chunk;
  const Pieces pc = make_pieces(f, ch, block, net.pipelined());
  const int64_t kSend = 0, kRecv = p * R, kMine = 2 * p * R, kGath = 2 * p * R + R;
  const int64_t kOwn = net.own_record_in_send_area() && p > 1 ? kSend + me * R : kRecv + me * R;
  // message m (0 payload, 1 scales) of piece j: (offset in its record, length)
  auto msg = [&](int64_t j, int m) -> std::pair<int64_t, int64_t> {
    const int64_t b0 = j * pc.blocks, b1 = std::min(b0 + pc.blocks, c);
    if (m == 0) return {payload_offset(f, b0 * block), payload_offset(f, (b1 - b0) * block)};
    return {ch.cap + 4 * b0, 4 * (b1 - b0)};
  };
  // piece j of rank r's chunk
  auto piece = [&](int64_t r, int64_t j) {
    const int64_t b0 = j * pc.blocks, e0 = b0 * block, lo = ch.lo(r, n);
    const int64_t full = (std::min(b0 + pc.blocks, c) - b0) * block;
    const int64_t valid = std::clamp<int64_t>(ch.hi(r, n) - lo - e0, 0, full);
    return Piece{b0, e0, lo + e0, valid, valid < full};
  };
  // zero both messages of a padded piece j in the record at rec, before it is written
  auto pad = [&](const Piece& x, int64_t j, int64_t rec) {
    if (!x.padded) return;
    for (int m = 0; m < 2; ++m) {
      const auto [off, len] = msg(j, m);
      dev.zero(base + rec + off, len);
    }
  };
  auto send_piece = [&](int64_t rec, int64_t to, int64_t j, int phase) {
    for (int m = 0; m < 2; ++m) {
      const auto [off, len] = msg(j, m);
      net.send(phase, j, m, to, rec + off, len);
    }
  };
  auto wait_piece = [&](int phase, int64_t from, int64_t j) {
    net.wait_recv(phase, j, 0, from);
    net.wait_recv(phase, j, 1, from);
  };
  for (int64_t i = 1; i < p; ++i) {
    const int64_t from = (me + p - i) % p;
    for (int64_t j = 0; j < pc.count; ++j) {
      for (int m = 0; m < 2; ++m) {
        const auto [off, len] = msg(j, m);
        net.recv(0, j, m, from, kRecv + from * R + off, len);
        net.recv(1, j, m, from, kGath + from * R + off, len);
      }
    }
  }
  // writes piece j of rank r's chunk into the record at offset rec (padding zeroed)
  auto fill = [&](int64_t r, int64_t j, int64_t rec) {
    const Piece x = piece(r, j);
    pad(x, j, rec);
    if (x.valid > 0) produce(x, base + rec);
  };
  // A: compress piece by piece; our own chunk's pieces go straight to the receive area.
  for (int64_t j = 0; j < pc.count; ++j) {
    for (int64_t i = 1; i < p; ++i) {
      const int64_t to = (me + i) % p;
      fill(to, j, kSend + to * R);
      send_piece(kSend + to * R, to, j, 0);
    }
    fill(me, j, kOwn);
    net.flush(0, j);
  }
  // B: reduce each piece once every peer's copy of it is in, and send it on.
  for (int64_t j = 0; j < pc.count; ++j) {
    for (int64_t i = 1; i < p; ++i) wait_piece(0, (me + p - i) % p, j);
    const Piece x = piece(me, j);
    pad(x, j, kMine);
    if (x.valid > 0) {
      const uint8_t* in = base + kRecv;
      uint8_t* out = base + kMine;
      rm.index_offset = x.g0;
      dev.reduce(f, p, in + payload_offset(f, x.e0), R, reinterpret_cast<const float*>(in + ch.cap) + x.b0, R / 4,
                 x.valid, block, factor, rm, out + payload_offset(f, x.e0),
                 reinterpret_cast<float*>(out + ch.cap) + x.b0);
    }
    for (int64_t i = 1; i < p; ++i) send_piece(kMine, (me + i) % p, j, 1);
    net.flush(1, j);
  }
  // C: our own reduced chunk (while the link still carries phase B), then the peers' pieces.
  auto drain = [&](int64_t r, int64_t j, int64_t rec) {
    const Piece x = piece(r, j);
    if (x.valid > 0) consume(x, base + rec);
  };
  for (int64_t j = 0; j < pc.count; ++j) drain(me, j, kMine);
  for (int64_t j = 0; j < pc.count; ++j) {
    for (int64_t i = 1; i < p; ++i) {
      const int64_t from = (me + p - i) % p;
      wait_piece(1, from, j);
      drain(from, j, kGath + from * R);
    }
  }
  net.wait_all();  // the sends
}

#ifdef LOCALSGD_WITH_CUDA
void check_launch(const char* what) {
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
// sends of a piece are copied device -> host on the stream and posted once that copy is done
// (one host wait per piece and phase, inherent to a host transport); a receive is copied host
// -> device on the stream when it arrives, ordered before the kernels that read it. Before the
// call returns the stream is synchronized once, so the host mirror is free for the next call.
class StagedTransport final : public P2PTransport {
 public:
  StagedTransport(c10::intrusive_ptr<c10d::Backend> inner, at::Tensor host, uint8_t* device, cudaStream_t stream,
                  GroupState* state, const Call& call, uint64_t call_id)
      : P2PTransport(std::move(inner), std::move(host), state, call, call_id), device_(device), stream_(stream) {}
  void send(int phase, int64_t j, int m, int64_t peer, int64_t off, int64_t len) override {
    C10_CUDA_CHECK(cudaMemcpyAsync(host_.data_ptr<uint8_t>() + off, device_ + off, len, cudaMemcpyDeviceToHost,
                                   stream_));
    pending_.push_back({phase, j, m, peer, off, len});
  }
  void flush(int, int64_t) override {
    if (pending_.empty()) return;
    C10_CUDA_CHECK(cudaStreamSynchronize(stream_));
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
    C10_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

 private:
  struct Pending {
    int phase;
    int64_t j;
    int m;
    int64_t peer, off, len;
  };
  uint8_t* device_;
  cudaStream_t stream_;
  std::vector<Pending> pending_;
  std::map<uint64_t, std::pair<int64_t, int64_t>> spans_;
};

// CUDA tensors over NCCL: each phase is one collective on NCCL's stream, ordered after the
// caller's stream (NCCL's own discipline) and waited for by a stream wait, never a host sync:
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
#endif

// The kernels for a workspace on `device` (CUDA: the worker's current stream there, i.e. the
// caller's, set by the call's guard).
std::unique_ptr<DeviceOps> make_ops(const at::Device& device) {
  if (device.is_cpu()) return std::make_unique<CpuOps>();
#ifdef LOCALSGD_WITH_CUDA
  return std::make_unique<CudaOps>(c10::cuda::getCurrentCUDAStream(device.index()).stream());
#else
  TORCH_CHECK(false, "localsgd: got a ", device, " tensor but this build has no CUDA kernels");
#endif
}

// The orchestration over the transport that fits the workspace's device and the inner backend.
// pinned(nbytes): a pinned host buffer (only CUDA tensors over gloo ask for one).
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
}  // namespace

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
  // The future was completed on the worker under the caller's stream: it recorded events there.
  // Waiting on it makes the *current* stream of the thread that waits (which may be another
  // stream than the one the call was made on) wait for those events; no host sync.
  if (!future_->devices().empty() && future_->completed()) future_->wait();
}

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
    cpu_inner_.reset();   // ~ProcessGroupGloo joins gloo's threads
    cuda_inner_.reset();
  };
  if (Py_IsInitialized() && PyGILState_Check()) {
    pybind11::gil_scoped_release nogil;
    drop();
  } else {
    drop();
  }
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
  cpu_inner_.reset();
  cuda_inner_.reset();
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

std::shared_ptr<Call> LocalSGDBackend::new_call(uint64_t seq) {
  auto call = std::make_shared<Call>();
  call->seq = seq;
  const int64_t p = getSize(), me = getRank();
  if (!check_calls_ || p == 1) return call;
  call->rows = at::empty({p, kHeaderWords}, at::TensorOptions().dtype(at::kLong));
  call->header = std::make_shared<PostedWorks>(state_.get(), *call);
  const int tag = kHeaderTag + static_cast<int>(seq & kHeaderSeqMask);
  for (int64_t r = 0; r < p; ++r) {
    if (r == me) continue;
    std::vector<at::Tensor> t{call->rows[r]};
    call->header->add(cpu_inner_->recv(t, static_cast<int>(r), tag), r, false);
  }
  return call;
}

void LocalSGDBackend::post_header(Call& call) {
  const int64_t p = getSize(), me = getRank();
  const CallSpec& c = call.spec;
  call.mine = {kHeaderMagic, static_cast<int64_t>(call.seq), c.kind, c.format, c.op, c.dtype, c.numel, c.extra};
  if (!call.header) return;
  std::memcpy(call.rows[me].data_ptr<int64_t>(), call.mine.data(), kHeaderWords * sizeof(int64_t));
  const int tag = kHeaderTag + static_cast<int>(call.seq & kHeaderSeqMask);
  for (int64_t r = 0; r < p; ++r) {
    if (r == me) continue;
    std::vector<at::Tensor> t{call.rows[me]};
    call.header->add(cpu_inner_->send(t, static_cast<int>(r), tag), r, true);
  }
  const int64_t bytes = (p - 1) * kHeaderWords * 8;
  std::lock_guard<std::mutex> lk(stats_mu_);
  stats_.header_bytes += bytes;
  stats_.bytes_sent += bytes;
  stats_.bytes_received += bytes;
}

void LocalSGDBackend::check_call(Call& call) {
  call.deadline = std::chrono::steady_clock::now() + call.timeout;
  if (!call.header) return;
  // The peers' headers; our own sends are waited for after the call (the peers took them, or
  // they could not have made the call's data move).
  call.header->wait_receives();
  static const char* names[kHeaderWords] = {"magic", "sequence number", "collective", "format",
                                            "op",    "dtype",           "numel",      "block size / root"};
  const int64_t p = getSize();
  const int64_t* d = call.rows.const_data_ptr<int64_t>();
  std::string diff;
  for (int64_t r = 0; r < p; ++r) {
    const int64_t* row = d + r * kHeaderWords;
    // the last field means block size or root depending on the collective: only named when
    // the collective and its path agree
    const bool same_call = row[2] == call.mine[2] && row[3] == call.mine[3];
    for (int64_t i = 0; i < kHeaderWords; ++i) {
      const int64_t v = row[i], m = call.mine[i];
      if (v == m || (i == 6 && (v < 0 || m < 0)) || (i == 7 && !same_call)) continue;  // -1 numel: not comparable
      diff += c10::str(diff.empty() ? "" : "; ", names[i], ": this rank ", header_value(i, m), ", rank ", r, " ",
                       header_value(i, v));
    }
  }
  TORCH_CHECK(diff.empty(), "localsgd ", call.spec.what, " (collective #", call.seq, "): ranks disagree (", diff,
              "); every rank must make the same collectives in the same order with the same sizes, dtypes and ops");
}

void LocalSGDBackend::enqueue(const CallSpec& spec, const c10::Device& device, TaskFn fn) {
  check_healthy(spec.what);  // a failed group: the call raises at once with the first error
  // Captured here, on the caller's thread, on the tensor's device: the worker thread's own current
  // stream is the default stream of device 0, wrong for a tensor on another device and unordered
  // with the caller's work.
  std::optional<c10::Stream> stream;
#ifdef LOCALSGD_WITH_CUDA
  if (device.is_cuda()) stream = c10::cuda::getCurrentCUDAStream(device.index());
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
      // CUDA calls run on the caller's stream of the tensor's device (kernels, inner collectives
      // issued on it, the future's events recorded on it); nothing for CPU calls.
      std::optional<c10::StreamGuard> guard;
      if (task.call->stream) guard.emplace(*task.call->stream);
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

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::passthrough(
    c10d::OpType op, const CallSpec& spec, std::vector<at::Tensor> outputs, c10::DeviceType device,
    std::function<c10::intrusive_ptr<c10d::Work>()> issue) {
  std::vector<c10::Device> devs;
  if (device == c10::DeviceType::CUDA && !outputs.empty()) devs.push_back(outputs[0].device());
  const c10::Device where = devs.empty() ? c10::Device(device) : devs[0];
  auto work = c10::make_intrusive<LocalSGDWork>(op, std::move(outputs), devs, state_);
  enqueue(spec, where, [this, work, issue = std::move(issue)](std::exception_ptr cancel, Call& call) {
    if (cancel) {
      work->complete(cancel);
      return;
    }
    try {
      if (call.stream) {
        // Issued on the caller's stream (NCCL orders its stream after it); wait() on the inner
        // work makes that stream wait for the collective, then the Work completes.
        issue()->wait();
        work->complete(nullptr);
        return;
      }
      auto inner = issue();
      c10::intrusive_ptr<c10::ivalue::Future> fut;
      try {
        fut = inner->getFuture();
      } catch (const std::exception&) {
        fut.reset();  // an inner Work without futures: fall back to a blocking wait
      }
      if (!fut) {
        inner->wait();
        work->complete(nullptr);
        return;
      }
      auto state = state_;
      fut->addCallback([work, state](c10::ivalue::Future& f) {
        if (f.hasError()) state->fail(f.exception_ptr());
        work->complete(f.hasError() ? f.exception_ptr() : nullptr);
      });
    } catch (...) {
      finish(work, std::current_exception());
    }
  });
  return work;
}

const char* LocalSGDBackend::passthrough_reason(const at::Tensor& t, c10d::ReduceOp op) const {
  if (format_ == Format::None) return "format_none";
  const auto s = t.scalar_type();
  if (s != at::kFloat && s != at::kBFloat16 && s != at::kHalf) return "dtype";
  if (op != c10d::ReduceOp::SUM && op != c10d::ReduceOp::AVG) return "op";
  if (static_cast<int64_t>(t.numel() * t.element_size()) < threshold_) return "small";
  return nullptr;
}

void LocalSGDBackend::count_passthrough(const char* reason, int64_t bytes, bool log) {
  const int64_t p = getSize();
  bool first = false;
  {
    std::lock_guard<std::mutex> lk(stats_mu_);
    stats_.passthrough_calls += 1;
    stats_.passthrough_reasons[reason] += 1;
    // A ring all-reduce sends 2 (p-1)/p of the tensor per rank (gloo's own algorithm may differ).
    stats_.bytes_sent += 2 * (p - 1) * bytes / std::max<int64_t>(p, 1);
    stats_.bytes_received += 2 * (p - 1) * bytes / std::max<int64_t>(p, 1);
    const uint32_t bit = std::string(reason) == "small" ? 1u : (std::string(reason) == "op" ? 2u : 4u);
    if (log && !(logged_reasons_ & bit)) {
      logged_reasons_ |= bit;
      first = true;
    }
  }
  if (first) {
    TORCH_WARN("localsgd: an all-reduce of a floating tensor was sent uncompressed (reason: ", reason,
               "; format ", format_name(format_), ", threshold_bytes ", threshold_,
               "). Logged once per reason; counts are in localsgd_comm.get_backend_stats().");
  }
}

void LocalSGDBackend::count_ring_share(const char* op, int64_t bytes) { count_op(op, bytes, bytes); }

void LocalSGDBackend::count_op(const char* op, int64_t sent, int64_t received) {
  std::lock_guard<std::mutex> lk(stats_mu_);
  stats_.op_calls[op] += 1;
  stats_.op_bytes_sent[op] += sent;
  stats_.bytes_sent += sent;
  stats_.bytes_received += received;
}

BackendStats LocalSGDBackend::stats() const {
  std::lock_guard<std::mutex> lk(stats_mu_);
  return stats_;
}

void LocalSGDBackend::reset_stats() {
  std::lock_guard<std::mutex> lk(stats_mu_);
  stats_ = BackendStats();
}

at::Tensor LocalSGDBackend::scratch(int64_t nbytes, const at::TensorOptions& opts) {
  // CUDA tensors come from torch's caching allocator already; only CPU scratch is kept.
  if (!opts.device().is_cpu()) return at::empty({nbytes}, opts);
  if (!cpu_workspace_.defined() || cpu_workspace_.numel() < nbytes) {
    cpu_workspace_ = at::Tensor();  // drop the old one first: peak memory is the new size only
    cpu_workspace_ = at::empty({nbytes}, opts);
  }
  return cpu_workspace_.narrow(0, 0, nbytes);
}

at::Tensor LocalSGDBackend::pinned_scratch(int64_t nbytes) {
  // Host mirror of a CUDA workspace for gloo; pinned so that the stream copies are asynchronous.
  if (!pinned_workspace_.defined() || pinned_workspace_.numel() < nbytes) {
    pinned_workspace_ = at::Tensor();
    pinned_workspace_ = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }
  return pinned_workspace_.narrow(0, 0, nbytes);
}

// ---- the quantized all-reduce (runs on the worker) -----------------------------------------------
// Steps as in docs/design.md: (1) quantize the local tensor per chunk, (2) all-to-all of the p
// records, (3+4) fused dequantize + fp32 sum (+ 1/p) + requantize of the owned chunk, (5)
// all-gather of the reduced records, (6) dequantize into the tensor. Two roundings per element;
// every rank dequantizes the same bytes, so results are bitwise identical. The steps run piece by
// piece (pipelined_allreduce, whatever the device); the kernels are given the pieces' global
// element offsets, so the bytes are those of whole-chunk calls.
void LocalSGDBackend::quantized_allreduce(const c10::intrusive_ptr<c10d::Backend>& inner, at::Tensor t,
                                          bool average, uint64_t call_id, const Call& call) {
  const int64_t p = getSize(), me = getRank(), n = t.numel(), B = block_;
  const Format f = format_;
  const DType dt = to_dtype(t.scalar_type());
  // Non-contiguous tensors are reduced in a contiguous copy and copied back.
  at::Tensor x = t.is_contiguous() ? t : t.contiguous();
  const Chunking ch = make_chunking(f, n, B, p);
  const int64_t R = ch.record, esize = x.element_size();
  auto bytes = at::TensorOptions().dtype(at::kByte).device(x.device());
  // (the CUDA stream is the caller's: the call's guard made it current on this thread)
  at::Tensor ws = scratch((3 * p + 1) * R, bytes);
  RoundingMode rm;
  uint64_t call_seed = 0;
  if (seed_ >= 0) {
    rm.stochastic = true;
    call_seed = mix64(static_cast<uint64_t>(seed_), call_id);
  }
  // Each rank draws its own random numbers for step (1) (seed mixed with the rank) so stochastic
  // rounding errors average out across ranks; step (4) uses the call's seed.
  RoundingMode rm_local = rm, rm_reduce = rm;
  rm_local.seed = mix64(call_seed, static_cast<uint64_t>(me) + 1);
  rm_reduce.seed = call_seed;
  const float factor = average ? 1.0f / static_cast<float>(p) : 1.0f;

  auto ops = make_ops(x.device());
  char* data = static_cast<char*>(x.data_ptr());
  ProduceFn produce = [&](const Piece& pc, uint8_t* rec) {
    RoundingMode q = rm_local;
    q.index_offset = pc.g0;
    ops->quantize(f, dt, data + pc.g0 * esize, pc.valid, B, q, rec + payload_offset(f, pc.e0),
                  reinterpret_cast<float*>(rec + ch.cap) + pc.b0);
  };
  ConsumeFn consume = [&](const Piece& pc, const uint8_t* rec) {
    ops->dequantize(f, rec + payload_offset(f, pc.e0), reinterpret_cast<const float*>(rec + ch.cap) + pc.b0, pc.valid,
                    B, dt, data + pc.g0 * esize);
  };
  run_pipeline(inner, *ops, p, me, f, B, ch, n, ws, [this](int64_t nb) { return pinned_scratch(nb); }, factor,
               rm_reduce, produce, consume, state_.get(), call, next_tag_call_++);
  if (!x.is_same(t)) t.copy_(x);
  std::lock_guard<std::mutex> lk(stats_mu_);
  // Per rank: p-1 records out (and in) in each of the two phases (the call header is counted
  // when it is posted).
  const int64_t wire = (p - 1) * 2 * R;
  stats_.bytes_sent += wire;
  stats_.bytes_received += wire;
  stats_.compressed_calls += 1;
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                          const c10d::AllreduceOptions& opts) {
  TORCH_CHECK(!tensors.empty(), "localsgd all_reduce: expected at least one tensor, got none");
  const at::Tensor& t = tensors[0];
  const c10::DeviceType dev = t.device().type();
  auto inner = inner_for(t);
  const char* reason = tensors.size() == 1 ? passthrough_reason(t, opts.reduceOp) : "multi_tensor";
  if (reason != nullptr) {
    const bool floating = at::isFloatingType(t.scalar_type());
    count_passthrough(reason, t.numel() * t.element_size(),
                      /*log=*/floating && std::string(reason) != "format_none" && std::string(reason) != "dtype");
    const bool avg = opts.reduceOp == c10d::ReduceOp::AVG;
    c10d::AllreduceOptions o = opts;
    // gloo has no AVG: sum, then divide (floating tensors) before the Work completes.
    if (avg && dev == c10::DeviceType::CPU) {
      TORCH_CHECK(at::isFloatingType(t.scalar_type()), "localsgd all_reduce: ReduceOp.AVG needs a floating tensor, got ",
                  t.scalar_type());
      o.reduceOp = c10d::ReduceOp::SUM;
    }
    std::vector<at::Tensor> ts = tensors;
    const int64_t p = getSize();
    const bool divide = avg && dev == c10::DeviceType::CPU;
    const CallSpec spec = spec_for("all_reduce", c10d::OpType::ALLREDUCE, ts, static_cast<int64_t>(opts.reduceOp.op_),
                                   0, opts.timeout);
    return passthrough(c10d::OpType::ALLREDUCE, spec, ts, dev, [inner, ts, o, divide, p]() mutable {
      auto w = inner->allreduce(ts, o);
      if (!divide) return w;
      w->wait();  // CPU only: divide after the sum, still on the worker and in order
      for (auto& x : ts) x.div_(static_cast<double>(p));
      return w;
    });
  }
  for (const auto& x : tensors) {
    TORCH_CHECK(!x.is_sparse(), "localsgd all_reduce: sparse tensors are not supported");
  }
  const bool avg = opts.reduceOp == c10d::ReduceOp::AVG;
  std::vector<c10::Device> devs;
  if (dev == c10::DeviceType::CUDA) devs.push_back(t.device());
  auto work = c10::make_intrusive<LocalSGDWork>(c10d::OpType::ALLREDUCE, tensors, devs, state_);
  at::Tensor tt = t;
  CallSpec spec = spec_for("all_reduce", c10d::OpType::ALLREDUCE, {t}, static_cast<int64_t>(opts.reduceOp.op_), block_,
                           opts.timeout);
  spec.format = static_cast<int64_t>(format_);
  enqueue(spec, t.device(), [this, work, inner, tt, avg](std::exception_ptr cancel, Call& call) {
    if (cancel) {
      work->complete(cancel);
      return;
    }
    try {
      quantized_allreduce(inner, tt, avg, next_call_id_++, call);
      work->complete(nullptr);
    } catch (...) {
      finish(work, std::current_exception());
    }
  });
  return work;
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                                    const c10d::AllreduceCoalescedOptions& opts) {
  // One result per tensor (dist.all_reduce_coalesced): each tensor is compressed or passed
  // through on its own, all inside one queued task so the sequence is identical on every rank.
  TORCH_CHECK(!tensors.empty(), "localsgd all_reduce_coalesced: expected at least one tensor, got none");
  const c10::DeviceType dev = tensors[0].device().type();
  for (const auto& x : tensors) {
    TORCH_CHECK(x.device().type() == dev, "localsgd all_reduce_coalesced: expected all tensors on one device type, got ",
                tensors[0].device(), " and ", x.device());
  }
  auto inner = inner_for(tensors[0]);
  if (opts.reduceOp == c10d::ReduceOp::AVG && dev == c10::DeviceType::CPU) {
    // Checked before anything is issued (as all_reduce does): otherwise the worker would sum the
    // integer tensor and only then fail in the division, leaving it summed.
    for (const auto& x : tensors) {
      TORCH_CHECK(at::isFloatingType(x.scalar_type()),
                  "localsgd all_reduce_coalesced: ReduceOp.AVG needs floating tensors, got ", x.scalar_type());
    }
  }
  std::vector<const char*> reasons;
  for (const auto& x : tensors) {
    const char* r = passthrough_reason(x, opts.reduceOp);
    reasons.push_back(r);
    if (r) count_passthrough(r, x.numel() * x.element_size(), at::isFloatingType(x.scalar_type()) &&
                             std::string(r) != "format_none" && std::string(r) != "dtype");
  }
  const bool avg = opts.reduceOp == c10d::ReduceOp::AVG;
  std::vector<c10::Device> devs;
  if (dev == c10::DeviceType::CUDA) devs.push_back(tensors[0].device());
  auto work = c10::make_intrusive<LocalSGDWork>(c10d::OpType::ALLREDUCE_COALESCED, tensors, devs, state_);
  std::vector<at::Tensor> ts = tensors;
  c10d::AllreduceOptions o;
  o.reduceOp = opts.reduceOp;
  o.timeout = opts.timeout;
  const int64_t p = getSize();
  // One header for the list: its digest covers every tensor's size, dtype and path.
  uint64_t digest = static_cast<uint64_t>(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    digest = mix64(digest, static_cast<uint64_t>(ts[i].numel()));
    digest = mix64(digest, static_cast<uint64_t>(ts[i].scalar_type()) * 2 + (reasons[i] == nullptr ? 1 : 0));
  }
  CallSpec spec = spec_for("all_reduce_coalesced", c10d::OpType::ALLREDUCE_COALESCED, ts,
                           static_cast<int64_t>(opts.reduceOp.op_), static_cast<int64_t>(digest >> 1), opts.timeout);
  spec.format = static_cast<int64_t>(format_);
  enqueue(spec, ts[0].device(), [this, work, inner, ts, reasons, avg, o, p](std::exception_ptr cancel,
                                                                            Call& call) mutable {
    if (cancel) {
      work->complete(cancel);
      return;
    }
    try {
      for (size_t i = 0; i < ts.size(); ++i) {
        if (reasons[i] == nullptr) {
          quantized_allreduce(inner, ts[i], avg, next_call_id_++, call);
          continue;
        }
        std::vector<at::Tensor> one{ts[i]};
        c10d::AllreduceOptions oi = o;
        const bool divide = avg && ts[i].device().is_cpu();
        if (divide) oi.reduceOp = c10d::ReduceOp::SUM;
        inner->allreduce(one, oi)->wait();
        if (divide) ts[i].div_(static_cast<double>(p));
      }
      work->complete(nullptr);
    } catch (...) {
      finish(work, std::current_exception());
    }
  });
  return work;
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allreduce_compressed(at::Tensor payload, at::Tensor scales,
                                                                     int64_t numel, int format, int64_t block,
                                                                     bool average, int64_t seed) {
  TORCH_CHECK(format >= 1 && format <= 3, "localsgd all_reduce_compressed: expected format int8/int4/fp8, got code ",
              format);
  const Format f = static_cast<Format>(format);
  TORCH_CHECK(valid_block_size(block), "localsgd all_reduce_compressed: block_size must be a power of two in [",
              kMinBlockSize, ", ", kMaxBlockSize, "], got ", block);
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.dim() == 1 && payload.is_contiguous() &&
                  payload.numel() == payload_bytes(f, numel),
              "localsgd all_reduce_compressed: expected a contiguous 1-D uint8 payload of ", payload_bytes(f, numel),
              " bytes, got ", payload.scalar_type(), " ", payload.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.is_contiguous() &&
                  scales.numel() == num_blocks(numel, block),
              "localsgd all_reduce_compressed: expected contiguous 1-D float32 scales of ", num_blocks(numel, block),
              " blocks, got ", scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(payload.device() == scales.device(), "localsgd all_reduce_compressed: payload and scales on ",
              payload.device(), " and ", scales.device());
  TORCH_CHECK(payload.device().is_cpu() || payload.device().is_cuda(),
              "localsgd all_reduce_compressed: expected CPU or CUDA tensors, got ", payload.device());
  auto inner = inner_for(payload);
  std::vector<c10::Device> devs;
  if (payload.is_cuda()) devs.push_back(payload.device());
  auto work = c10::make_intrusive<LocalSGDWork>(c10d::OpType::ALLREDUCE, std::vector<at::Tensor>{payload, scales}, devs,
                                                state_);
  CallSpec spec;
  spec.what = "all_reduce_compressed";
  spec.kind = kKindCompressed;
  spec.format = format;
  spec.op = average ? 1 : 0;
  spec.numel = numel;
  spec.extra = block;
  enqueue(spec, payload.device(), [this, work, inner, payload, scales, numel, f, block, average,
                                   seed](std::exception_ptr cancel, Call& call) {
    if (cancel) {
      work->complete(cancel);
      return;
    }
    try {
      const int64_t p = getSize(), me = getRank(), n = numel, B = block;
      const Chunking ch = make_chunking(f, n, B, p);
      const int64_t R = ch.record;
      auto bytes = at::TensorOptions().dtype(at::kByte).device(payload.device());
      at::Tensor ws = scratch((3 * p + 1) * R, bytes);
      RoundingMode q;
      q.stochastic = seed >= 0;
      q.seed = seed >= 0 ? static_cast<uint64_t>(seed) : 0;
      const float factor = average ? 1.0f / static_cast<float>(p) : 1.0f;
      // Records are filled from and emptied into the caller's encoded tensor by byte copies.
      auto ops = make_ops(payload.device());
      uint8_t* pay = payload.data_ptr<uint8_t>();
      uint8_t* sc = reinterpret_cast<uint8_t*>(scales.data_ptr<float>());
      ProduceFn produce = [&](const Piece& pc, uint8_t* rec) {
        ops->copy(rec + payload_offset(f, pc.e0), pay + payload_offset(f, pc.g0), payload_bytes(f, pc.valid));
        ops->copy(rec + ch.cap + 4 * pc.b0, sc + 4 * (pc.g0 / B), 4 * num_blocks(pc.valid, B));
      };
      ConsumeFn consume = [&](const Piece& pc, const uint8_t* rec) {
        ops->copy(pay + payload_offset(f, pc.g0), rec + payload_offset(f, pc.e0), payload_bytes(f, pc.valid));
        ops->copy(sc + 4 * (pc.g0 / B), rec + ch.cap + 4 * pc.b0, 4 * num_blocks(pc.valid, B));
      };
      run_pipeline(inner, *ops, p, me, f, B, ch, n, ws, [this](int64_t nb) { return pinned_scratch(nb); }, factor, q,
                   produce, consume, state_.get(), call, next_tag_call_++);
      {
        std::lock_guard<std::mutex> lk(stats_mu_);
        const int64_t wire = (p - 1) * 2 * R;
        stats_.bytes_sent += wire;
        stats_.bytes_received += wire;
        stats_.compressed_calls += 1;
      }
      work->complete(nullptr);
    } catch (...) {
      finish(work, std::current_exception());
    }
  });
  return work;
}

// ---- pass-through -----------------------------------------------------------------------------
#define LSG_DEV(t) ((t).device().type())

namespace {
int64_t nbytes_of(const at::Tensor& t) { return t.numel() * t.element_size(); }
int64_t nbytes_of(const std::vector<at::Tensor>& ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += nbytes_of(t);
  return n;
}
int64_t nbytes_of(const std::vector<std::vector<at::Tensor>>& tss) {
  int64_t n = 0;
  for (const auto& ts : tss) n += nbytes_of(ts);
  return n;
}
// Children of `rank` in a binomial broadcast tree rooted at `root` (gloo's broadcast): each one
// receives the whole tensor from it.
int64_t binomial_children(int64_t rank, int64_t root, int64_t p) {
  const int64_t v = (rank - root + p) % p;
  int64_t children = 0;
  for (int64_t mask = 1; mask < p; mask <<= 1) {
    if (v < mask && v + mask < p) ++children;
  }
  return children;
}
// Bytes of the rows of an all-to-all buffer that go to (or come from) other ranks.
int64_t alltoall_bytes(const at::Tensor& t, const std::vector<int64_t>& splits, int64_t me, int64_t p) {
  const int64_t total = nbytes_of(t);
  if (splits.empty()) return p > 0 ? total - total / p : 0;
  const int64_t rows = t.dim() > 0 ? t.size(0) : 0;
  const int64_t row_bytes = rows > 0 ? total / rows : 0;
  int64_t others = 0;
  for (int64_t r = 0; r < static_cast<int64_t>(splits.size()); ++r) {
    if (r != me) others += splits[r];
  }
  return others * row_bytes;
}
}  // namespace

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                          const c10d::BroadcastOptions& opts) {
  TORCH_CHECK(!tensors.empty(), "localsgd broadcast: expected at least one tensor");
  auto inner = inner_for(tensors[0]);
  std::vector<at::Tensor> ts = tensors;
  const int64_t p = getSize(), me = getRank();
  {
    const int64_t n = nbytes_of(ts);
    const int64_t root = opts.rootRank;
    count_op("broadcast", n * binomial_children(me, root, p), me == root ? 0 : n);
  }
  return passthrough(c10d::OpType::BROADCAST,
                     spec_for("broadcast", c10d::OpType::BROADCAST, ts, -1, opts.rootRank, opts.timeout), ts,
                     LSG_DEV(ts[0]),
                     [inner, ts, opts]() mutable { return inner->broadcast(ts, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::reduce(std::vector<at::Tensor>& tensors,
                                                       const c10d::ReduceOptions& opts) {
  TORCH_CHECK(!tensors.empty(), "localsgd reduce: expected at least one tensor");
  auto inner = inner_for(tensors[0]);
  std::vector<at::Tensor> ts = tensors;
  {
    // reduce-scatter then gather to the root: (p-1)/p of the tensor out of every rank.
    const int64_t p = getSize(), n = nbytes_of(ts);
    count_op("reduce", n - n / p, getRank() == opts.rootRank ? n - n / p : 0);
  }
  return passthrough(c10d::OpType::REDUCE,
                     spec_for("reduce", c10d::OpType::REDUCE, ts, static_cast<int64_t>(opts.reduceOp.op_),
                              opts.rootRank, opts.timeout),
                     ts, LSG_DEV(ts[0]),
                     [inner, ts, opts]() mutable { return inner->reduce(ts, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                          std::vector<at::Tensor>& inputs,
                                                          const c10d::AllgatherOptions& opts) {
  TORCH_CHECK(!inputs.empty(), "localsgd allgather: expected at least one input tensor");
  auto inner = inner_for(inputs[0]);
  auto outs = outputs;
  auto ins = inputs;
  std::vector<at::Tensor> flat;
  for (auto& v : outs) flat.insert(flat.end(), v.begin(), v.end());
  count_ring_share("allgather", (getSize() - 1) * nbytes_of(ins));
  return passthrough(c10d::OpType::ALLGATHER,
                     spec_for("all_gather", c10d::OpType::ALLGATHER, ins, -1, 0, opts.timeout), flat,
                     LSG_DEV(ins[0]),
                     [inner, outs, ins, opts]() mutable { return inner->allgather(outs, ins, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                                const c10d::AllgatherOptions& opts) {
  auto inner = inner_for(input);
  at::Tensor o = output, i = input;
  count_ring_share("allgather", (getSize() - 1) * nbytes_of(i));
  return passthrough(c10d::OpType::_ALLGATHER_BASE,
                     spec_for("all_gather_into_tensor", c10d::OpType::_ALLGATHER_BASE, {i}, -1, 0, opts.timeout), {o},
                     LSG_DEV(i),
                     [inner, o, i, opts]() mutable { return inner->_allgather_base(o, i, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                                    std::vector<at::Tensor>& inputs,
                                                                    const c10d::AllgatherOptions& opts) {
  TORCH_CHECK(!inputs.empty(), "localsgd allgather_coalesced: expected at least one input tensor");
  auto inner = inner_for(inputs[0]);
  auto outs = outputs;
  auto ins = inputs;
  std::vector<at::Tensor> flat;
  for (auto& v : outs) flat.insert(flat.end(), v.begin(), v.end());
  count_ring_share("allgather", (getSize() - 1) * nbytes_of(ins));
  return passthrough(c10d::OpType::ALLGATHER_COALESCED,
                     spec_for("all_gather_coalesced", c10d::OpType::ALLGATHER_COALESCED, ins, -1, 0, opts.timeout),
                     flat, LSG_DEV(ins[0]),
                     [inner, outs, ins, opts]() mutable { return inner->allgather_coalesced(outs, ins, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                                std::vector<at::Tensor>& inputs,
                                                                                const c10d::AllgatherOptions& opts) {
  TORCH_CHECK(!inputs.empty(), "localsgd allgather_into_tensor_coalesced: expected at least one input tensor");
  auto inner = inner_for(inputs[0]);
  auto outs = outputs;
  auto ins = inputs;
  count_ring_share("allgather", (getSize() - 1) * nbytes_of(ins));
  return passthrough(c10d::OpType::COALESCED,
                     spec_for("all_gather_into_tensor_coalesced", c10d::OpType::COALESCED, ins, -1, 1, opts.timeout),
                     outs, LSG_DEV(ins[0]), [inner, outs, ins, opts]() mutable {
    return inner->allgather_into_tensor_coalesced(outs, ins, opts);
  });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::gather(std::vector<std::vector<at::Tensor>>& outputs,
                                                       std::vector<at::Tensor>& inputs,
                                                       const c10d::GatherOptions& opts) {
  TORCH_CHECK(!inputs.empty(), "localsgd gather: expected at least one input tensor");
  auto inner = inner_for(inputs[0]);
  auto outs = outputs;
  auto ins = inputs;
  std::vector<at::Tensor> flat;
  for (auto& v : outs) flat.insert(flat.end(), v.begin(), v.end());
  const int64_t p = getSize(), me = getRank();
  {
    const int64_t n = nbytes_of(ins);
    const bool root = me == opts.rootRank;
    count_op("gather", root ? 0 : n, root ? (p - 1) * n : 0);
  }
  return passthrough(c10d::OpType::GATHER,
                     spec_for("gather", c10d::OpType::GATHER, ins, -1, opts.rootRank, opts.timeout), flat,
                     LSG_DEV(ins[0]),
                     [inner, outs, ins, opts]() mutable { return inner->gather(outs, ins, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::scatter(std::vector<at::Tensor>& outputs,
                                                        std::vector<std::vector<at::Tensor>>& inputs,
                                                        const c10d::ScatterOptions& opts) {
  TORCH_CHECK(!outputs.empty(), "localsgd scatter: expected at least one output tensor");
  auto inner = inner_for(outputs[0]);
  auto outs = outputs;
  auto ins = inputs;
  const int64_t p = getSize(), me = getRank();
  {
    const int64_t n = nbytes_of(outs);
    const bool root = me == opts.rootRank;
    count_op("scatter", root ? (p - 1) * n : 0, root ? 0 : n);
  }
  return passthrough(c10d::OpType::SCATTER,
                     spec_for("scatter", c10d::OpType::SCATTER, outs, -1, opts.rootRank, opts.timeout), outs,
                     LSG_DEV(outs[0]),
                     [inner, outs, ins, opts]() mutable { return inner->scatter(outs, ins, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                               std::vector<std::vector<at::Tensor>>& inputs,
                                                               const c10d::ReduceScatterOptions& opts) {
  TORCH_CHECK(!outputs.empty(), "localsgd reduce_scatter: expected at least one output tensor");
  auto inner = inner_for(outputs[0]);
  auto outs = outputs;
  auto ins = inputs;
  // gloo reduces the whole input with its all-reduce, then keeps this rank's part
  count_ring_share("reduce_scatter", 2 * (getSize() - 1) * nbytes_of(ins) / getSize());
  return passthrough(c10d::OpType::REDUCE_SCATTER,
                     spec_for("reduce_scatter", c10d::OpType::REDUCE_SCATTER, outs,
                              static_cast<int64_t>(opts.reduceOp.op_), 0, opts.timeout),
                     outs, LSG_DEV(outs[0]),
                     [inner, outs, ins, opts]() mutable { return inner->reduce_scatter(outs, ins, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                     const c10d::ReduceScatterOptions& opts) {
  auto inner = inner_for(input);
  at::Tensor o = output, i = input;
  // gloo reduces the whole input with its all-reduce, then keeps this rank's part
  count_ring_share("reduce_scatter", 2 * (getSize() - 1) * nbytes_of(i) / getSize());
  return passthrough(c10d::OpType::_REDUCE_SCATTER_BASE,
                     spec_for("reduce_scatter_tensor", c10d::OpType::_REDUCE_SCATTER_BASE, {o},
                              static_cast<int64_t>(opts.reduceOp.op_), 0, opts.timeout),
                     {o}, LSG_DEV(i),
                     [inner, o, i, opts]() mutable { return inner->_reduce_scatter_base(o, i, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::ReduceScatterOptions& opts) {
  TORCH_CHECK(!inputs.empty(), "localsgd reduce_scatter_tensor_coalesced: expected at least one input tensor");
  auto inner = inner_for(inputs[0]);
  auto outs = outputs;
  auto ins = inputs;
  // gloo reduces the whole input with its all-reduce, then keeps this rank's part
  count_ring_share("reduce_scatter", 2 * (getSize() - 1) * nbytes_of(ins) / getSize());
  return passthrough(c10d::OpType::COALESCED,
                     spec_for("reduce_scatter_tensor_coalesced", c10d::OpType::COALESCED, outs,
                              static_cast<int64_t>(opts.reduceOp.op_), 2, opts.timeout),
                     outs, LSG_DEV(ins[0]), [inner, outs, ins, opts]() mutable {
    return inner->reduce_scatter_tensor_coalesced(outs, ins, opts);
  });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                              std::vector<int64_t>& output_splits,
                                                              std::vector<int64_t>& input_splits,
                                                              const c10d::AllToAllOptions& opts) {
  auto inner = inner_for(input);
  at::Tensor o = output, i = input;
  auto os = output_splits, is = input_splits;
  const int64_t p = getSize(), me = getRank();
  count_op("alltoall", alltoall_bytes(i, is, me, p), alltoall_bytes(o, os, me, p));
  CallSpec spec = spec_for("all_to_all_single", c10d::OpType::ALLTOALL_BASE, {i}, -1, 0, opts.timeout);
  if (!is.empty() || !os.empty()) spec.numel = -1;  // uneven splits: sizes may differ between ranks
  return passthrough(c10d::OpType::ALLTOALL_BASE, spec, {o}, LSG_DEV(i),
                     [inner, o, i, os, is, opts]() mutable { return inner->alltoall_base(o, i, os, is, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::alltoall(std::vector<at::Tensor>& outputs,
                                                         std::vector<at::Tensor>& inputs,
                                                         const c10d::AllToAllOptions& opts) {
  TORCH_CHECK(!inputs.empty(), "localsgd alltoall: expected at least one input tensor");
  auto inner = inner_for(inputs[0]);
  auto outs = outputs;
  auto ins = inputs;
  const int64_t me = getRank();
  {
    int64_t sent = 0, received = 0;
    for (int64_t r = 0; r < static_cast<int64_t>(ins.size()); ++r) {
      if (r != me) sent += nbytes_of(ins[r]);
    }
    for (int64_t r = 0; r < static_cast<int64_t>(outs.size()); ++r) {
      if (r != me) received += nbytes_of(outs[r]);
    }
    count_op("alltoall", sent, received);
  }
  CallSpec spec = spec_for("all_to_all", c10d::OpType::ALLTOALL, ins, -1, 0, opts.timeout);
  spec.numel = -1;  // the list's sizes may differ between ranks
  return passthrough(c10d::OpType::ALLTOALL, spec, outs, LSG_DEV(ins[0]),
                     [inner, outs, ins, opts]() mutable { return inner->alltoall(outs, ins, opts); });
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::barrier(const c10d::BarrierOptions& opts) {
  // A barrier orders after every collective queued before it (FIFO), like gloo's.
  auto inner = cpu_inner_;
  return passthrough(c10d::OpType::BARRIER, spec_for("barrier", c10d::OpType::BARRIER, {}, -1, 0, opts.timeout), {},
                     c10::DeviceType::CPU,
                     [inner, opts]() mutable { return inner->barrier(opts); });
}

void LocalSGDBackend::check_user_tag(const char* what, int tag) const {
  check_healthy(what);
  TORCH_CHECK(tag < kPhaseTag[0], "localsgd ", what, ": tag ", tag, " is reserved (tags from ", kPhaseTag[0],
              " up carry the compressed all-reduce's messages, on the same inner connections); use a tag below ",
              kPhaseTag[0]);
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::send(std::vector<at::Tensor>& tensors, int dst, int tag) {
  TORCH_CHECK(!tensors.empty(), "localsgd send: expected a tensor");
  check_user_tag("send", tag);
  count_op("send", nbytes_of(tensors), 0);
  return inner_for(tensors[0])->send(tensors, dst, tag);
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::recv(std::vector<at::Tensor>& tensors, int src, int tag) {
  TORCH_CHECK(!tensors.empty(), "localsgd recv: expected a tensor");
  check_user_tag("recv", tag);
  count_op("recv", 0, nbytes_of(tensors));
  return inner_for(tensors[0])->recv(tensors, src, tag);
}

c10::intrusive_ptr<c10d::Work> LocalSGDBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  TORCH_CHECK(!tensors.empty(), "localsgd recvAnysource: expected a tensor");
  check_user_tag("recv", tag);
  count_op("recv", 0, nbytes_of(tensors));
  return inner_for(tensors[0])->recvAnysource(tensors, tag);
}

}  // namespace localsgd
