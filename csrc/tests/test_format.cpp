// Wire-format primitives: e4m3 encode/decode, the vectorizable rewrites used by the CPU
// kernels (checked against format.h), and the torch-free bf16/fp16 conversions (checked
// against hand-verified bit patterns and an independent oracle).
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <random>

#include "../kernels/cpu/cpu_common.h"
#include "check.h"

using namespace localsgd;
using namespace localsgd::cpu::detail;

namespace {

bool is_nan_code(uint32_t c) { return (c & 0x7Fu) == 0x7Fu; }

// Nearest e4m3 code to v (|v| <= 448) by exhaustive search in double; ties -> even code.
uint8_t e4m3_oracle(float v) {
  int best = -1;
  double best_err = 1e300;
  for (int c = 0; c < 128; ++c) {
    if (is_nan_code(c)) continue;
    const double err = std::fabs(std::fabs(static_cast<double>(v)) - static_cast<double>(e4m3_decode(c)));
    if (err < best_err || (err == best_err && (c & 1) == 0)) {
      best = c;
      best_err = err;
    }
  }
  return static_cast<uint8_t>(best | (std::signbit(v) ? 0x80 : 0));
}

void test_e4m3() {
  // every code: the kernels' branch-free decode equals format.h's, bit for bit
  for (uint32_t c = 0; c < 256; ++c)
    CHECK_MSG(f32_bits(e4m3_decode_v(c)) == f32_bits(e4m3_decode(static_cast<uint8_t>(c))), "code 0x%02x", c);
  // every non-NaN code round-trips through encode (both implementations)
  for (uint32_t c = 0; c < 256; ++c) {
    if (is_nan_code(c)) continue;
    const float v = e4m3_decode(static_cast<uint8_t>(c));
    CHECK_MSG(e4m3_encode_rn(v) == c, "format.h encode(decode(0x%02x)) = 0x%02x", c, e4m3_encode_rn(v));
    CHECK_MSG(e4m3_encode_rn_v(v) == c, "kernel encode(decode(0x%02x)) = 0x%02x", c, e4m3_encode_rn_v(v));
  }
  // known values: max, smallest normal/subnormal, signed zero
  CHECK(e4m3_encode_rn(448.0f) == 0x7E);
  CHECK(e4m3_encode_rn(-448.0f) == 0xFE);
  CHECK(e4m3_encode_rn(0.015625f) == 0x08);       // 2^-6, smallest normal
  CHECK(e4m3_encode_rn(0.001953125f) == 0x01);    // 2^-9, smallest subnormal
  CHECK(e4m3_encode_rn(-0.0f) == 0x80);
  CHECK(std::signbit(e4m3_decode(0x80)) && e4m3_decode(0x80) == 0.0f);
  CHECK(e4m3_encode_rn_v(-0.0f) == 0x80);
  // saturation: the clamp in the quantizer may leave v an ulp above 448 -> still 0x7E
  CHECK(e4m3_encode_rn(std::nextafter(448.0f, 1000.0f)) == 0x7E);
  CHECK(e4m3_encode_rn_v(std::nextafter(448.0f, 1000.0f)) == 0x7E);
  // ties to even: every midpoint between neighbouring codes (exact in fp32) goes to the even
  // code, and one ulp either side goes to the nearer code
  for (uint32_t c = 0; c < 0x7E; ++c) {
    const float lo = e4m3_decode(c), hi = e4m3_decode(c + 1);
    const float mid = (lo + hi) * 0.5f;
    const uint32_t even = (c & 1) ? c + 1 : c;
    CHECK_MSG(e4m3_encode_rn(mid) == even && e4m3_encode_rn_v(mid) == even, "midpoint of 0x%02x", c);
    CHECK_MSG(e4m3_encode_rn(-mid) == (even | 0x80) && e4m3_encode_rn_v(-mid) == (even | 0x80), "-midpoint 0x%02x", c);
    CHECK_MSG(e4m3_encode_rn_v(std::nextafter(mid, 0.0f)) == c, "below midpoint of 0x%02x", c);
    CHECK_MSG(e4m3_encode_rn_v(std::nextafter(mid, 1000.0f)) == c + 1, "above midpoint of 0x%02x", c);
  }
  // random values, both ranges, vs the exhaustive-search oracle; SR rewrite vs format.h
  std::mt19937 g(7);
  std::uniform_real_distribution<float> e(-12.0f, 8.8f);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    float v = std::ldexp(1.0f + static_cast<float>(bits(g) & 0xFFFFFF) * 0x1p-24f, static_cast<int>(e(g)));
    v = std::fmin(v, 448.0f);
    if (i & 1) v = -v;
    const uint8_t want = e4m3_oracle(v);
    CHECK_MSG(e4m3_encode_rn(v) == want, "format.h encode(%a) = 0x%02x, oracle 0x%02x", v, e4m3_encode_rn(v), want);
    CHECK_MSG(e4m3_encode_rn_v(v) == want, "kernel encode(%a) = 0x%02x, oracle 0x%02x", v, e4m3_encode_rn_v(v), want);
    const uint32_t r = bits(g);
    const float u = static_cast<float>(r >> 8) * 0x1p-24f;
    CHECK_MSG(e4m3_encode_sr_v(v, r, u) == e4m3_encode_sr(v, r, u), "sr encode(%a, %08x)", v, r);
  }
  CHECK(e4m3_encode_sr_v(448.0f, 0xFFFFFFFFu, 0.99999994f) == 0x7E);  // SR never leaves the range
}

