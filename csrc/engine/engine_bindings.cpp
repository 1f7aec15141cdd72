// Placeholder until the transfer engine lands (issue 4); registers nothing yet.
#include <pybind11/pybind11.h>

namespace offload_kernels {
void register_engine_bindings(pybind11::module_& m) { (void)m; }
}  // namespace offload_kernels
