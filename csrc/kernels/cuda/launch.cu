// Launch geometry and error recording shared by the CUDA launchers (see common.cuh).
#include "common.cuh"

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

int grid_for(int64_t work_items, int items_per_cta) {
  int dev = 0;
  int sms = 132;  // H100 SXM; only used if the queries below fail
  if (cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < kMaxDevices) {
    if (g_sm_count[dev] == 0) {
      int v = 0;
      if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0)
        g_sm_count[dev] = v;
    }
    if (g_sm_count[dev] > 0) sms = g_sm_count[dev];
  }
  // 8 resident CTAs of 256 threads per SM saturate H100/H200 bandwidth for these streaming
  // kernels; grid-stride loops cover the rest.
  const int64_t need = (work_items + items_per_cta - 1) / items_per_cta;
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  const int64_t g = need < cap ? need : cap;
  return g < 1 ? 1 : static_cast<int>(g);
}

}  // namespace detail

const char* last_error() { return detail::g_last_error; }

}  // namespace cuda
}  // namespace localsgd
