// Shared device code of the CUDA kernels: element loads/stores per dtype, per-element quantize
// following format.h, warp reductions, launch geometry and error recording.
//
// Layout of the block-quantizing kernels (quantize, compress_delta, the requantizing reduce):
// a warp quantizes a tile of kTile = 512 consecutive elements per iteration (grid-stride over
// tiles): lane l holds chunks u = 0..3 of 4 consecutive elements at tile offset u*128 + 4*l
// (16-byte loads for fp32, 8 for bf16/fp16), all loaded before any is used, so a warp keeps
// 2 KiB of fp32 in flight. A quantization block of B <= 512 elements is a set of lanes of one
// or more chunks: its absmax is a segmented shuffle max (B/4 lanes, B <= 128) and a max across
// chunks (B = 256, 512). Every value stays in registers between the absmax and the quantize, so
// DRAM and L2 see one read per input byte. Blocks of 1024-8192 elements take a two-pass warp
// routine (the second pass re-reads the block, mostly from L2).
// Element-wise kernels (dequantize, the reduce, the outer step) give each thread kUnroll chunks
// of 4 elements, kThreads chunks apart (each warp-wide load is contiguous), loads first.
// Indices are int64 throughout (buffers may exceed 2^31 elements); block indices are shifts
// (block sizes are powers of two; a 64-bit division costs tens of instructions).
// All arithmetic is fp32 in the order of format.h; nvcc gets --fmad=false so a*b+c is never
// contracted into an FMA.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "localsgd/format.h"
#include "localsgd/kernels.h"

namespace localsgd {
namespace cuda {
namespace detail {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps per CTA: 8 quantization blocks in flight per CTA
constexpr int kChunk = 4;      // elements per lane per step (16 bytes of fp32)
constexpr int kTileChunks = 4;  // chunks per lane per tile of the block-quantizing kernels
constexpr int kTile = kWarp * kChunk * kTileChunks;  // 512 elements per warp and iteration
constexpr int kUnroll = 4;      // chunks per thread and iteration of the element-wise kernels

// ---- error recording (last_error) ------------------------------------------------------------
void set_error(const char* what);
void clear_error();
// Records the launch error of the kernel just launched (no sync: only launch/config errors).
void check_launch(const char* kernel);

// Grid size for grid-stride kernels: one CTA per items_per_cta work items (every warp does one
// iteration), unless a cap of CTAs per SM was set (set_grid_cap, for benchmarks; the SM count
// is then cached per device).
int grid_for(int64_t work_items, int items_per_cta);

// log2 of a power-of-two block size (the launchers pass shifts, not divisors).
inline int log2_block(int64_t block) { return 63 - __builtin_clzll(static_cast<unsigned long long>(block)); }

// Elements i .. i+m-1 with m = clamp(n - i, 0, 4): how many of a chunk exist.
__device__ __forceinline__ int chunk_len(int64_t n, int64_t i) {
  const int64_t r = n - i;
  return r >= kChunk ? kChunk : (r > 0 ? static_cast<int>(r) : 0);
}

// ---- element access ----------------------------------------------------------------------------
template <DType D> struct Elem;
template <> struct Elem<DType::F32> {
  using T = float;
  static __device__ __forceinline__ float to_f32(T v) { return v; }
  static __device__ __forceinline__ T from_f32(float v) { return v; }
};
template <> struct Elem<DType::BF16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float to_f32(T v) { return __bfloat162float(v); }  // exact
  static __device__ __forceinline__ T from_f32(float v) { return __float2bfloat16_rn(v); }  // RNE
};
template <> struct Elem<DType::F16> {
  using T = __half;
  static __device__ __forceinline__ float to_f32(T v) { return __half2float(v); }  // exact
  static __device__ __forceinline__ T from_f32(float v) { return __float2half_rn(v); }  // RNE
};

__device__ __forceinline__ bool aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(bytes - 1)) == 0;
}

