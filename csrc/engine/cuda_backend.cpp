#include "engine/cuda_backend.h"

#include <memory>
#include <stdexcept>
#include <string>

#include "engine/transfer_backend.h"

#if OK_WITH_CUDA
#include <sstream>

#include "engine/cuda_util.h"
#endif

namespace offload_kernels {

#if !OK_WITH_CUDA

std::unique_ptr<TransferBackend> make_cuda_backend(int, int) {
  throw std::runtime_error(
      "the CUDA transfer backend is not available: offload_kernels._C was built host-only (no nvcc at build "
      "time, or OFFLOAD_KERNELS_NO_CUDA=1). Rebuild with a CUDA toolkit, or use device='cpu'.");
}

#else  // OK_WITH_CUDA

std::unique_ptr<TransferBackend> make_cuda_backend(int device, int num_slots) {
  return std::make_unique<CudaBackend>(device, num_slots);
}

namespace {

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

std::string hex(uintptr_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

// An idle event from `idle` (events are reused rather than created per copy), or a new one with `flags`.
cudaEvent_t take_event(std::vector<cudaEvent_t>& idle, unsigned int flags) {
  if (!idle.empty()) {
    cudaEvent_t e = idle.back();
    idle.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  OK_CUDA_CHECK(cudaEventCreateWithFlags(&e, flags));
  return e;
}

}  // namespace

CudaBackend::CudaBackend(int device, int num_slots) : device_(device), slots_(static_cast<size_t>(num_slots)) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("the CUDA transfer backend needs a CUDA device, but the extension sees "
                                         "none: cudaGetDeviceCount failed with ") +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
  if (device < 0 || device >= count) {
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist (the extension sees " +
                                std::to_string(count) + " device(s))");
  }
  try {
    DeviceGuard guard(device_);
    // Non-blocking: the copy stream must not serialize with the legacy default stream torch computes on.
    OK_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
    for (SlotFences& s : slots_) OK_CUDA_CHECK(cudaEventCreateWithFlags(&s.copy_done, cudaEventDisableTiming));
  } catch (...) {
    destroy_all();
    throw;
  }
}

CudaBackend::~CudaBackend() {
  try {
    shutdown();
  } catch (...) {
    // Destructors cannot report; shutdown() already released what it could.
  }
}

void CudaBackend::check_stream(uintptr_t stream) const {
  const cudaStream_t s = as_stream(stream);
  // The special handles name a stream of the current device, which the engine's DeviceGuard makes its own.
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return;
#if CUDART_VERSION >= 12080
  DeviceGuard guard(device_);
  int stream_device = -1;
  const cudaError_t err = cudaStreamGetDevice(s, &stream_device);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::invalid_argument("stream handle " + hex(stream) + " is not a usable CUDA stream: " +
                                cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
  if (stream_device != device_) {
    throw std::invalid_argument("the stream belongs to cuda:" + std::to_string(stream_device) +
                                " but this TransferEngine is on cuda:" + std::to_string(device_));
  }
#endif
}

cudaEvent_t CudaBackend::take_sync_event() { return take_event(idle_sync_events_, cudaEventDisableTiming); }

cudaEvent_t CudaBackend::take_timing_event() { return take_event(idle_timing_events_, cudaEventDefault); }

void CudaBackend::recycle(const PendingTiming& t) {
  for (int i = 0; i < t.count; ++i) idle_timing_events_.push_back(t.events[i]);
}

void CudaBackend::order_after(uintptr_t stream) {
  DeviceGuard guard(device_);
  cudaEvent_t ev = take_sync_event();
  try {
    OK_CUDA_CHECK(cudaEventRecord(ev, as_stream(stream)));
    OK_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, ev, 0));
  } catch (...) {
    idle_sync_events_.push_back(ev);
    throw;
  }
  // cudaStreamWaitEvent captured the record: the event may be reused at once.
  idle_sync_events_.push_back(ev);
}

void CudaBackend::enqueue_copy(int slot, void* dst, const void* src, size_t nbytes) {
  DeviceGuard guard(device_);
  if (pending_.size() >= kHarvestBatch) harvest_timings();  // keep the pending list (and event pool) bounded
  SlotFences& fences = slots_[static_cast<size_t>(slot)];
  PendingTiming t{Measure::kCopy, {nullptr, nullptr, nullptr}, 0, true};
  try {
    for (int i = 0; i < 3; ++i) t.events[t.count++] = take_timing_event();
    OK_CUDA_CHECK(cudaEventRecord(t.events[0], copy_stream_));  // copy requested
    for (const SlotRelease& r : fences.releases) OK_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, r.event, 0));
    OK_CUDA_CHECK(cudaEventRecord(t.events[1], copy_stream_));  // slot free: copy starts
    OK_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, copy_stream_));
    OK_CUDA_CHECK(cudaEventRecord(t.events[2], copy_stream_));  // copy landed
    OK_CUDA_CHECK(cudaEventRecord(fences.copy_done, copy_stream_));
  } catch (...) {
    recycle(t);
    throw;
  }
  pending_.push_back(t);
  // The copy stream's waits captured the slot-free records, so those events can be reused now.
  for (const SlotRelease& r : fences.releases) idle_sync_events_.push_back(r.event);
  fences.releases.clear();
}

