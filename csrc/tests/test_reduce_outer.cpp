// dequantize_reduce (+ fused requantize) and the fused outer Nesterov step of the CPU kernels,
// against an fp32 replica of the documented expression order (bitwise) and a float64 oracle
// (with the accumulated-rounding tolerance written next to each check).
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "../kernels/cpu/cpu_common.h"
#include "check.h"

using namespace localsgd;
using namespace localsgd::cpu::detail;

namespace {

const Format kFormats[] = {Format::Int8, Format::Int4, Format::Fp8};
const char* fname(Format f) { return f == Format::Int8 ? "int8" : (f == Format::Int4 ? "int4" : "fp8"); }

// p encoded chunks of n elements, stored as interleaved records (payload then scales, each
// record padded), the layout of the c10d backend's receive buffer: exercises both strides.
struct Chunks {
  int64_t p, n, block, pbytes, nblocks, rec_bytes;
  std::vector<uint8_t> buf;
  const uint8_t* payload() const { return buf.data(); }
  const float* scales() const { return reinterpret_cast<const float*>(buf.data() + pbytes_aligned()); }
  int64_t pbytes_aligned() const { return (pbytes + 15) / 16 * 16; }
  int64_t scales_stride() const { return rec_bytes / 4; }
};

Chunks make_chunks(Format f, int64_t p, int64_t n, int64_t block, std::mt19937& g, bool poison = false) {
  Chunks c{p, n, block, payload_bytes(f, n), num_blocks(n, block), 0, {}};
  c.rec_bytes = c.pbytes_aligned() + (c.nblocks * 4 + 15) / 16 * 16 + 16;  // padded records
  c.buf.assign(static_cast<size_t>(p * c.rec_bytes + 16), 0);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t r = 0; r < p; ++r) {
    for (auto& v : x) v = normal(g) * (1.0f + static_cast<float>(r));
    if (poison && r == 1 && n > 0) x[0] = NAN;
    uint8_t* rec = c.buf.data() + r * c.rec_bytes;
    cpu::quantize(f, DType::F32, x.data(), n, block, RoundingMode{}, rec, reinterpret_cast<float*>(rec + c.pbytes_aligned()));
  }
  return c;
}

