// Launch geometry and error recording shared by the CUDA launchers (see common.cuh).
#include "common.cuh"

#include <atomic>
#include <cstdio>

namespace localsgd {
namespace cuda {
namespace detail {

namespace {
// Per host thread, like CUDA's own error state: the launcher called last on this thread.
thread_local const char* g_last_error = "";
thread_local char g_message[512];
constexpr int kMaxDevices = 64;
int g_sm_count[kMaxDevices] = {0};  // 0 = not queried yet; benign race (same value written)
}  // namespace

void set_error(const char* what) { g_last_error = what; }

// Start of every launcher. CUDA keeps the last error of any earlier runtime call or launch on
// this thread until someone reads it; reading it only after our launch would blame our kernel
// for another library's failure. So it is read here first and, if set, reported as what it is
// (the launch still runs: a sticky error fails it too, and that failure then names our kernel).
void clear_error() {
  g_last_error = "";
  const cudaError_t pending = cudaGetLastError();
  if (pending != cudaSuccess) {
    snprintf(g_message, sizeof g_message,
             "a CUDA error from earlier work on this thread (not from a localsgd kernel) was pending: %s",
             cudaGetErrorString(pending));
    g_last_error = g_message;
  }
}

void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    snprintf(g_message, sizeof g_message, "CUDA kernel launch of %s failed: %s", kernel, cudaGetErrorString(e));
    g_last_error = g_message;
  }
}

namespace {
// CTAs per SM the grid is capped at (0: one CTA per work unit, no cap). Measured on an H200
// (benchmarks/results/gpu/): a grid capped at 8 CTAs per SM leaves each warp looping through
// dependent load -> reduce -> store iterations and the op latency-bound (quantize at 37-49% of
// a device-to-device copy); a grid with one iteration per warp lets the block scheduler overlap
// CTAs in different phases. Settable for benchmarks (set_grid_cap).
std::atomic<int> g_ctas_per_sm{0};
}  // namespace

int grid_for(int64_t work_items, int items_per_cta) {
  const int64_t need = (work_items + items_per_cta - 1) / items_per_cta;
  int64_t cap = int64_t{1} << 30;  // far below the 2^31-1 CTA limit of grid.x; grid-stride loops cover the rest
  const int per_sm = g_ctas_per_sm.load(std::memory_order_relaxed);
  if (per_sm > 0) {
    int dev = 0;
    int sms = 132;  // H100/H200 SXM; only used if the queries below fail
    if (cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < kMaxDevices) {
      if (g_sm_count[dev] == 0) {
        int v = 0;
        if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0)
          g_sm_count[dev] = v;
      }
      if (g_sm_count[dev] > 0) sms = g_sm_count[dev];
    }
    cap = static_cast<int64_t>(sms) * per_sm;
  }
  const int64_t g = need < cap ? need : cap;
  return g < 1 ? 1 : static_cast<int>(g);
}

}  // namespace detail

const char* last_error() { return detail::g_last_error; }

void set_grid_cap(int ctas_per_sm) { detail::g_ctas_per_sm.store(ctas_per_sm < 0 ? 0 : ctas_per_sm); }
int grid_cap() { return detail::g_ctas_per_sm.load(); }

}  // namespace cuda
}  // namespace localsgd
