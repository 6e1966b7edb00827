// quantize / dequantize / compress_delta of the CPU kernels against
//  (1) a scalar reference that applies format.h step by step (bytes and scales must be
//      identical, round to nearest and stochastic), and
//  (2) a float64 oracle with the format's error bound,
// on normal, heavy-tailed, zero, constant, denormal, huge, odd-length, empty and 1-element
// inputs, for every format, input dtype and several block sizes; plus the NaN/Inf contract,
// stochastic rounding (reproducible, unbiased), index_offset slices and error feedback.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../kernels/cpu/cpu_common.h"
#include "check.h"

using namespace localsgd;
using namespace localsgd::cpu::detail;

namespace {

const Format kFormats[] = {Format::Int8, Format::Int4, Format::Fp8};
const DType kDTypes[] = {DType::F32, DType::BF16, DType::F16};
const char* fname(Format f) { return f == Format::Int8 ? "int8" : (f == Format::Int4 ? "int4" : "fp8"); }
const char* dname(DType d) { return d == DType::F32 ? "f32" : (d == DType::BF16 ? "bf16" : "f16"); }

// Storage of n values of dtype d, filled from fp32 (rounded to d), and the fp32 values the
// kernels see after widening (exact).
struct Input {
  std::vector<float> f32;      // F32 storage
  std::vector<uint16_t> half;  // BF16/F16 storage
  std::vector<float> value;    // widened values
  const void* ptr(DType d) const { return d == DType::F32 ? static_cast<const void*>(f32.data()) : half.data(); }
};
Input make_input(const std::vector<float>& x, DType d) {
  Input in;
  in.value.resize(x.size());
  if (d == DType::F32) {
    in.f32 = x;
    in.value = x;
  } else {
    in.half.resize(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      in.half[i] = d == DType::BF16 ? f32_to_bf16(x[i]) : f32_to_f16(x[i]);
      in.value[i] = d == DType::BF16 ? bf16_to_f32(in.half[i]) : f16_to_f32(in.half[i]);
    }
  }
  return in;
}

struct Encoded {
  std::vector<uint8_t> payload;
  std::vector<float> scales;
};

// format.h, literally, one element at a time.
Encoded ref_quantize(Format f, const std::vector<float>& x, int64_t block, RoundingMode rm) {
  const int64_t n = static_cast<int64_t>(x.size());
  Encoded e;
  e.payload.assign(static_cast<size_t>(payload_bytes(f, n)), 0);
  e.scales.assign(static_cast<size_t>(num_blocks(n, block)), 0.0f);
  const uint32_t key = seed_key(rm.seed);
  for (int64_t k = 0; k < num_blocks(n, block); ++k) {
    const int64_t s = k * block, t = std::min(n, s + block);
    float absmax = 0.0f;
    bool nonfinite = false;
    for (int64_t i = s; i < t; ++i) {
      nonfinite |= !std::isfinite(x[i]);
      absmax = std::fabs(x[i]) > absmax ? std::fabs(x[i]) : absmax;
    }
    const BlockQuant b = block_params(absmax, nonfinite, f);
    e.scales[k] = b.scale;
    for (int64_t i = s; i < t; ++i) {
      const uint64_t idx = static_cast<uint64_t>(rm.index_offset + i);
      int32_t q = 0;
      uint8_t code = 0;
      if (!b.zero) {
        const float v = scaled_value(x[i], b, f);
        if (f == Format::Fp8)
          code = rm.stochastic ? e4m3_encode_sr(v, rand_bits(key, idx), rand_uniform(key, idx)) : e4m3_encode_rn(v);
        else
          q = rm.stochastic ? quant_int_sr(v, rand_uniform(key, idx), qmax(f)) : quant_int_rn(v);
      }
      if (f == Format::Int8) e.payload[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
      if (f == Format::Int4) e.payload[i / 2] |= static_cast<uint8_t>((q & 0xF) << ((i & 1) ? 4 : 0));
      if (f == Format::Fp8) e.payload[i] = code;
    }
  }
  return e;
}

Encoded run_quantize(Format f, DType d, const Input& in, int64_t block, RoundingMode rm) {
  const int64_t n = static_cast<int64_t>(in.value.size());
  Encoded e;
  e.payload.assign(static_cast<size_t>(payload_bytes(f, n)), 0xAB);  // garbage: the kernel must write all
  e.scales.assign(static_cast<size_t>(num_blocks(n, block)), -1.0f);
  cpu::quantize(f, d, in.ptr(d), n, block, rm, e.payload.data(), e.scales.data());
  return e;
}

bool same_scale(float a, float b) { return f32_bits(a) == f32_bits(b) || (std::isnan(a) && std::isnan(b)); }

bool same_encoding(const Encoded& a, const Encoded& b) {
  if (a.payload != b.payload || a.scales.size() != b.scales.size()) return false;
  for (size_t k = 0; k < a.scales.size(); ++k)
    if (!same_scale(a.scales[k], b.scales[k])) return false;
  return true;
}

std::vector<float> run_dequantize(Format f, const Encoded& e, int64_t n, int64_t block) {
  std::vector<float> out(static_cast<size_t>(n), -7.0f);
  cpu::dequantize(f, e.payload.data(), e.scales.data(), n, block, DType::F32, out.data());
  return out;
}

// ---- input generators -----------------------------------------------------------------------
enum class Kind { Normal, Heavy, Zero, Constant, Denormal, Huge };
const Kind kKinds[] = {Kind::Normal, Kind::Heavy, Kind::Zero, Kind::Constant, Kind::Denormal, Kind::Huge};
const char* kname(Kind k) {
  const char* names[] = {"normal", "heavy-tailed", "zero", "constant", "denormal", "huge"};
  return names[static_cast<int>(k)];
}

std::vector<float> generate(Kind kind, DType d, int64_t n, std::mt19937& g) {
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> unif(0.01f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) {
    switch (kind) {
      case Kind::Normal: v = normal(g); break;
      case Kind::Heavy: v = normal(g) / unif(g) / unif(g); break;  // ratio of normals: Cauchy-like tails
      case Kind::Zero: v = (g() & 1) ? 0.0f : -0.0f; break;
      case Kind::Constant: v = -3.7f; break;
      // below the dtype's smallest normal, so scales are subnormal (fp32/bf16: the x/scale path)
      case Kind::Denormal: v = normal(g) * (d == DType::F16 ? 1e-5f : 1e-39f); break;
      // near the dtype's max (half of FLT_MAX for fp32/bf16, see test_flt_max for FLT_MAX itself)
      case Kind::Huge: v = (d == DType::F16 ? 6.5e4f : 1.7e38f) * (2.0f * unif(g) - 1.0f); break;
    }
  }
  return x;
}

// Per-element error bound of round to nearest (format.h), in double:
//  int8/int4: |x - x'| <= scale/2, widened by the two fp32 roundings of v = x * (1/scale)
//             (<= 2^-23 |v| <= qmax 2^-23 in units of the scale) and the fp32 multiply of the
//             dequantize (<= 2^-24 |x'|);
//  fp8:       half an e4m3 ulp of v: <= 2^-4 |x| (normal range) or 2^-10 scale (subnormal
//             range), widened the same way (relative 2^-20 covers the roundings of v).
double rn_bound(Format f, double x, double xq, double scale) {
  if (f == Format::Fp8) return (std::ldexp(std::fabs(x), -4) + std::ldexp(scale, -10)) * (1 + 0x1p-20) + std::ldexp(std::fabs(xq), -24);
  return scale * (0.5 + qmax(f) * 0x1p-23) + std::ldexp(std::fabs(xq), -24);
}

void test_round_to_nearest() {
  std::mt19937 g(1234);
  const int64_t blocks[] = {16, 128, 8192};
  int cases = 0;
  for (Format f : kFormats)
    for (DType d : kDTypes)
      for (int64_t block : blocks)
        for (Kind kind : kKinds) {
          const int64_t sizes[] = {0, 1, 17, 1001, 3 * block + 5};
          for (int64_t n : sizes) {
            ++cases;
            const Input in = make_input(generate(kind, d, n, g), d);
            const RoundingMode rn{};
            const Encoded got = run_quantize(f, d, in, block, rn);
            const Encoded want = ref_quantize(f, in.value, block, rn);
            CHECK_MSG(same_encoding(got, want), "%s %s block=%lld %s n=%lld: bytes differ from format.h", fname(f),
                      dname(d), (long long)block, kname(kind), (long long)n);
            const std::vector<float> xq = run_dequantize(f, got, n, block);
            for (int64_t i = 0; i < n; ++i) {
              const double x = in.value[i], s = got.scales[i / block];
              const double err = std::fabs(x - static_cast<double>(xq[i]));
              CHECK_MSG(std::isfinite(s) && err <= rn_bound(f, x, xq[i], s),
                        "%s %s block=%lld %s n=%lld i=%lld: x=%a x'=%a scale=%a", fname(f), dname(d),
                        (long long)block, kname(kind), (long long)n, (long long)i, x, xq[i], s);
              // dequantize = float(q) * scale exactly
              const double q = f == Format::Fp8 ? e4m3_decode(got.payload[i]) : decode_q(f, got.payload.data(), i);
              CHECK(f32_bits(xq[i]) == f32_bits(static_cast<float>(q) * got.scales[i / block]));
            }
            if (kind == Kind::Zero)
              for (float s : got.scales) CHECK(s == 0.0f);
            if (kind == Kind::Constant && f != Format::Int4)  // -3.7 is exactly -qmax * scale
              for (int64_t i = 0; i < n; ++i) CHECK(std::fabs(xq[i] - in.value[i]) <= 4e-7f * 3.7f);
            // dequantize into bf16/fp16: the fp32 result cast with round-to-nearest-even
            for (DType od : {DType::BF16, DType::F16}) {
              std::vector<uint16_t> o(static_cast<size_t>(n));
              cpu::dequantize(f, got.payload.data(), got.scales.data(), n, block, od, o.data());
              for (int64_t i = 0; i < n; ++i)
                CHECK(o[i] == (od == DType::BF16 ? f32_to_bf16(xq[i]) : f32_to_f16(xq[i])));
            }
          }
        }
  std::printf("round to nearest: %d cases\n", cases);
}

// A threaded run (n above the OpenMP threshold) gives the same bytes as the scalar reference.
void test_large_threaded() {
  std::mt19937 g(99);
  const int64_t n = 3 * kParallelMinElems + 77;
  for (Format f : kFormats)
    for (bool sr : {false, true}) {
      const Input in = make_input(generate(Kind::Heavy, DType::F32, n, g), DType::F32);
      RoundingMode rm;
      rm.stochastic = sr;
      rm.seed = 0xDEADBEEFCAFEull;
      CHECK_MSG(same_encoding(run_quantize(f, DType::F32, in, 128, rm), ref_quantize(f, in.value, 128, rm)),
                "%s sr=%d large", fname(f), sr);
    }
}

// |x| = FLT_MAX: for int8, FLT_MAX/127 rounds up so 127 * scale would overflow; format.h then
// steps the scale one ulp toward zero. Every format must dequantize finite and within half a
// step of the scale (int4/fp8 happen to reproduce FLT_MAX exactly).
void test_flt_max() {
  const std::vector<float> x = {FLT_MAX, -FLT_MAX, 1.0f};
  for (Format f : kFormats) {
    const Input in = make_input(x, DType::F32);
    const Encoded e = run_quantize(f, DType::F32, in, 16, RoundingMode{});
    CHECK(same_encoding(e, ref_quantize(f, in.value, 16, RoundingMode{})));
    CHECK(std::isfinite(e.scales[0]) && e.scales[0] * qmax(f) <= FLT_MAX);
    const std::vector<float> xq = run_dequantize(f, e, 3, 16);
    CHECK(std::isfinite(xq[0]) && std::isfinite(xq[1]));
    CHECK(std::fabs(static_cast<double>(xq[0]) - FLT_MAX) <= 0.5 * e.scales[0]);
    CHECK(xq[1] == -xq[0]);
  }
}

// NaN/Inf contract: the block holding one gets scale NaN and zero bytes; others are unaffected.
void test_nonfinite() {
  std::mt19937 g(5);
  const float bad[] = {NAN, INFINITY, -INFINITY};
  for (Format f : kFormats)
    for (DType d : kDTypes)
      for (float b : bad)
        for (bool sr : {false, true}) {
          const int64_t block = 16, n = 5 * block + 3;
          std::vector<float> x = generate(Kind::Normal, d, n, g);
          x[2 * block + 7] = b;  // block 2
          x[n - 1] = b;          // the short tail block 5
          const Input in = make_input(x, d);
          RoundingMode rm;
          rm.stochastic = sr;
          rm.seed = 3;
          const Encoded e = run_quantize(f, d, in, block, rm);
          CHECK(same_encoding(e, ref_quantize(f, in.value, block, rm)));
          const std::vector<float> xq = run_dequantize(f, e, n, block);
          for (int64_t k = 0; k < num_blocks(n, block); ++k) {
            const bool poisoned = k == 2 || k == 5;
            CHECK_MSG(std::isnan(e.scales[k]) == poisoned, "%s %s block %lld", fname(f), dname(d), (long long)k);
            for (int64_t i = k * block; i < std::min(n, (k + 1) * block); ++i) {
              CHECK(std::isnan(xq[i]) == poisoned);
              if (poisoned) CHECK(decode_q(f, e.payload.data(), i) == 0.0f);
            }
          }
        }
}

// Stochastic rounding: the same seed gives the same bytes, another seed other bytes, and the
// mean error over many seeds is near zero.
void test_stochastic() {
  std::mt19937 g(8);
  const int64_t n = 256, block = 128;
  for (Format f : kFormats) {
    const Input in = make_input(generate(Kind::Normal, DType::F32, n, g), DType::F32);
    RoundingMode rm;
    rm.stochastic = true;
    rm.seed = 42;
    const Encoded a = run_quantize(f, DType::F32, in, block, rm), b = run_quantize(f, DType::F32, in, block, rm);
    CHECK(same_encoding(a, b));
    rm.seed = 43;
    CHECK(run_quantize(f, DType::F32, in, block, rm).payload != a.payload);
    // negative seeds from Python arrive as uint64 bit patterns: any value works
    rm.seed = ~uint64_t(0);
    CHECK(same_encoding(run_quantize(f, DType::F32, in, block, rm), ref_quantize(f, in.value, block, rm)));

    // Unbiasedness. Per element the SR error e = x' - x lies within one quantization step
    // (int: the scale; fp8: one e4m3 ulp of v times the scale, <= 2^-3 |x| + 2^-9 scale), so
    // its standard deviation is <= step/2 and the mean of K independent draws has standard
    // deviation <= step / (2 sqrt(K)). The threshold is 6 of those (a Gaussian 6-sigma event
    // has probability 2e-9 per element; the seeds are fixed, so the test is deterministic),
    // plus the fp32 rounding of v + u (<= qmax 2^-24 steps).
    const int K = 4000;
    std::vector<double> sum(static_cast<size_t>(n), 0.0);
    std::vector<double> rn_err(static_cast<size_t>(n), 0.0);
    for (int r = 0; r < K; ++r) {
      rm.seed = 1000 + static_cast<uint64_t>(r);
      const Encoded e = run_quantize(f, DType::F32, in, block, rm);
      const std::vector<float> xq = run_dequantize(f, e, n, block);
      for (int64_t i = 0; i < n; ++i) sum[i] += static_cast<double>(xq[i]) - in.value[i];
    }
    const Encoded e_rn = run_quantize(f, DType::F32, in, block, RoundingMode{});
    const std::vector<float> xq_rn = run_dequantize(f, e_rn, n, block);
    int rn_would_fail = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double s = e_rn.scales[i / block], x = in.value[i];
      const double step = f == Format::Fp8 ? std::ldexp(std::fabs(x), -3) + std::ldexp(s, -9) : s;
      const double tol = 6.0 * step / (2.0 * std::sqrt(static_cast<double>(K))) + qmax(f) * 0x1p-24 * step;
      CHECK_MSG(std::fabs(sum[i] / K) <= tol, "%s i=%lld: mean SR error %g > %g", fname(f), (long long)i,
                sum[i] / K, tol);
      rn_would_fail += std::fabs(static_cast<double>(xq_rn[i]) - x) > tol;
    }
    // the threshold is tight enough to see the bias of round to nearest on most elements
    CHECK_MSG(rn_would_fail > n / 2, "%s: only %d elements distinguish RN bias", fname(f), rn_would_fail);
  }
}

// Quantizing a slice with index_offset equals the same part of a whole-buffer SR quantize.
void test_index_offset() {
  std::mt19937 g(21);
  const int64_t block = 64, n = 10 * block + 9;
  for (Format f : kFormats) {
    const Input in = make_input(generate(Kind::Normal, DType::F32, n, g), DType::F32);
    RoundingMode rm;
    rm.stochastic = true;
    rm.seed = 777;
    const Encoded whole = run_quantize(f, DType::F32, in, block, rm);
    for (int64_t first_block : {0, 3, 9}) {
      const int64_t start = first_block * block;
      const int64_t len = first_block == 9 ? n - start : 4 * block;
      Input part;
      part.f32.assign(in.f32.begin() + start, in.f32.begin() + start + len);
      part.value = part.f32;
      RoundingMode rs = rm;
      rs.index_offset = start;
      const Encoded e = run_quantize(f, DType::F32, part, block, rs);
      const int64_t pb = payload_bytes(f, start);
      CHECK_MSG(std::equal(e.payload.begin(), e.payload.end(), whole.payload.begin() + pb), "%s slice at %lld",
                fname(f), (long long)start);
      CHECK(std::equal(e.scales.begin(), e.scales.end(), whole.scales.begin() + first_block));
      rs.index_offset = 0;  // without the offset the draws differ
      CHECK(run_quantize(f, DType::F32, part, block, rs).payload != e.payload || first_block == 0);
    }
    // offsets past 2^32 (hi32 of the index enters the hash) match the scalar reference
    rm.index_offset = (int64_t(1) << 32) + 5 * block;
    CHECK(same_encoding(run_quantize(f, DType::F32, in, block, rm), ref_quantize(f, in.value, block, rm)));
  }
}

// compress_delta: bytes == Q(anchor - params [+ residual]); residual <- v - deQ(q).
void test_compress_delta() {
  std::mt19937 g(77);
  std::normal_distribution<float> normal;
  for (Format f : kFormats)
    for (DType d : kDTypes)
      for (int64_t n : {int64_t(0), int64_t(1), int64_t(1001), 2 * kParallelMinElems + 3})
        for (bool ef : {false, true})
          for (bool sr : {false, true}) {
            const int64_t block = 128;
            std::vector<float> anchor(static_cast<size_t>(n)), p32(static_cast<size_t>(n)), res(static_cast<size_t>(n));
            for (int64_t i = 0; i < n; ++i) {
              anchor[i] = normal(g);
              p32[i] = anchor[i] - 0.01f * normal(g);
              res[i] = 0.001f * normal(g);
            }
            const Input params = make_input(p32, d);
            std::vector<float> v(static_cast<size_t>(n));
            for (int64_t i = 0; i < n; ++i) {
              const float delta = anchor[i] - params.value[i];
              v[i] = ef ? delta + res[i] : delta;
            }
            RoundingMode rm;
            rm.stochastic = sr;
            rm.seed = 9;
            Encoded got;
            got.payload.assign(static_cast<size_t>(payload_bytes(f, n)), 0xCD);
            got.scales.assign(static_cast<size_t>(num_blocks(n, block)), -1.0f);
            std::vector<float> res_k = res, delta_out(static_cast<size_t>(n), -1.0f);
            cpu::compress_delta(f, anchor.data(), d, params.ptr(d), ef ? res_k.data() : nullptr, n, block, rm,
                                got.payload.data(), got.scales.data(), delta_out.data());
            CHECK_MSG(same_encoding(got, ref_quantize(f, v, block, rm)), "%s %s n=%lld ef=%d sr=%d", fname(f),
                      dname(d), (long long)n, ef, sr);
            CHECK(std::memcmp(delta_out.data(), v.data(), v.size() * sizeof(float)) == 0);
            const std::vector<float> xq = run_dequantize(f, got, n, block);
            for (int64_t i = 0; i < n; ++i) {
              if (!ef) {
                CHECK(res_k[i] == res[i]);  // untouched
                continue;
              }
              // new residual = fl(v - deQ), so v = deQ + residual up to one fp32 rounding of
              // the residual (half an ulp: <= 2^-24 |residual|)
              CHECK_MSG(f32_bits(res_k[i]) == f32_bits(v[i] - xq[i]), "residual %lld", (long long)i);
              const double recon = static_cast<double>(xq[i]) + res_k[i];
              CHECK(std::fabs(recon - v[i]) <= std::ldexp(std::fabs(static_cast<double>(res_k[i])), -24));
            }
            // without a delta_out the result is the same
            if (!ef) {
              Encoded again = got;
              cpu::compress_delta(f, anchor.data(), d, params.ptr(d), nullptr, n, block, rm, again.payload.data(),
                                  again.scales.data(), nullptr);
              CHECK(same_encoding(again, got));
            }
          }
  // error feedback with a non-finite delta: scale NaN and the residual becomes NaN for that
  // block (v - 0 * NaN), so the caller sees it from the scales and the residual alike.
  std::vector<float> anchor(32, 1.0f), params(32, 0.5f), res(32, 0.0f);
  params[3] = NAN;
  std::vector<uint8_t> pay(32);
  std::vector<float> sc(2);
  cpu::compress_delta(Format::Int8, anchor.data(), DType::F32, params.data(), res.data(), 32, 16, RoundingMode{},
                      pay.data(), sc.data(), nullptr);
  CHECK(std::isnan(sc[0]) && sc[1] == 0.5f / 127.0f);
  CHECK(std::isnan(res[0]) && std::isnan(res[15]) && std::fabs(res[16]) <= 0.5f / 127.0f);
}

}  // namespace

int main() {
  // both instruction-set paths of the kernels (AVX2 where the CPU has it, and baseline)
  for (bool baseline : {false, true}) {
    localsgd::cpu::detail::baseline_forced() = baseline;
    std::printf("-- %s loops (avx2 available: %d)\n", baseline ? "baseline" : "default", (int)__builtin_cpu_supports("avx2"));
    test_round_to_nearest();
    test_large_threaded();
    test_flt_max();
    test_nonfinite();
    test_stochastic();
    test_index_offset();
    test_compress_delta();
  }
  return lsgtest::report("test_quantize");
}