void test_round_helpers() {
  std::mt19937 g(11);
  std::uniform_real_distribution<float> d(-600.0f, 600.0f);
  for (int i = 0; i < 1000000; ++i) {
    float v = d(g);
    if (i % 3 == 0) v = std::round(v * 2.0f) * 0.5f;  // many exact halves: the tie cases
    CHECK_MSG(rne_small(v) == round_half_even(v), "rne_small(%a)", v);
    CHECK_MSG(floor_small(v) == std::floor(v), "floor_small(%a)", v);
  }
  CHECK(rne_small(0.5f) == 0.0f && rne_small(1.5f) == 2.0f && rne_small(2.5f) == 2.0f && rne_small(-2.5f) == -2.0f);
  CHECK(floor_small(-0.5f) == -1.0f && floor_small(-1.0f) == -1.0f && floor_small(127.99999f) == 127.0f);
}

// ---- bf16 / fp16 ----------------------------------------------------------------------------
// Independent oracle: the two representable neighbours, pick the nearer in double, ties to
// the even bit pattern. Works for any format given decode and the truncated pattern.
template <typename Decode>
uint32_t nearest_even(double x, uint32_t lo_pattern, Decode decode) {
  const double a = decode(lo_pattern), b = decode(lo_pattern + 1);
  const double ea = std::fabs(x - a), eb = std::fabs(x - b);
  if (ea < eb) return lo_pattern;
  if (eb < ea) return lo_pattern + 1;
  return (lo_pattern & 1) ? lo_pattern + 1 : lo_pattern;
}

void test_bf16() {
  // hand-checked patterns
  CHECK(f32_to_bf16(1.0f) == 0x3F80);
  CHECK(f32_to_bf16(1.0f + 0x1p-8f) == 0x3F80);         // tie -> even
  CHECK(f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3F82);     // tie -> even (up)
  CHECK(f32_to_bf16(-2.0f) == 0xC000);
  CHECK(f32_to_bf16(FLT_MAX) == 0x7F80);                // rounds up to inf, as torch does
  CHECK(f32_to_bf16(INFINITY) == 0x7F80 && f32_to_bf16(-INFINITY) == 0xFF80);
  CHECK(f32_to_bf16(NAN) == 0x7FC0);
  CHECK(f32_to_bf16(-0.0f) == 0x8000);
  CHECK(f32_to_bf16(0x1p-133f) == 0x0001);              // bf16 subnormal
  // every bf16 widens exactly; every finite bf16 round-trips
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_f32(static_cast<uint16_t>(h));
    CHECK(f32_bits(f) == h << 16);
    if (!std::isnan(f)) CHECK_MSG(f32_to_bf16(f) == h, "bf16 0x%04x", h);
  }
  // random fp32 bit patterns vs the oracle
  std::mt19937 g(3);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 3000000; ++i) {
    const uint32_t u = (i % 4 == 0) ? ((bits(g) & 0xFFFF0000u) | 0x8000u) : bits(g);  // 1/4 exact ties
    const float f = bits_f32(u);
    const uint16_t got = f32_to_bf16(f);
    if (std::isnan(f)) {
      CHECK(std::isnan(bf16_to_f32(got)));
      continue;
    }
    const uint32_t sign = u & 0x80000000u;
    const uint32_t lo = (u & 0x7FFFFFFFu) >> 16;
    auto dec = [](uint32_t p) { return static_cast<double>(bits_f32(p << 16)); };
    // from the midpoint above the largest finite bf16 (0x7F7F, odd) on, the result is inf
    const uint32_t want = ((u & 0x7FFFFFFFu) >= 0x7F7F8000u ? 0x7F80u
                                                            : nearest_even(std::fabs(static_cast<double>(f)), lo, dec)) |
                          (sign >> 16);
    CHECK_MSG(got == want, "bf16(%a) = 0x%04x, want 0x%04x", f, got, want);
  }
}

