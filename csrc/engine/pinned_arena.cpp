#include "engine/pinned_arena.h"

#include <sys/mman.h>

#include <atomic>
#include <exception>
#include <new>

#if OK_WITH_CUDA
#include "engine/cuda_util.h"
#endif

namespace offload_kernels {
namespace {

std::atomic<int64_t> g_live_arenas{0};
std::atomic<int64_t> g_live_pinned_bytes{0};
std::atomic<int64_t> g_live_pageable_bytes{0};
std::atomic<bool> g_force_pin_failure{false};

}  // namespace

LiveHostMemory live_host_memory() {
  return {g_live_arenas.load(), g_live_pinned_bytes.load(), g_live_pageable_bytes.load()};
}

void set_force_pin_failure(bool fail) { g_force_pin_failure.store(fail); }
bool force_pin_failure() { return g_force_pin_failure.load(); }

HostArena::HostArena(size_t bytes, HostMemoryKind want, int device)
    : capacity_(round_up(bytes == 0 ? 1 : bytes, kHostPageBytes)), device_(device) {
  if (want == HostMemoryKind::kPinned && try_pin(device)) {
    pinned_ = true;
    g_live_pinned_bytes += static_cast<int64_t>(capacity_);
  } else {
    // mmap rather than malloc: whole pages, and munmap returns them to the OS at once, so closing an
    // engine visibly shrinks the process instead of leaving the bytes in the malloc heap.
    void* p = mmap(nullptr, capacity_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = static_cast<uint8_t*>(p);
    g_live_pageable_bytes += static_cast<int64_t>(capacity_);
  }
  ++g_live_arenas;
}

bool HostArena::try_pin(int device) {
  if (g_force_pin_failure.load()) {
    pin_failure_ = "pinning disabled by the test hook (simulated cudaErrorMemoryAllocation)";
    return false;
  }
#if OK_WITH_CUDA
  try {
    DeviceGuard guard(device);
    void* p = nullptr;
    // Portable: page-locked for every CUDA context, not only the one current at allocation time.
    const cudaError_t err = cudaHostAlloc(&p, capacity_, cudaHostAllocPortable);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      pin_failure_ = std::string("cudaHostAlloc of ") + std::to_string(capacity_) + " bytes failed: " +
                     cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
      return false;
    }
    data_ = static_cast<uint8_t*>(p);
    return true;
  } catch (const std::exception& e) {  // DeviceGuard failed: no usable device
    pin_failure_ = e.what();
    return false;
  }
#else
  (void)device;
  pin_failure_ = "the extension was built without CUDA";
  return false;
#endif
}

HostArena::~HostArena() {
  if (data_ == nullptr) return;
  if (pinned_) {
#if OK_WITH_CUDA
    try {
      DeviceGuard guard(device_);  // the allocating device's context
      (void)cudaFreeHost(data_);
    } catch (const std::exception&) {
      (void)cudaFreeHost(data_);  // no device to switch to (e.g. the runtime is unloading at exit): try anyway
    }
    (void)cudaGetLastError();  // errors here cannot be acted on
#endif
    g_live_pinned_bytes -= static_cast<int64_t>(capacity_);
  } else {
    munmap(data_, capacity_);
    g_live_pageable_bytes -= static_cast<int64_t>(capacity_);
  }
  --g_live_arenas;
}

}  // namespace offload_kernels
