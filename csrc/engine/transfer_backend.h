// What the engine needs from a transport: enqueue a copy into a slot, make a consumer wait for it, and
// learn when a consumer is done with a slot. The engine owns the state machine; a backend only moves bytes
// and keeps the per-slot fences.
//
// Fences per slot:
//   copy-done  signalled when the copy into the slot has landed; acquire makes the consumer wait on it.
//   slot-free  signalled when the consumers that released the slot are done with it; the next copy into
//              the slot waits on it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace offload_kernels {

struct TransferTimings {
  double copy_s = 0.0;           // time copies spent moving bytes
  double consumer_wait_s = 0.0;  // time consumers stalled in acquire waiting for copies
  double slot_wait_s = 0.0;      // time copies stalled waiting for a consumer to free their slot
};

class TransferBackend {
 public:
  virtual ~TransferBackend() = default;

  virtual const char* kind() const = 0;  // "cuda" or "host"
  virtual int device() const = 0;        // CUDA ordinal; -1 for the host backend

  // Throws std::invalid_argument when `stream` cannot be used with this backend (another device's stream,
  // or any stream at all for the host backend, which takes 0).
  virtual void check_stream(uintptr_t stream) const = 0;

  // New slot memory was just allocated on `stream`: later copies must not overwrite it before the work
  // that stream had enqueued (which may still be using those bytes) is done.
  virtual void order_after(uintptr_t stream) = 0;

  // Copies `nbytes` from host `src` into slot memory `dst` after the slot's slot-free fence, then signals
  // the slot's copy-done fence. Never blocks on the device.
  virtual void enqueue_copy(int slot, void* dst, const void* src, size_t nbytes) = 0;

  // Makes `stream` wait for the slot's copy-done fence (host backend: blocks the caller until then).
  virtual void wait_copy(int slot, uintptr_t stream) = 0;

  // The slot becomes reusable once the work `stream` has enqueued so far is done.
  virtual void release_slot(int slot, uintptr_t stream) = 0;

  // Blocks until every copy enqueued so far has landed, so their host sources may be rewritten. (A copy
  // still waiting for its slot to be freed is waited for too, and with it that slot's consumers.)
  virtual void wait_copies() = 0;

  // Blocks until every enqueued copy and every released consumer is done. With `whole_device`, also
  // waits for work that may still read acquired-but-unreleased slots (the engine cannot know its stream).
  virtual void synchronize(bool whole_device) = 0;

  // Totals since the last reset, including every measurement that has completed by now. Never blocks.
  virtual TransferTimings timings() = 0;
  virtual void reset_timings() = 0;

  // synchronize() and free the backend's resources; idempotent.
  virtual void shutdown() = 0;
};

std::unique_ptr<TransferBackend> make_host_backend(int num_slots);
// Throws std::runtime_error when the extension was built without CUDA or `device` is not usable.
std::unique_ptr<TransferBackend> make_cuda_backend(int device, int num_slots);

}  // namespace offload_kernels
