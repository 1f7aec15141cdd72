#include "engine/host_backend.h"

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

namespace offload_kernels {
namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace

std::unique_ptr<TransferBackend> make_host_backend(int num_slots) {
  return std::make_unique<HostBackend>(num_slots);
}

HostBackend::HostBackend(int num_slots)
    : copies_enqueued_(static_cast<size_t>(num_slots), 0), copies_completed_(static_cast<size_t>(num_slots), 0) {
  worker_ = std::thread(&HostBackend::worker_loop, this);
}

HostBackend::~HostBackend() { shutdown(); }

void HostBackend::check_stream(uintptr_t stream) const {
  if (stream != 0) {
    throw std::invalid_argument("the host backend has no streams: pass stream=None (got handle " +
                                std::to_string(stream) + ")");
  }
}

void HostBackend::enqueue_copy(int slot, void* dst, const void* src, size_t nbytes) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stop_) throw std::runtime_error("host backend is shut down");
    queue_.push_back({slot, dst, src, nbytes});
    ++copies_enqueued_[slot];
  }
  work_ready_.notify_one();
}

void HostBackend::wait_copy(int slot, uintptr_t stream) {
  check_stream(stream);
  std::unique_lock<std::mutex> lock(mutex_);
  if (copies_completed_[slot] >= copies_enqueued_[slot]) return;
  const Clock::time_point t0 = Clock::now();
  copy_landed_.wait(lock, [&] { return copies_completed_[slot] >= copies_enqueued_[slot]; });
  timings_.consumer_wait_s += seconds_since(t0);
}

void HostBackend::wait_copies() {
  std::unique_lock<std::mutex> lock(mutex_);
  copy_landed_.wait(lock, [&] { return queue_.empty() && !copying_; });
}

// Host consumers are done when they release, so waiting for the copies is all there is.
void HostBackend::synchronize(bool) { wait_copies(); }

TransferTimings HostBackend::timings() {
  std::lock_guard<std::mutex> lock(mutex_);
  return timings_;
}

void HostBackend::reset_timings() {
  std::lock_guard<std::mutex> lock(mutex_);
  timings_ = TransferTimings{};
}

void HostBackend::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stop_) return;
    stop_ = true;  // the worker drains the queue before it exits
  }
  work_ready_.notify_one();
  if (worker_.joinable()) worker_.join();
}

void HostBackend::worker_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    work_ready_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and drained
    const CopyJob job = queue_.front();
    queue_.pop_front();
    copying_ = true;
    lock.unlock();
    const Clock::time_point t0 = Clock::now();
    std::memcpy(job.dst, job.src, job.nbytes);
    const double dt = seconds_since(t0);
    lock.lock();
    copying_ = false;
    ++copies_completed_[job.slot];
    timings_.copy_s += dt;
    copy_landed_.notify_all();
  }
}

}  // namespace offload_kernels
