// pybind11 bindings of the transfer engine (offload_kernels._C.TransferEngineCore), the live host-memory
// counters, the pinning test hook and the spin kernel. The public Python API is offload_kernels.engine.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <utility>
#include <vector>

#include "engine/pinned_arena.h"
#include "engine/transfer_engine.h"

#if OK_WITH_CUDA
#include "engine/cuda_util.h"
#include "engine/spin_kernel.h"
#endif

namespace py = pybind11;

namespace offload_kernels {
namespace {

using PartSpec = std::pair<uintptr_t, size_t>;  // (address, nbytes) of one part's source bytes

std::vector<std::vector<HostSpan>> to_spans(const std::vector<std::vector<PartSpec>>& items) {
  std::vector<std::vector<HostSpan>> out(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    for (const PartSpec& p : items[i]) out[i].push_back({reinterpret_cast<const void*>(p.first), p.second});
  }
  return out;
}

py::dict stats_dict(const EngineStats& s) {
  py::dict d;
  d["bytes_copied"] = s.bytes_copied;
  d["copies"] = s.copies;
  d["hits"] = s.hits;
  d["copy_time_s"] = s.timings.copy_s;
  d["consumer_wait_s"] = s.timings.consumer_wait_s;
  d["slot_wait_s"] = s.timings.slot_wait_s;
  d["pinned_bytes"] = s.pinned_bytes;
  d["host_bytes"] = s.host_bytes;
  d["registered_bytes"] = s.registered_bytes;
  d["device_bytes"] = s.device_bytes;
  d["items"] = s.items;
  d["num_slots"] = s.num_slots;
  d["slot_bytes"] = s.slot_bytes;
  d["backend"] = s.backend;
  d["pinned"] = s.pinned;
  return d;
}

void spin(long long cycles, uintptr_t stream, int device) {
  if (cycles < 0) throw std::invalid_argument("cycles must be >= 0");
#if OK_WITH_CUDA
  DeviceGuard guard(device);
  OK_CUDA_CHECK(launch_spin_kernel(cycles, reinterpret_cast<cudaStream_t>(stream)));
#else
  (void)stream;
  (void)device;
  throw std::runtime_error("spin() needs the CUDA build of offload_kernels._C; this one is host-only");
#endif
}

}  // namespace

void register_engine_bindings(py::module_& m) {
  using release_gil = py::call_guard<py::gil_scoped_release>;

  // A writable buffer over an item's host bytes; it owns a reference to the arena, so numpy/torch views
  // made from it stay valid after the engine closes (the arena is freed when the last view goes).
  py::class_<HostBytes>(m, "HostBytes", py::buffer_protocol())
      .def_buffer([](HostBytes& b) {
        return py::buffer_info(b.data, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes)}, {static_cast<py::ssize_t>(1)});
      })
      .def_property_readonly("nbytes", [](const HostBytes& b) { return b.nbytes; })
      .def_property_readonly("pinned", [](const HostBytes& b) { return b.owner && b.owner->pinned(); });

  py::class_<TransferEngine>(m, "TransferEngineCore",
                             "Native core of offload_kernels.engine.TransferEngine; use that class instead.")
      .def(py::init<const std::string&, int, int, size_t, bool>(), py::arg("backend"), py::arg("device"),
           py::arg("num_slots"), py::arg("slot_bytes"), py::arg("pin"))
      .def(
          "register_items",
          [](TransferEngine& e, const std::vector<std::vector<PartSpec>>& items) {
            const auto spans = to_spans(items);
            py::gil_scoped_release no_gil;  // copying the bytes in may take a while
            return e.register_items(spans);
          },
          py::arg("items"), "items: list of items, each a list of (address, nbytes) parts -> list of handles")
      .def("item_nbytes", &TransferEngine::item_nbytes, py::arg("handle"))
      .def(
          "item_parts",
          [](const TransferEngine& e, int64_t h) {
            std::vector<std::pair<size_t, size_t>> out;
            for (const ItemPart& p : e.item_parts(h)) out.emplace_back(p.offset, p.nbytes);
            return out;
          },
          py::arg("handle"))
      .def("item_state", &TransferEngine::item_state, py::arg("handle"))
      .def("item_host_bytes", &TransferEngine::item_host_bytes, py::arg("handle"))
      .def("check_handle", &TransferEngine::check_handle, py::arg("handle"))
      .def("take_pin_failure", &TransferEngine::take_pin_failure)
      .def("slot_bytes_needed", &TransferEngine::slot_bytes_needed)
      .def("slot_bytes", &TransferEngine::slot_bytes)
      .def("slots_attached", &TransferEngine::slots_attached)
      .def("attach_slots", &TransferEngine::attach_slots, py::arg("slot_ptrs"), py::arg("slot_bytes"),
           py::arg("alloc_stream"), release_gil())
      .def("detach_slots", &TransferEngine::detach_slots, release_gil())
      .def("prefetch", &TransferEngine::prefetch, py::arg("handle"), release_gil())
      .def("acquire", &TransferEngine::acquire, py::arg("handle"), py::arg("stream"), release_gil())
      .def("release", &TransferEngine::release, py::arg("handle"), py::arg("stream"), release_gil())
      .def("cancel", &TransferEngine::cancel, py::arg("handle"))
      .def("invalidate", &TransferEngine::invalidate, py::arg("handle"), release_gil())
      .def("stats",
           [](TransferEngine& e) {
             EngineStats s;
             {
               py::gil_scoped_release no_gil;
               s = e.stats();
             }
             return stats_dict(s);
           })
      .def("reset_stats", &TransferEngine::reset_stats, release_gil())
      .def("synchronize", &TransferEngine::synchronize, release_gil())
      .def("close", &TransferEngine::close, release_gil())
      .def_property_readonly("closed", &TransferEngine::closed)
      .def_property_readonly("num_slots", &TransferEngine::num_slots)
      .def_property_readonly("backend", &TransferEngine::backend_kind)
      .def_property_readonly("device", &TransferEngine::device);

  m.def(
      "live_host_memory",
      [] {
        const LiveHostMemory l = live_host_memory();
        py::dict d;
        d["arenas"] = l.arenas;
        d["pinned_bytes"] = l.pinned_bytes;
        d["pageable_bytes"] = l.pageable_bytes;
        return d;
      },
      "Host arenas alive in this process (all engines): {'arenas', 'pinned_bytes', 'pageable_bytes'}.");
  m.def("_set_force_pin_failure", &set_force_pin_failure, py::arg("fail"),
        "Test hook: make every pinning attempt fail so the pageable fallback runs.");
  m.def("_force_pin_failure", &force_pin_failure);
  m.def("spin", &spin, py::arg("cycles"), py::arg("stream") = 0, py::arg("device") = 0, release_gil(),
        "Enqueue a one-thread kernel that busy-waits `cycles` SM clock cycles on CUDA stream handle `stream` "
        "of device `device`. Raises RuntimeError in a host-only build.");
}

}  // namespace offload_kernels
