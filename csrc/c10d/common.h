// Small helpers shared by the backend's files: format and dtype names, the record layout of the
// quantized all-reduce (chunks cut on block boundaries) and a 64-bit mix for seeds and digests.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "localsgd/format.h"
#include "localsgd/kernels.h"

namespace localsgd {

inline const char* format_name(Format f) {
  switch (f) {
    case Format::None: return "none";
    case Format::Int8: return "int8";
    case Format::Int4: return "int4";
    case Format::Fp8: return "fp8";
  }
  return "?";
}

inline DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "localsgd: expected float32, bfloat16 or float16, got ", s);
  }
}

// Payload bytes of elements [0, e) when e is a block multiple (int4: e is even).
inline int64_t payload_offset(Format f, int64_t e) { return f == Format::Int4 ? e / 2 : e; }

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
inline Chunking make_chunking(Format f, int64_t n, int64_t block, int64_t p) {
  Chunking c;
  c.blocks_per_chunk = std::max<int64_t>(1, (num_blocks(n, block) + p - 1) / p);
  c.elems = c.blocks_per_chunk * block;
  c.cap = payload_bytes(f, c.elems);
  c.record = c.cap + 4 * c.blocks_per_chunk;
  return c;
}

inline uint64_t mix64(uint64_t a, uint64_t b) {
  return (static_cast<uint64_t>(mix32(static_cast<uint32_t>(a ^ (b * 0x9E3779B97F4A7C15ull)))) << 32) |
         mix32(static_cast<uint32_t>((a >> 32) ^ b ^ 0x85EBCA6Bu));
}

}  // namespace localsgd
