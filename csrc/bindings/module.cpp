// The localsgd_comm._C Python module. Importing it runs the TORCH_LIBRARY_IMPL registrations
// of the CPU op kernels (csrc/bindings/ops_cpu.cpp), binds the CUDA launchers as plain functions
// in CUDA builds (localsgd_comm/kernels/cuda.py registers them, or the Triton kernels, as the
// ops' CUDA implementation) and binds the c10d backend.
#include <torch/extension.h>

namespace localsgd {
void init_c10d_bindings(pybind11::module& m);  // csrc/c10d/
#ifdef LOCALSGD_WITH_CUDA
void init_cuda_bindings(pybind11::module& m);  // csrc/bindings/ops_cuda.cpp
#endif
}  // namespace localsgd

PYBIND11_MODULE(_C, m) {
  m.doc() = "localsgd-comm compiled kernels and the localsgd c10d backend";
#ifdef LOCALSGD_WITH_CUDA
  m.attr("with_cuda") = true;
  localsgd::init_cuda_bindings(m);
#else
  m.attr("with_cuda") = false;
#endif
  localsgd::init_c10d_bindings(m);
}
