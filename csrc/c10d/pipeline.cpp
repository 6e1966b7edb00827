// The orchestration of the pipelined all-reduce (phases A, B, C; see pipeline.h) and how records
// are cut into pieces.
#include <algorithm>
#include <utility>

#include <c10/util/Exception.h>

#include "pipeline.h"
#include "tags.h"

namespace localsgd {

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

}  // namespace localsgd
