// Host backend: slots are host buffers and a worker thread does the copies, so the whole protocol runs
// (and is tested) on machines without a GPU. Fences are sequence numbers guarded by a condition variable:
// acquire blocks until the slot's copy is done, and release frees the slot at once because a host
// consumer's reads have finished by the time it calls release.
#pragma once

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/transfer_backend.h"

namespace offload_kernels {

class HostBackend final : public TransferBackend {
 public:
  explicit HostBackend(int num_slots);
  ~HostBackend() override;

  const char* kind() const override { return "host"; }
  int device() const override { return -1; }
  void check_stream(uintptr_t stream) const override;
  void order_after(uintptr_t) override {}
  void enqueue_copy(int slot, void* dst, const void* src, size_t nbytes) override;
  void wait_copy(int slot, uintptr_t stream) override;
  void release_slot(int, uintptr_t) override {}
  void wait_copies() override;
  void synchronize(bool whole_device) override;
  TransferTimings timings() override;
  void reset_timings() override;
  void shutdown() override;

 private:
  struct CopyJob {
    int slot;
    void* dst;
    const void* src;
    size_t nbytes;
  };
  void worker_loop();

  std::mutex mutex_;
  std::condition_variable work_ready_;   // worker waits: a job was queued or stop was asked
  std::condition_variable copy_landed_;  // consumers wait: a copy finished
  std::deque<CopyJob> queue_;
  std::vector<uint64_t> copies_enqueued_;  // per slot; the copy-done fence is enqueued == completed
  std::vector<uint64_t> copies_completed_;
  bool copying_ = false;
  bool stop_ = false;
  TransferTimings timings_;
  std::thread worker_;
};

}  // namespace offload_kernels