void CudaBackend::wait_copy(int slot, uintptr_t stream) {
  DeviceGuard guard(device_);
  if (pending_.size() >= kHarvestBatch) harvest_timings();
  const cudaStream_t s = as_stream(stream);
  PendingTiming t{Measure::kConsumerWait, {nullptr, nullptr, nullptr}, 0, true};
  try {
    for (int i = 0; i < 2; ++i) t.events[t.count++] = take_timing_event();
    OK_CUDA_CHECK(cudaEventRecord(t.events[0], s));
    OK_CUDA_CHECK(cudaStreamWaitEvent(s, slots_[static_cast<size_t>(slot)].copy_done, 0));
    OK_CUDA_CHECK(cudaEventRecord(t.events[1], s));
  } catch (...) {
    recycle(t);
    throw;
  }
  pending_.push_back(t);
}

void CudaBackend::release_slot(int slot, uintptr_t stream) {
  DeviceGuard guard(device_);
  const cudaStream_t s = as_stream(stream);
  std::vector<SlotRelease>& releases = slots_[static_cast<size_t>(slot)].releases;
  // Drop fences that have already passed, so the list stays as short as the number of live streams.
  for (size_t i = 0; i < releases.size();) {
    const cudaError_t q = cudaEventQuery(releases[i].event);
    if (q == cudaSuccess) {
      idle_sync_events_.push_back(releases[i].event);
      releases.erase(releases.begin() + static_cast<std::ptrdiff_t>(i));
    } else if (q == cudaErrorNotReady) {
      clear_not_ready(q);
      ++i;
    } else {
      OK_CUDA_CHECK(q);
    }
  }
  for (SlotRelease& r : releases) {
    if (r.stream == s) {  // a later point on the same stream covers the earlier one
      OK_CUDA_CHECK(cudaEventRecord(r.event, s));
      return;
    }
  }
  cudaEvent_t ev = take_sync_event();
  try {
    OK_CUDA_CHECK(cudaEventRecord(ev, s));
  } catch (...) {
    idle_sync_events_.push_back(ev);
    throw;
  }
  releases.push_back({s, ev});
}

void CudaBackend::wait_copies() {
  if (shut_down_) return;
  DeviceGuard guard(device_);
  // Every copy is on the one copy stream, in order: when it drains, no copy reads host memory any more.
  OK_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));
}

