// The call header's exchange: receives posted ahead (new_call), our header sent when the call is
// made (post_header), every peer's compared on the worker before any data moves (check_call).
#include <algorithm>
#include <cctype>
#include <cstring>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common.h"
#include "localsgd_backend.h"
#include "posted_works.h"
#include "tags.h"

namespace localsgd {
namespace {

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

}  // namespace

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

}  // namespace localsgd
