// Placeholder: replaced by the localsgd c10d backend (issue 3).
#include <torch/extension.h>
namespace localsgd {
void init_c10d_bindings(pybind11::module& m) { (void)m; }
}  // namespace localsgd