void CudaBackend::synchronize(bool whole_device) {
  if (shut_down_) return;
  DeviceGuard guard(device_);
  if (whole_device) {
    OK_CUDA_CHECK(cudaDeviceSynchronize());
  } else {
    OK_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));
    for (const SlotFences& f : slots_) {
      for (const SlotRelease& r : f.releases) OK_CUDA_CHECK(cudaEventSynchronize(r.event));
    }
  }
  harvest_timings();
}

void CudaBackend::harvest_timings() {
  std::vector<PendingTiming> still_pending;
  cudaError_t first_error = cudaSuccess;
  for (const PendingTiming& t : pending_) {
    const cudaError_t q = cudaEventQuery(t.events[t.count - 1]);  // the last one completes after the others
    if (q == cudaErrorNotReady) {
      clear_not_ready(q);
      still_pending.push_back(t);
      continue;
    }
    if (q != cudaSuccess) {
      (void)cudaGetLastError();
      if (first_error == cudaSuccess) first_error = q;
      recycle(t);
      continue;
    }
    float ms_a = 0.f, ms_b = 0.f;
    if (!t.counted) {
      // began before reset_timings()
    } else if (t.what == Measure::kCopy) {
      if (cudaEventElapsedTime(&ms_a, t.events[0], t.events[1]) == cudaSuccess &&
          cudaEventElapsedTime(&ms_b, t.events[1], t.events[2]) == cudaSuccess) {
        totals_.slot_wait_s += ms_a * 1e-3;
        totals_.copy_s += ms_b * 1e-3;
      } else {
        (void)cudaGetLastError();
      }
    } else {
      if (cudaEventElapsedTime(&ms_a, t.events[0], t.events[1]) == cudaSuccess) {
        totals_.consumer_wait_s += ms_a * 1e-3;
      } else {
        (void)cudaGetLastError();
      }
    }
    recycle(t);
  }
  pending_.swap(still_pending);
  if (first_error != cudaSuccess) throw_cuda_error(first_error, "cudaEventQuery(timing event)", __FILE__, __LINE__);
}

TransferTimings CudaBackend::timings() {
  if (!shut_down_) {
    DeviceGuard guard(device_);
    harvest_timings();
  }
  return totals_;
}

void CudaBackend::reset_timings() {
  if (!shut_down_) {
    DeviceGuard guard(device_);
    harvest_timings();
  }
  // Measurements still in flight began before the reset: they complete uncounted.
  for (PendingTiming& t : pending_) t.counted = false;
  totals_ = TransferTimings{};
}

void CudaBackend::shutdown() {
  if (shut_down_) return;
  // A failing synchronize (say, a sticky error from unrelated work) must not keep the resources alive.
  std::string error;
  try {
    synchronize(false);
  } catch (const std::exception& e) {
    error = e.what();
  }
  destroy_all();
  shut_down_ = true;
  if (!error.empty()) throw std::runtime_error("TransferEngine close: " + error);
}

void CudaBackend::destroy_all() noexcept {
  try {
    DeviceGuard guard(device_);
    auto destroy = [](cudaEvent_t e) {
      if (e != nullptr) (void)cudaEventDestroy(e);
    };
    for (SlotFences& f : slots_) {
      destroy(f.copy_done);
      f.copy_done = nullptr;
      for (const SlotRelease& r : f.releases) destroy(r.event);
      f.releases.clear();
    }
    for (const PendingTiming& t : pending_) {
      for (int i = 0; i < t.count; ++i) destroy(t.events[i]);
    }
    pending_.clear();
    for (cudaEvent_t e : idle_sync_events_) destroy(e);
    idle_sync_events_.clear();
    for (cudaEvent_t e : idle_timing_events_) destroy(e);
    idle_timing_events_.clear();
    if (copy_stream_ != nullptr) (void)cudaStreamDestroy(copy_stream_);
    copy_stream_ = nullptr;
    (void)cudaGetLastError();
  } catch (...) {
    // No usable device left (e.g. the runtime is unloading at exit): nothing more can be freed.
  }
}

#endif  // OK_WITH_CUDA

}  // namespace offload_kernels