void test_dequantize_reduce() {
  std::mt19937 g(31);
  int cases = 0;
  for (Format f : kFormats)
    for (int64_t p : {1, 2, 4})
      for (int64_t n : {int64_t(0), int64_t(1), int64_t(1001), 2 * kParallelMinElems + 9})
        for (float factor : {1.0f, 1.0f / 3.0f})
          for (bool sr : {false, true}) {
            ++cases;
            const int64_t block = 128;
            const Chunks c = make_chunks(f, p, n, block, g);
            RoundingMode rm;
            rm.stochastic = sr;
            rm.seed = 17;
            rm.index_offset = 6 * block;
            std::vector<float> sum(static_cast<size_t>(n), -1.0f), osc(static_cast<size_t>(c.nblocks), -1.0f);
            std::vector<uint8_t> opay(static_cast<size_t>(c.pbytes), 0xEE);
            cpu::dequantize_reduce(f, p, c.payload(), c.rec_bytes, c.scales(), c.scales_stride(), n, block, factor, rm,
                                   sum.data(), opay.data(), osc.data());
            for (int64_t i = 0; i < n; ++i) {
              // fp32 replica of format.h's order: acc = 0; acc = acc + q_r * s_r; acc * factor
              float acc = 0.0f;
              double exact = 0.0, mag = 0.0;
              for (int64_t r = 0; r < p; ++r) {
                const float q = decode_q(f, c.payload() + r * c.rec_bytes, i);
                const float s = c.scales()[r * c.scales_stride() + i / block];
                acc = acc + q * s;
                exact += static_cast<double>(q) * s;
                mag += std::fabs(static_cast<double>(q) * s);
              }
              acc = acc * factor;
              CHECK_MSG(f32_bits(sum[i]) == f32_bits(acc), "%s p=%lld n=%lld i=%lld", fname(f), (long long)p,
                        (long long)n, (long long)i);
              // vs float64: each of the p products and p sums and the final multiply rounds
              // once (<= 2^-24 relative of the running magnitude): (2p + 1) 2^-24 sum|terms|
              const double tol = (2.0 * p + 1.0) * 0x1p-24 * mag * factor;
              CHECK_MSG(std::fabs(static_cast<double>(sum[i]) - exact * factor) <= tol, "%s p=%lld i=%lld", fname(f),
                        (long long)p, (long long)i);
            }
            // the fused requantize == quantize(sum) with the same rounding mode and offset
            std::vector<uint8_t> wpay(static_cast<size_t>(c.pbytes));
            std::vector<float> wsc(static_cast<size_t>(c.nblocks));
            cpu::quantize(f, DType::F32, sum.data(), n, block, rm, wpay.data(), wsc.data());
            CHECK_MSG(opay == wpay, "%s p=%lld n=%lld sr=%d requantized bytes", fname(f), (long long)p, (long long)n, sr);
            CHECK(std::memcmp(osc.data(), wsc.data(), wsc.size() * 4) == 0);
            // out_sum only / requantize only give the same results
            std::vector<float> sum2(static_cast<size_t>(n));
            cpu::dequantize_reduce(f, p, c.payload(), c.rec_bytes, c.scales(), c.scales_stride(), n, block, factor, rm,
                                   sum2.data(), nullptr, nullptr);
            CHECK(std::memcmp(sum2.data(), sum.data(), sum.size() * 4) == 0);
            std::vector<uint8_t> opay2(static_cast<size_t>(c.pbytes));
            std::vector<float> osc2(static_cast<size_t>(c.nblocks));
            cpu::dequantize_reduce(f, p, c.payload(), c.rec_bytes, c.scales(), c.scales_stride(), n, block, factor, rm,
                                   nullptr, opay2.data(), osc2.data());
            CHECK(opay2 == opay && std::memcmp(osc2.data(), osc.data(), osc.size() * 4) == 0);
          }
  // a NaN scale in one chunk: that block's sum is NaN, requantizing gives a NaN scale again
  for (Format f : kFormats) {
    const int64_t n = 300, block = 128;
    const Chunks c = make_chunks(f, 3, n, block, g, /*poison=*/true);
    std::vector<float> sum(n), osc(num_blocks(n, block));
    std::vector<uint8_t> opay(payload_bytes(f, n));
    cpu::dequantize_reduce(f, 3, c.payload(), c.rec_bytes, c.scales(), c.scales_stride(), n, block, 1.0f,
                           RoundingMode{}, sum.data(), opay.data(), osc.data());
    for (int64_t i = 0; i < n; ++i) CHECK(std::isnan(sum[i]) == (i < block));
    CHECK(std::isnan(osc[0]) && std::isfinite(osc[1]) && std::isfinite(osc[2]));
  }
  std::printf("dequantize_reduce: %d cases\n", cases);
}

// ---- outer Nesterov step --------------------------------------------------------------------
enum class Mode { Nesterov, Momentum, Plain };

