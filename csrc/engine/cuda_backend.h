// CUDA backend: slots are device memory filled by cudaMemcpyAsync on one non-blocking copy stream owned by
// the backend. Fences are CUDA events, so nothing on the hot path blocks the host:
//   copy-done   one event per slot, recorded on the copy stream after the copy; acquire makes the
//               consumer's stream wait on it (cudaStreamWaitEvent).
//   slot-free   events recorded on each consumer stream that released the slot since its last copy (one per
//               stream: a later record on the same stream supersedes an earlier one); the next copy into
//               the slot makes the copy stream wait on all of them, so two streams reading the same
//               resident item are both waited for.
// Timings come from timing-enabled events recorded around the waits and the copies and harvested later
// with cudaEventQuery, never with a blocking call.
#pragma once

#if OK_WITH_CUDA
#include <cuda_runtime_api.h>

#include <vector>

#include "engine/transfer_backend.h"

namespace offload_kernels {

class CudaBackend final : public TransferBackend {
 public:
  CudaBackend(int device, int num_slots);
  ~CudaBackend() override;

  const char* kind() const override { return "cuda"; }
  int device() const override { return device_; }
  void check_stream(uintptr_t stream) const override;
  void order_after(uintptr_t stream) override;
  void enqueue_copy(int slot, void* dst, const void* src, size_t nbytes) override;
  void wait_copy(int slot, uintptr_t stream) override;
  void release_slot(int slot, uintptr_t stream) override;
  void wait_copies() override;
  void synchronize(bool whole_device) override;
  TransferTimings timings() override;
  void reset_timings() override;
  void shutdown() override;

 private:
  struct SlotRelease {
    cudaStream_t stream;
    cudaEvent_t event;
  };
  struct SlotFences {
    cudaEvent_t copy_done = nullptr;
    std::vector<SlotRelease> releases;  // pending slot-free fences
  };
  static constexpr size_t kHarvestBatch = 64;  // pending measurements that trigger a (non-blocking) harvest
  enum class Measure { kCopy, kConsumerWait };
  struct PendingTiming {  // events recorded in stream order: [request, start, end] or [begin, end]
    Measure what;
    cudaEvent_t events[3];
    int count;
    bool counted;  // false once reset_timings() ran while it was in flight
  };

  cudaEvent_t take_sync_event();
  cudaEvent_t take_timing_event();
  void recycle(const PendingTiming& t);
  void harvest_timings();  // folds completed measurements into totals_
  void destroy_all() noexcept;

  int device_;
  cudaStream_t copy_stream_ = nullptr;
  std::vector<SlotFences> slots_;
  std::vector<cudaEvent_t> idle_sync_events_;    // cudaEventDisableTiming
  std::vector<cudaEvent_t> idle_timing_events_;  // timing enabled
  std::vector<PendingTiming> pending_;
  TransferTimings totals_;
  bool shut_down_ = false;
};

}  // namespace offload_kernels
#endif  // OK_WITH_CUDA
