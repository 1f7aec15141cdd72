// pybind11 entry point of offload_kernels._C. Each component registers its own bindings.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "runtime_info.h"

namespace py = pybind11;

namespace offload_kernels {
void register_engine_bindings(py::module_& m);  // csrc/engine/engine_bindings.cpp
}

PYBIND11_MODULE(_C, m) {
  using namespace offload_kernels;
  m.doc() = "offload_kernels native extension: pinned host storage and the transfer engine";

  py::class_<DeviceInfo>(m, "DeviceInfo")
      .def_readonly("index", &DeviceInfo::index)
      .def_readonly("name", &DeviceInfo::name)
      .def_readonly("total_memory", &DeviceInfo::total_memory)
      .def_readonly("major", &DeviceInfo::major)
      .def_readonly("minor", &DeviceInfo::minor)
      .def_readonly("multiprocessors", &DeviceInfo::multiprocessors);

  py::class_<RuntimeInfo>(m, "RuntimeInfo")
      .def_readonly("built_with_cuda", &RuntimeInfo::built_with_cuda)
      .def_readonly("cuda_runtime_version", &RuntimeInfo::cuda_runtime_version)
      .def_readonly("cuda_driver_version", &RuntimeInfo::cuda_driver_version)
      .def_readonly("device_count", &RuntimeInfo::device_count)
      .def_readonly("device_error", &RuntimeInfo::device_error)
      .def_readonly("devices", &RuntimeInfo::devices);

  m.def("query_runtime_info", &query_runtime_info,
        "Build flavour and the CUDA devices the extension sees; never raises.");
  m.attr("BUILT_WITH_CUDA") = py::bool_(OK_WITH_CUDA != 0);

  register_engine_bindings(m);
}