// Load 4 consecutive elements starting at i (all < n); vectorized when the address allows.
template <DType D>
__device__ __forceinline__ void load4(const void* base, int64_t i, float v[4]) {
  using E = Elem<D>;
  const typename E::T* p = static_cast<const typename E::T*>(base) + i;
  if (aligned(p, 4 * sizeof(typename E::T))) {
    if constexpr (D == DType::F32) {
      const float4 t = *reinterpret_cast<const float4*>(p);
      v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
    } else {
      const uint2 t = *reinterpret_cast<const uint2*>(p);
      typename E::T h[4];
      memcpy(h, &t, 8);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = E::to_f32(h[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = E::to_f32(p[k]);
  }
}

// Load m (< 4) elements starting at i; the rest of v is 0.
template <DType D>
__device__ __forceinline__ void load_tail(const void* base, int64_t i, int m, float v[4]) {
  using E = Elem<D>;
  const typename E::T* p = static_cast<const typename E::T*>(base) + i;
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = k < m ? E::to_f32(p[k]) : 0.0f;
}

template <DType D>
__device__ __forceinline__ void store4(void* base, int64_t i, const float v[4]) {
  using E = Elem<D>;
  typename E::T* p = static_cast<typename E::T*>(base) + i;
  if (aligned(p, 4 * sizeof(typename E::T))) {
    if constexpr (D == DType::F32) {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      typename E::T h[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) h[k] = E::from_f32(v[k]);
      uint2 t;
      memcpy(&t, h, 8);
      *reinterpret_cast<uint2*>(p) = t;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) p[k] = E::from_f32(v[k]);
  }
}

template <DType D>
__device__ __forceinline__ void store_n(void* base, int64_t i, int m, const float v[4]) {
  if (m == 4) { store4<D>(base, i, v); return; }
  using E = Elem<D>;
  typename E::T* p = static_cast<typename E::T*>(base) + i;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (k < m) p[k] = E::from_f32(v[k]);
}

__device__ __forceinline__ void load_f32(const float* base, int64_t i, int m, float v[4]) {
  if (m == 4) load4<DType::F32>(base, i, v); else load_tail<DType::F32>(base, i, m, v);
}
__device__ __forceinline__ void store_f32(float* base, int64_t i, int m, const float v[4]) {
  store_n<DType::F32>(base, i, m, v);
}

// ---- payload access ------------------------------------------------------------------------------
// Decode float(q) of elements i..i+m-1 (i a multiple of 4, so int4 starts on a byte boundary).
template <Format F>
__device__ __forceinline__ void decode4(const uint8_t* payload, int64_t i, int m, float q[4]) {
  if constexpr (F == Format::Int4) {
    const uint8_t* p = payload + (i >> 1);
    uint8_t b0, b1 = 0;
    if (m == 4 && aligned(p, 2)) {
      const uint16_t t = *reinterpret_cast<const uint16_t*>(p);
      b0 = static_cast<uint8_t>(t & 0xFF); b1 = static_cast<uint8_t>(t >> 8);
    } else {
      b0 = p[0];
      if (m > 2) b1 = p[1];
    }
    q[0] = static_cast<float>(int4_lo(b0));
    q[1] = m > 1 ? static_cast<float>(int4_hi(b0)) : 0.0f;
    q[2] = m > 2 ? static_cast<float>(int4_lo(b1)) : 0.0f;
    q[3] = m > 3 ? static_cast<float>(int4_hi(b1)) : 0.0f;
  } else {
    uint8_t b[4] = {0, 0, 0, 0};
    const uint8_t* p = payload + i;
    if (m == 4 && aligned(p, 4)) {
      const uint32_t t = *reinterpret_cast<const uint32_t*>(p);
      b[0] = t & 0xFF; b[1] = (t >> 8) & 0xFF; b[2] = (t >> 16) & 0xFF; b[3] = t >> 24;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) if (k < m) b[k] = p[k];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (F == Format::Int8) q[k] = static_cast<float>(static_cast<int8_t>(b[k]));
      else q[k] = e4m3_decode(b[k]);
    }
  }
}

// Encode the 4 codes of elements i..i+m-1 (int8/int4: signed q; fp8: the e4m3 code).
// For int4 an odd tail leaves the last high nibble 0 (format.h).
template <Format F>
__device__ __forceinline__ void encode4(uint8_t* payload, int64_t i, int m, const int32_t q[4]) {
  if constexpr (F == Format::Int4) {
    uint8_t* p = payload + (i >> 1);
    const uint8_t b0 = pack_int4(q[0], m > 1 ? q[1] : 0);
    const uint8_t b1 = pack_int4(m > 2 ? q[2] : 0, m > 3 ? q[3] : 0);
    if (m == 4 && aligned(p, 2)) {
      *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(b0 | (b1 << 8));
    } else {
      p[0] = b0;
      if (m > 2) p[1] = b1;
    }
  } else {
    uint8_t* p = payload + i;
    if (m == 4 && aligned(p, 4)) {
      *reinterpret_cast<uint32_t*>(p) = (static_cast<uint32_t>(q[0]) & 0xFF) | ((static_cast<uint32_t>(q[1]) & 0xFF) << 8) |
                                        ((static_cast<uint32_t>(q[2]) & 0xFF) << 16) | (static_cast<uint32_t>(q[3]) << 24);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) if (k < m) p[k] = static_cast<uint8_t>(q[k] & 0xFF);
    }
  }
}

// ---- quantization (format.h, element by element) ------------------------------------------------
// |x| as fp32 bits: the integer max over a block is the float absmax, and any NaN/Inf gives a
// value >= 0x7F800000, so one max-reduction yields absmax and the non-finite flag.
__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const uint32_t w = __shfl_xor_sync(0xFFFFFFFFu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__device__ __forceinline__ BlockQuant block_params_from_bits(uint32_t amax_bits, Format f) {
  const bool nonfinite = amax_bits >= 0x7F800000u;
  BlockQuant b = block_params(nonfinite ? 0.0f : __uint_as_float(amax_bits), nonfinite, f);
  if (nonfinite) b.scale = __uint_as_float(0x7FC00000u);  // the host NAN bits, whatever nvcc makes of NAN
  return b;
}

// q for element with flat index gi (already including index_offset).
template <Format F, bool SR>
__device__ __forceinline__ int32_t quant_elem(float x, const BlockQuant& b, uint32_t key, uint64_t gi) {
  if (b.zero) return 0;
  const float v = scaled_value(x, b, F);
  if constexpr (F == Format::Fp8) {
    if constexpr (SR) {
      const uint32_t rb = rand_bits(key, gi);
      return e4m3_encode_sr(v, rb, static_cast<float>(rb >> 8) * 5.9604644775390625e-08f);
    } else {
      return e4m3_encode_rn(v);
    }
  } else {
    if constexpr (SR) return quant_int_sr(v, rand_uniform(key, gi), qmax(F));
    else return quant_int_rn(v);
  }
}

// q of an element already scaled and clamped (v = clamp(x * inv, +-qmax)): the common case of
// quant_elem (a finite, non-zero block with a normal scale) without its per-element branches.
// Round to nearest: cvt.rni (round half to even, exact for |v| <= 448) equals format.h's
// round_half_even; stochastic rounding as format.h.
template <Format F, bool SR>
__device__ __forceinline__ int32_t quant_scaled(float v, uint32_t key, uint64_t gi) {
  if constexpr (F == Format::Fp8) {
    if constexpr (SR) {
      const uint32_t rb = rand_bits(key, gi);
      return e4m3_encode_sr(v, rb, static_cast<float>(rb >> 8) * 5.9604644775390625e-08f);
    } else {
      return e4m3_encode_rn(v);
    }
  } else {
    if constexpr (SR) return quant_int_sr(v, rand_uniform(key, gi), qmax(F));
    else return __float2int_rn(v);
  }
}

template <Format F>
__device__ __forceinline__ float dequant_elem(int32_t q, float scale) {
  if constexpr (F == Format::Fp8) return e4m3_decode(static_cast<uint8_t>(q)) * scale;
  else return static_cast<float>(q) * scale;
}

// Generic block-quantizing warp routine. Src::load(i, m, v) produces the fp32 values to
// quantize (elements i..i+m-1, i relative to the buffer start); Sink::put(i, m, v, deq) sees the
// values and their dequantized form (for error feedback / delta outputs).
template <Format F, bool SR, class Src, class Sink>
__device__ __forceinline__ void quantize_block_warp(const Src& src, Sink& sink, int64_t blk, int64_t n,
                                                    int64_t block, uint32_t key, uint64_t index_offset,
                                                    uint8_t* payload, float* scales, int lane) {
  const int64_t start = blk * block;
  const int64_t len = (n - start) < block ? (n - start) : block;
  uint32_t amax = 0;
  for (int64_t j = static_cast<int64_t>(lane) * kChunk; j < len; j += kWarp * kChunk) {
    const int m = (len - j) < kChunk ? static_cast<int>(len - j) : kChunk;
    float v[4];
    src.load(start + j, m, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t a = abs_bits(v[k]);  // tail entries are 0
      amax = a > amax ? a : amax;
    }
  }
  amax = warp_max(amax);
  const BlockQuant b = block_params_from_bits(amax, F);
  if (lane == 0) scales[blk] = b.scale;
  for (int64_t j = static_cast<int64_t>(lane) * kChunk; j < len; j += kWarp * kChunk) {
    const int m = (len - j) < kChunk ? static_cast<int>(len - j) : kChunk;
    float v[4], d[4];
    int32_t q[4];
    src.load(start + j, m, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      q[k] = k < m ? quant_elem<F, SR>(v[k], b, key, index_offset + static_cast<uint64_t>(start + j + k)) : 0;
      d[k] = dequant_elem<F>(q[k], b.scale);
    }
    encode4<F>(payload, start + j, m, q);
    sink.put(start + j, m, v, d);
  }
}

// The tile routine (see the file header) for block sizes 16..512 (lb = log2(block)): one
// iteration of a warp over elements tile*kTile .. +kTile-1 (those below n).
template <Format F, bool SR, class Src, class Sink>
__device__ __forceinline__ void quantize_tile_warp(const Src& src, Sink& sink, int64_t tile, int64_t n, int lb,
                                                   uint32_t key, uint64_t index_offset, uint8_t* payload,
                                                   float* scales, int lane) {
  const int64_t base = tile * kTile + static_cast<int64_t>(lane) * kChunk;
  float v[kTileChunks][4];
  int m[kTileChunks];
#pragma unroll
  for (int u = 0; u < kTileChunks; ++u) {
    const int64_t i = base + u * (kWarp * kChunk);
    m[u] = chunk_len(n, i);
    if (m[u] > 0) {
      src.load(i, m[u], v[u]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) v[u][k] = 0.0f;
    }
  }
  uint32_t amax[kTileChunks];
#pragma unroll
  for (int u = 0; u < kTileChunks; ++u) {
    uint32_t a = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t b = abs_bits(v[u][k]);  // tail entries are 0
      a = b > a ? b : a;
    }
    amax[u] = a;
  }
  // lanes per block within one chunk row: B/4 for B <= 128, else the whole warp
  const int seg = lb >= 7 ? kWarp : (1 << (lb - 2));
#pragma unroll
  for (int u = 0; u < kTileChunks; ++u) {
    for (int o = seg >> 1; o > 0; o >>= 1) {  // uniform trip count: every lane shuffles
      const uint32_t w = __shfl_xor_sync(0xFFFFFFFFu, amax[u], o);
      amax[u] = w > amax[u] ? w : amax[u];
    }
  }
  if (lb >= 8) {  // B = 256: chunk rows (0,1) and (2,3) share a block
    amax[0] = amax[1] = (amax[0] > amax[1] ? amax[0] : amax[1]);
    amax[2] = amax[3] = (amax[2] > amax[3] ? amax[2] : amax[3]);
  }
  if (lb >= 9) {  // B = 512: all four
    amax[0] = amax[1] = amax[2] = amax[3] = (amax[0] > amax[2] ? amax[0] : amax[2]);
  }
#pragma unroll
  for (int u = 0; u < kTileChunks; ++u) {
    if (m[u] == 0) continue;
    const int64_t i = base + u * (kWarp * kChunk);
    const BlockQuant b = block_params_from_bits(amax[u], F);
    if ((i & ((int64_t{1} << lb) - 1)) == 0) scales[i >> lb] = b.scale;  // the block's first chunk
    float d[4];
    int32_t q[4];
    if (!b.zero && !b.divide) {
      // The common case, branch-free per element (tail entries are 0 and quantize to 0).
      const float qm = qmax(F);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float sv = fminf(fmaxf(v[u][k] * b.inv, -qm), qm);  // format.h scaled_value, x finite
        q[k] = quant_scaled<F, SR>(sv, key, index_offset + static_cast<uint64_t>(i + k));
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        q[k] = k < m[u] ? quant_elem<F, SR>(v[u][k], b, key, index_offset + static_cast<uint64_t>(i + k)) : 0;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) d[k] = dequant_elem<F>(q[k], b.scale);
    encode4<F>(payload, i, m[u], q);
    sink.put(i, m[u], v[u], d);
  }
}

struct NoSink {
  __device__ __forceinline__ void put(int64_t, int, const float*, const float*) const {}
};

// Grid-stride driver of both routines: tiles of kTile elements for B <= kTile, whole
// quantization blocks otherwise. Launch with kThreads threads and grid_for(quant_work_items(..)).
template <Format F, bool SR, class Src, class Sink>
__device__ __forceinline__ void quantize_all(const Src& src, Sink& sink, int64_t n, int lb, uint32_t key,
                                             uint64_t index_offset, uint8_t* payload, float* scales) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / kWarp);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  if ((int64_t{1} << lb) <= kTile) {
    const int64_t tiles = (n + kTile - 1) / kTile;
    for (int64_t t = first; t < tiles; t += warps)
      quantize_tile_warp<F, SR>(src, sink, t, n, lb, key, index_offset, payload, scales, lane);
  } else {
    const int64_t block = int64_t{1} << lb;
    const int64_t nblocks = (n + block - 1) / block;
    for (int64_t blk = first; blk < nblocks; blk += warps)
      quantize_block_warp<F, SR>(src, sink, blk, n, block, key, index_offset, payload, scales, lane);
  }
}

