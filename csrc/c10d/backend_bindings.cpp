// pybind11 binding of the localsgd c10d backend (localsgd_comm._C.LocalSGDBackend).
// The holder must be c10::intrusive_ptr (torch's Backend holder), and torch.distributed's
// bindings must be loaded first so that c10d.Backend is a known base class.
#include <torch/extension.h>
#include <torch/csrc/utils/pybind.h>

#include "localsgd_backend.h"

namespace py = pybind11;

namespace localsgd {

void init_c10d_bindings(pybind11::module& m) {
  py::module_::import("torch.distributed");
  py::class_<LocalSGDBackend, c10d::Backend, c10::intrusive_ptr<LocalSGDBackend>>(m, "LocalSGDBackend",
      "The 'localsgd' c10d backend. Created by localsgd_comm.backend (do not construct it directly).")
      .def(py::init([](int rank, int size, const c10::intrusive_ptr<c10d::Backend>& cpu_inner,
                       const std::optional<c10::intrusive_ptr<c10d::Backend>>& cuda_inner, int format,
                       int64_t block_size, int64_t threshold_bytes, int64_t seed, int64_t timeout_ms,
                       bool check_calls) {
             return c10::make_intrusive<LocalSGDBackend>(rank, size, cpu_inner,
                                                         cuda_inner.value_or(c10::intrusive_ptr<c10d::Backend>()),
                                                         format, block_size, threshold_bytes, seed, timeout_ms,
                                                         check_calls);
           }),
           py::arg("rank"), py::arg("size"), py::arg("cpu_inner"), py::arg("cuda_inner"), py::arg("format"),
           py::arg("block_size"), py::arg("threshold_bytes"), py::arg("seed"), py::arg("timeout_ms"),
           py::arg("check_calls") = true)
      .def("allreduce_compressed", &LocalSGDBackend::allreduce_compressed, py::arg("payload"), py::arg("scales"),
           py::arg("numel"), py::arg("format"), py::arg("block_size"), py::arg("average"), py::arg("seed"),
           py::call_guard<py::gil_scoped_release>())
      .def("stats",
           [](const LocalSGDBackend& b) {
             const BackendStats s = b.stats();
             static const char* names[] = {"none", "int8", "int4", "fp8"};
             py::dict d;
             d["format"] = names[static_cast<int>(b.format())];
             d["block_size"] = b.block_size();
             d["threshold_bytes"] = b.threshold_bytes();
             d["bytes_sent"] = s.bytes_sent;
             d["bytes_received"] = s.bytes_received;
             d["compressed_calls"] = s.compressed_calls;
             d["passthrough_calls"] = s.passthrough_calls;
             py::dict reasons;
             for (const auto& [k, v] : s.passthrough_reasons) reasons[py::str(k)] = v;
             d["passthrough_reasons"] = reasons;
             py::dict op_calls, op_bytes;
             for (const auto& [k, v] : s.op_calls) op_calls[py::str(k)] = v;
             for (const auto& [k, v] : s.op_bytes_sent) op_bytes[py::str(k)] = v;
             d["op_calls"] = op_calls;
             d["op_bytes_sent"] = op_bytes;
             d["header_bytes"] = s.header_bytes;
             return d;
           })
      .def("reset_stats", &LocalSGDBackend::reset_stats)
      .def("_set_counters_for_test", &LocalSGDBackend::set_counters_for_test, py::arg("seq"), py::arg("tag_call"),
           "Test hook: start the call sequence number and the pipelined calls' tag counter at the given values "
           "(to run a group past their wrap points without 16M collectives). Only before the first collective.")
      .def("failure", &LocalSGDBackend::failure,
           "The group's first error, or '' while it is healthy (after an error every call fails with it).")
      .def("exit_shutdown", &LocalSGDBackend::exit_shutdown, py::arg("grace_ms"),
           py::call_guard<py::gil_scoped_release>(),
           "Interpreter exit: wait up to grace_ms for outstanding work, abort the rest, join the worker.")
      .def("abort", &LocalSGDBackend::abort, py::call_guard<py::gil_scoped_release>(),
           "Fail the group now: queued collectives fail, in-flight messages are aborted; returns at once.");
}

}  // namespace localsgd
