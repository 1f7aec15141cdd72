// The transfer engine core: registered items in host storage, a ring of device slots and the state machine
// that moves items into slots, over a pluggable backend (CUDA streams and events, or a host worker thread).
//
// Slot memory is allocated by the caller (the Python wrapper allocates torch tensors, so the caching
// allocator and torch's memory statistics see it) and handed in as raw pointers with attach_slots().
//
// Every public method validates its arguments and the state before changing anything, and throws
// std::invalid_argument (bad argument) or std::runtime_error (wrong state) with a message naming the problem;
// the engine stays usable afterwards. Methods serialize on one mutex; the host backend's worker thread runs
// alongside.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/item_store.h"
#include "engine/slot_ring.h"
#include "engine/transfer_backend.h"

namespace offload_kernels {

// An item's bytes in host storage, with shared ownership of their arena: valid even after close().
struct HostBytes {
  std::shared_ptr<HostArena> owner;
  uint8_t* data = nullptr;
  size_t nbytes = 0;
};

struct EngineStats {
  uint64_t bytes_copied = 0;  // bytes of the copies enqueued since the last reset
  uint64_t copies = 0;
  uint64_t hits = 0;          // prefetches served by a slot that already held the item
  TransferTimings timings;
  size_t pinned_bytes = 0;
  size_t host_bytes = 0;        // all host storage, pinned or not
  size_t registered_bytes = 0;  // payload bytes handed to register
  size_t device_bytes = 0;      // slot memory attached
  size_t items = 0;
  int num_slots = 0;
  size_t slot_bytes = 0;
  std::string backend;
  bool pinned = false;  // host storage is page-locked (false for the host backend or after a fallback)
};

class TransferEngine {
 public:
  // backend_kind: "host" or "cuda". device: CUDA ordinal (ignored by the host backend). slot_bytes: fixed
  // slot size, or 0 to size slots for the largest registered item. pin: page-lock host storage (CUDA only).
  TransferEngine(const std::string& backend_kind, int device, int num_slots, size_t slot_bytes, bool pin);
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  // --- items ---
  std::vector<int64_t> register_items(const std::vector<std::vector<HostSpan>>& items);
  size_t item_nbytes(int64_t handle) const;
  std::vector<ItemPart> item_parts(int64_t handle) const;
  std::string item_state(int64_t handle) const;  // "host", "resident", "prefetched" or "acquired"
  HostBytes item_host_bytes(int64_t handle) const;
  void check_handle(int64_t handle) const;
  std::string take_pin_failure();

  // --- slot memory ---
  size_t slot_bytes_needed() const;  // the slot size every registered item fits in
  size_t slot_bytes() const;         // attached (or fixed) slot size; 0 while auto-sized and unallocated
  bool slots_attached() const;
  // `alloc_stream`: the stream the memory was allocated on; copies wait for its pending work.
  void attach_slots(const std::vector<uintptr_t>& slot_ptrs, size_t slot_bytes, uintptr_t alloc_stream);
  void detach_slots();  // waits until nothing uses the slots; requires every slot FREE

  // --- protocol ---
  bool prefetch(int64_t handle);                  // true when a copy was enqueued, false on a hit
  int acquire(int64_t handle, uintptr_t stream);  // returns the slot index
  void release(int64_t handle, uintptr_t stream);
  void cancel(int64_t handle);  // undo a prefetch that will not be acquired
  // The item's host bytes are about to be rewritten: waits until no enqueued copy reads host memory, then
  // makes a slot still holding the old bytes forget them. Returns whether one did. Refused while the item
  // is prefetched or acquired.
  bool invalidate(int64_t handle);

  EngineStats stats();
  void reset_stats();
  void synchronize();
  void close();
  bool closed() const;
  int num_slots() const { return ring_.num_slots(); }
  const char* backend_kind() const { return backend_->kind(); }
  int device() const { return backend_->device(); }

 private:
  size_t index_of(int64_t handle) const;  // validates the handle
  void check_open() const;
  std::string describe(int64_t handle) const;
  std::string item_state_locked(size_t index) const;

  mutable std::mutex mutex_;
  const uint32_t engine_id_;  // upper half of every handle: a handle from another engine is caught
  const size_t fixed_slot_bytes_;
  std::unique_ptr<TransferBackend> backend_;
  ItemStore store_;
  SlotRing ring_;
  std::vector<uint8_t*> slot_ptrs_;
  size_t attached_slot_bytes_ = 0;
  uint64_t bytes_copied_ = 0;
  uint64_t copies_ = 0;
  uint64_t hits_ = 0;
  bool closed_ = false;
};

}  // namespace offload_kernels