void test_fp16() {
  CHECK(f32_to_f16(1.0f) == 0x3C00);
  CHECK(f32_to_f16(65504.0f) == 0x7BFF);
  CHECK(f32_to_f16(65519.996f) == 0x7BFF);
  CHECK(f32_to_f16(65520.0f) == 0x7C00);              // tie between 65504 and 2^16 -> even = inf
  CHECK(f32_to_f16(0x1p-24f) == 0x0001);
  CHECK(f32_to_f16(0x1p-25f) == 0x0000);              // tie -> even (zero)
  CHECK(f32_to_f16(1.5f * 0x1p-24f) == 0x0002);       // tie -> even (up)
  CHECK(f32_to_f16(0x1p-14f) == 0x0400);              // smallest normal
  CHECK(f32_to_f16(std::nextafter(0x1p-14f, 0.0f)) == 0x0400);
  CHECK(f32_to_f16(-0.0f) == 0x8000);
  CHECK(f32_to_f16(INFINITY) == 0x7C00 && f32_to_f16(-INFINITY) == 0xFC00);
  CHECK(f32_to_f16(FLT_MAX) == 0x7C00);
  CHECK(f32_to_f16(NAN) == 0x7E00);
  CHECK(f32_to_f16(-NAN) == 0xFE00);
  auto dec = [](uint32_t p) {  // half pattern (no sign) -> double
    const uint32_t e = (p >> 10) & 31, m = p & 1023;
    if (e == 31) return m ? static_cast<double>(NAN) : static_cast<double>(INFINITY);
    return e == 0 ? std::ldexp(static_cast<double>(m), -24) : std::ldexp(static_cast<double>(1024 + m), static_cast<int>(e) - 25);
  };
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(static_cast<uint16_t>(h));
    const double want = (h & 0x8000 ? -1.0 : 1.0) * dec(h & 0x7FFF);
    if (std::isnan(want)) {
      CHECK_MSG(std::isnan(f), "half 0x%04x", h);
      continue;
    }
    CHECK_MSG(static_cast<double>(f) == want && std::signbit(f) == ((h & 0x8000) != 0), "half 0x%04x -> %a", h, f);
    CHECK_MSG(f32_to_f16(f) == h, "half 0x%04x round trip", h);
    // the midpoint to the next half rounds to the even neighbour
    if ((h & 0x7FFF) < 0x7BFF) {
      const double next = (h & 0x8000 ? -1.0 : 1.0) * dec((h & 0x7FFF) + 1);
      const float mid = static_cast<float>((want + next) / 2);  // exact: halves have 11 bits
      const uint32_t even = (h & 1) ? h + 1 : h;
      CHECK_MSG(f32_to_f16(mid) == even, "midpoint after half 0x%04x", h);
    }
  }
  std::mt19937 g(5);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 3000000; ++i) {
    // bias the exponent toward the half range so most samples are interesting
    uint32_t u = bits(g);
    if (i & 1) u = (u & 0x807FFFFFu) | ((100u + (bits(g) % 46u)) << 23);
    const float f = bits_f32(u);
    const uint16_t got = f32_to_f16(f);
    if (std::isnan(f)) {
      CHECK(std::isnan(f16_to_f32(got)));
      continue;
    }
    const double a = std::fabs(static_cast<double>(f));
    uint32_t want;
    if (a >= 65520.0) {
      want = 0x7C00;
    } else {
      // truncated half pattern below a: largest p with dec(p) <= a
      uint32_t lo = 0, hi = 0x7BFF;
      while (lo < hi) {
        const uint32_t mid = (lo + hi + 1) / 2;
        if (dec(mid) <= a) lo = mid; else hi = mid - 1;
      }
      want = lo == 0x7BFF ? 0x7BFF : nearest_even(a, lo, dec);
    }
    want |= (u >> 16) & 0x8000u;
    CHECK_MSG(got == want, "f16(%a) = 0x%04x, want 0x%04x", f, got, want);
  }
}

}  // namespace

int main() {
  test_e4m3();
  test_round_helpers();
  test_bf16();
  test_fp16();
  return lsgtest::report("test_format");
}