void test_outer_step() {
  std::mt19937 g(41);
  std::normal_distribution<float> normal;
  int cases = 0;
  for (DType d : {DType::F32, DType::BF16, DType::F16})
    for (Format gf : {Format::None, Format::Int8, Format::Int4, Format::Fp8})
      for (Mode mode : {Mode::Nesterov, Mode::Momentum, Mode::Plain})
        for (bool with_params : {true, false})
          for (int64_t n : {int64_t(0), int64_t(1), int64_t(1001), kParallelMinElems + 5}) {
            ++cases;
            const int64_t block = 64;
            const float lr = 0.7f, factor = 0.5f;
            const float mu = mode == Mode::Plain ? 0.0f : 0.9f;
            const bool nesterov = mode == Mode::Nesterov;
            std::vector<float> anchor(n), mom(n), grad(n);
            for (int64_t i = 0; i < n; ++i) {
              anchor[i] = normal(g);
              mom[i] = 0.1f * normal(g);
              grad[i] = 0.01f * normal(g);
            }
            std::vector<uint8_t> gpay(payload_bytes(gf, n));
            std::vector<float> gsc(num_blocks(n, block));
            std::vector<float> gval = grad;  // the gradient the step sees
            if (gf != Format::None) {
              cpu::quantize(gf, DType::F32, grad.data(), n, block, RoundingMode{}, gpay.data(), gsc.data());
              for (int64_t i = 0; i < n; ++i) gval[i] = decode_q(gf, gpay.data(), i) * gsc[i / block] * factor;
            }
            std::vector<float> a_k = anchor, m_k = mom;
            std::vector<float> p32(n, -1.0f);
            std::vector<uint16_t> p16(n, 0xFFFF);
            void* params = !with_params ? nullptr : (d == DType::F32 ? static_cast<void*>(p32.data()) : p16.data());
            cpu::outer_nesterov_step(a_k.data(), mode == Mode::Plain ? nullptr : m_k.data(), d, params,
                                     gf == Format::None ? grad.data() : nullptr, gf,
                                     gf == Format::None ? nullptr : gpay.data(), gsc.data(), factor, n, block, lr, mu,
                                     nesterov);
            for (int64_t i = 0; i < n; ++i) {
              // fp32 replica of kernels.h (torch.optim.SGD's update, dampening 0)
              const float gi = gval[i];
              float b = mom[i], dd = gi;
              if (mu != 0.0f) {
                b = mu * mom[i] + gi;
                dd = nesterov ? gi + mu * b : b;
              }
              const float a = anchor[i] - lr * dd;
              CHECK_MSG(f32_bits(a_k[i]) == f32_bits(a), "anchor: dtype %d %s mode %d i=%lld", (int)d,
                        gf == Format::None ? "fp32" : fname(gf), (int)mode, (long long)i);
              CHECK(f32_bits(m_k[i]) == f32_bits(b));  // untouched when mu == 0
              // float64 formula: a handful of fp32 roundings of O(|anchor| + |g| + |buf|) terms
              const double gd = gi, bd = mu == 0.0f ? 0.0 : static_cast<double>(mu) * mom[i] + gd;
              const double dd64 = mu == 0.0f ? gd : (nesterov ? gd + static_cast<double>(mu) * bd : bd);
              const double a64 = anchor[i] - static_cast<double>(lr) * dd64;
              const double scale = std::fabs(anchor[i]) + std::fabs(gd) + std::fabs(mom[i]);
              CHECK(std::fabs(a_k[i] - a64) <= 8 * 0x1p-24 * scale);
              if (with_params) {
                if (d == DType::F32) CHECK(f32_bits(p32[i]) == f32_bits(a));
                if (d == DType::BF16) CHECK(p16[i] == f32_to_bf16(a));
                if (d == DType::F16) CHECK(p16[i] == f32_to_f16(a));
              }
            }
          }
  // momentum buffer starts at zero (torch's first step clones g): buf = g, d = g + mu g
  {
    std::vector<float> anchor = {1.0f, -2.0f}, mom = {0.0f, 0.0f}, grad = {0.25f, -0.5f};
    cpu::outer_nesterov_step(anchor.data(), mom.data(), DType::F32, nullptr, grad.data(), Format::None, nullptr,
                             nullptr, 1.0f, 2, 64, 0.5f, 0.5f, true);
    CHECK(mom[0] == 0.25f && mom[1] == -0.5f);
    CHECK(anchor[0] == 1.0f - 0.5f * (0.25f + 0.125f) && anchor[1] == -2.0f - 0.5f * (-0.5f - 0.25f));
  }
  std::printf("outer step: %d cases\n", cases);
}

}  // namespace

int main() {
  // both instruction-set paths of the kernels (AVX2 where the CPU has it, and baseline)
  for (bool baseline : {false, true}) {
    localsgd::cpu::detail::baseline_forced() = baseline;
    std::printf("-- %s loops (avx2 available: %d)\n", baseline ? "baseline" : "default", (int)__builtin_cpu_supports("avx2"));
    test_dequantize_reduce();
    test_outer_step();
  }
  return lsgtest::report("test_reduce_outer");
}
