// CPU kernel: the fused DiLoCo outer step (SGD with Nesterov momentum on the anchor), one pass:
// read g (fp32, or decoded straight from compressed bytes), update momentum and anchor, write
// params in their own dtype. Same expression order as kernels.h, no FMA (build flags).
#include "cpu_common.h"

namespace localsgd {
namespace cpu {
namespace {

using namespace detail;

enum class Mode { Plain, Momentum, Nesterov };  // mu == 0 / heavy ball / Nesterov

// Updates elements [0, len) of one chunk given their gradient g.
template <DType D, Mode M, bool P>
LSG_INLINE void step_chunk(float* __restrict anchor, float* __restrict mom, typename Elem<D>::T* __restrict params,
                       const float* __restrict g, int64_t len, float lr, float mu) {
  for (int64_t i = 0; i < len; ++i) {
    const float gi = g[i];
    float d;
    if constexpr (M == Mode::Plain) {
      d = gi;
    } else {
      const float b = mu * mom[i] + gi;
      mom[i] = b;
      d = M == Mode::Nesterov ? gi + mu * b : b;
    }
    const float a = anchor[i] - lr * d;
    anchor[i] = a;
    if constexpr (P) params[i] = Elem<D>::store(a);
  }
}

// Chunk of elements per OpenMP work item for the fp32-gradient path (no block structure):
// 4096 floats keep the decoded/staged data in L1 and the loop long enough to vectorize well.
constexpr int64_t kDenseChunk = 4096;

struct StepArgs {
  float* anchor;
  float* momentum;
  void* params;
  const float* grad;
  const uint8_t* gpay;
  const float* gscales;
  float gfactor;
  int64_t n, chunk;
  float lr, mu;
};

// GCC cannot see that decode_block fills g[0..len) and warns; the tests cover every length.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <DType D, Format GF, Mode M, bool P>
LSG_INLINE void step_range(int64_t k0, int64_t k1, const StepArgs& a) {
  using T = typename Elem<D>::T;
  T* params = static_cast<T*>(a.params);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t start = k * a.chunk;
    const int64_t len = (a.n - start) < a.chunk ? (a.n - start) : a.chunk;
    float* mom = M == Mode::Plain ? nullptr : a.momentum + start;
    T* pb = P ? params + start : nullptr;
    if constexpr (GF == Format::None) {
      step_chunk<D, M, P>(a.anchor + start, mom, pb, a.grad + start, len, a.lr, a.mu);
    } else {
      alignas(64) float g[kMaxBlockSize];
      decode_block<GF>(a.gpay + payload_offset<GF>(start), len, g);
      const float s = a.gscales[k];
      for (int64_t i = 0; i < len; ++i) g[i] = g[i] * s * a.gfactor;  // (float(q) * scale) * factor
      step_chunk<D, M, P>(a.anchor + start, mom, pb, g, len, a.lr, a.mu);
    }
  }
}
#pragma GCC diagnostic pop
template <DType D, Format GF, Mode M, bool P>
LSG_AVX2 void step_range_avx2(int64_t k0, int64_t k1, const StepArgs& a) { step_range<D, GF, M, P>(k0, k1, a); }
template <DType D, Format GF, Mode M, bool P>
void step_range_base(int64_t k0, int64_t k1, const StepArgs& a) { step_range<D, GF, M, P>(k0, k1, a); }

template <DType D, Format GF, Mode M, bool P>
void step_impl(float* anchor, float* momentum, void* params, const float* grad, const uint8_t* gpay,
               const float* gscales, float gfactor, int64_t n, int64_t block, float lr, float mu) {
  const int64_t chunk = GF == Format::None ? kDenseChunk : block;
  const StepArgs a{anchor, momentum, params, grad, gpay, gscales, gfactor, n, chunk, lr, mu};
  auto* fn = use_avx2() ? &step_range_avx2<D, GF, M, P> : &step_range_base<D, GF, M, P>;
  parallel_ranges(num_blocks(n, chunk), threads_for(n), [&](int64_t k0, int64_t k1) { fn(k0, k1, a); });
}

template <DType D, Format GF>
void dispatch_mode(float* anchor, float* momentum, void* params, const float* grad, const uint8_t* gpay,
                   const float* gscales, float gfactor, int64_t n, int64_t block, float lr, float mu,
                   bool nesterov) {
#define LSG_STEP(M)                                                                                      \
  do {                                                                                                   \
    if (params != nullptr)                                                                               \
      step_impl<D, GF, M, true>(anchor, momentum, params, grad, gpay, gscales, gfactor, n, block, lr, mu);  \
    else                                                                                                 \
      step_impl<D, GF, M, false>(anchor, momentum, params, grad, gpay, gscales, gfactor, n, block, lr, mu); \
  } while (0)
  if (mu == 0.0f)
    LSG_STEP(Mode::Plain);
  else if (nesterov)
    LSG_STEP(Mode::Nesterov);
  else
    LSG_STEP(Mode::Momentum);
#undef LSG_STEP
}

template <DType D>
void dispatch_fmt(Format gf, float* anchor, float* momentum, void* params, const float* grad,
                  const uint8_t* gpay, const float* gscales, float gfactor, int64_t n, int64_t block, float lr,
                  float mu, bool nesterov) {
  switch (gpay == nullptr ? Format::None : gf) {
    case Format::None:
      dispatch_mode<D, Format::None>(anchor, momentum, params, grad, gpay, gscales, gfactor, n, block, lr, mu,
                                     nesterov);
      break;
    case Format::Int8:
      dispatch_mode<D, Format::Int8>(anchor, momentum, params, grad, gpay, gscales, gfactor, n, block, lr, mu,
                                     nesterov);
      break;
    case Format::Int4:
      dispatch_mode<D, Format::Int4>(anchor, momentum, params, grad, gpay, gscales, gfactor, n, block, lr, mu,
                                     nesterov);
      break;
    case Format::Fp8:
      dispatch_mode<D, Format::Fp8>(anchor, momentum, params, grad, gpay, gscales, gfactor, n, block, lr, mu,
                                    nesterov);
      break;
  }
}

}  // namespace

void outer_nesterov_step(float* anchor, float* momentum, DType params_dtype, void* params, const float* grad,
                         Format grad_fmt, const uint8_t* grad_payload, const float* grad_scales,
                         float grad_factor, int64_t n, int64_t block, float lr, float mu, bool nesterov) {
  if (n <= 0) return;
  switch (params_dtype) {
    case DType::F32:
      dispatch_fmt<DType::F32>(grad_fmt, anchor, momentum, params, grad, grad_payload, grad_scales, grad_factor,
                               n, block, lr, mu, nesterov);
      break;
    case DType::BF16:
      dispatch_fmt<DType::BF16>(grad_fmt, anchor, momentum, params, grad, grad_payload, grad_scales,
                                grad_factor, n, block, lr, mu, nesterov);
      break;
    case DType::F16:
      dispatch_fmt<DType::F16>(grad_fmt, anchor, momentum, params, grad, grad_payload, grad_scales,
                               grad_factor, n, block, lr, mu, nesterov);
      break;
  }
}

}  // namespace cpu
}  // namespace localsgd