// Warps' work items of quantize_all: tiles, or blocks when the block is larger than a tile.
inline int64_t quant_work_items(int64_t n, int64_t block) {
  return block <= kTile ? (n + kTile - 1) / kTile : (n + block - 1) / block;
}

// Dispatch helpers: turn runtime enums into template parameters.
template <class Fn>
void dispatch_format(Format f, Fn&& fn) {
  switch (f) {
    case Format::Int8: fn(std::integral_constant<Format, Format::Int8>{}); break;
    case Format::Int4: fn(std::integral_constant<Format, Format::Int4>{}); break;
    case Format::Fp8: fn(std::integral_constant<Format, Format::Fp8>{}); break;
    default: set_error("localsgd cuda: format must be int8, int4 or fp8"); break;
  }
}
template <class Fn>
void dispatch_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::F32: fn(std::integral_constant<DType, DType::F32>{}); break;
    case DType::BF16: fn(std::integral_constant<DType, DType::BF16>{}); break;
    case DType::F16: fn(std::integral_constant<DType, DType::F16>{}); break;
    default: set_error("localsgd cuda: dtype must be float32, bfloat16 or float16"); break;
  }
}
template <class Fn>
void dispatch_bool(bool b, Fn&& fn) {
  if (b) fn(std::true_type{}); else fn(std::false_type{});
}

}  // namespace detail
}  // namespace cuda
}  // namespace localsgd
