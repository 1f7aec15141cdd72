#include "engine/transfer_engine.h"

#include <atomic>
#include <stdexcept>

namespace offload_kernels {
namespace {

constexpr int kMaxSlots = 4096;
constexpr uint64_t kMaxItemsPerEngine = 0xffffffffull;

std::atomic<uint32_t> g_next_engine_id{1};

std::unique_ptr<TransferBackend> make_backend(const std::string& kind, int device, int num_slots) {
  if (num_slots < 1 || num_slots > kMaxSlots) {
    throw std::invalid_argument("num_slots must be between 1 and " + std::to_string(kMaxSlots) + ", got " +
                                std::to_string(num_slots));
  }
  if (kind == "host") return make_host_backend(num_slots);
  if (kind == "cuda") return make_cuda_backend(device, num_slots);
  throw std::invalid_argument("unknown backend '" + kind + "' (expected 'host' or 'cuda')");
}

std::string bytes_str(size_t n) { return std::to_string(n) + " bytes"; }

}  // namespace

TransferEngine::TransferEngine(const std::string& backend_kind, int device, int num_slots, size_t slot_bytes,
                               bool pin)
    : engine_id_(g_next_engine_id.fetch_add(1)),
      fixed_slot_bytes_(slot_bytes),
      backend_(make_backend(backend_kind, device, num_slots)),
      store_(pin && backend_kind == "cuda" ? HostMemoryKind::kPinned : HostMemoryKind::kPageable, device),
      ring_(num_slots) {}

TransferEngine::~TransferEngine() {
  try {
    close();
  } catch (...) {
    // close() frees everything it can before it reports; a destructor has nobody to report to.
  }
}

void TransferEngine::check_open() const {
  if (closed_) throw std::runtime_error("this TransferEngine is closed");
}

std::string TransferEngine::describe(int64_t handle) const { return "handle " + std::to_string(handle); }

size_t TransferEngine::index_of(int64_t handle) const {
  if (handle < 0 || static_cast<uint64_t>(handle) >> 32 != engine_id_) {
    throw std::invalid_argument(describe(handle) +
                                " does not belong to this TransferEngine (not a handle, or one returned by "
                                "another engine)");
  }
  const size_t index = static_cast<size_t>(static_cast<uint64_t>(handle) & 0xffffffffull);
  if (index >= store_.size()) throw std::invalid_argument("unknown " + describe(handle));
  return index;
}

std::vector<int64_t> TransferEngine::register_items(const std::vector<std::vector<HostSpan>>& items) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  if (items.empty()) throw std::invalid_argument("nothing to register: the list of items is empty");
  if (store_.size() + items.size() > kMaxItemsPerEngine) {
    throw std::invalid_argument("too many items for one TransferEngine");
  }
  const int busy = ring_.count(SlotState::kLoading) + ring_.count(SlotState::kAcquired);
  for (size_t i = 0; i < items.size(); ++i) {
    const std::string which = items.size() == 1 ? "the item" : "item " + std::to_string(i);
    if (items[i].empty()) throw std::invalid_argument(which + " has no parts");
    for (size_t p = 0; p < items[i].size(); ++p) {
      if (items[i][p].nbytes == 0) {
        throw std::invalid_argument(which + (items[i].size() > 1 ? ", part " + std::to_string(p) + "," : "") +
                                    " is empty (0 bytes): nothing to transfer");
      }
      if (items[i][p].data == nullptr) throw std::invalid_argument(which + " has a null data pointer");
    }
    const size_t nbytes = layout_item(items[i], nullptr);
    if (fixed_slot_bytes_ != 0 && nbytes > fixed_slot_bytes_) {
      throw std::invalid_argument(which + " needs " + bytes_str(nbytes) + " but the slots hold " +
                                  bytes_str(fixed_slot_bytes_) + " (slot_bytes was fixed at construction)");
    }
    if (!slot_ptrs_.empty() && nbytes > attached_slot_bytes_ && busy > 0) {
      throw std::invalid_argument(which + " needs " + bytes_str(nbytes) + ", more than the " +
                                  bytes_str(attached_slot_bytes_) + " slots, which cannot grow while " +
                                  std::to_string(busy) +
                                  " of them are in use: release them first, or construct the engine with "
                                  "slot_bytes= large enough");
    }
  }
  const size_t first = store_.add(items);
  ring_.track_items(store_.size());
  std::vector<int64_t> handles(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    handles[i] = static_cast<int64_t>((static_cast<uint64_t>(engine_id_) << 32) | (first + i));
  }
  return handles;
}

size_t TransferEngine::item_nbytes(int64_t handle) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  return store_.item(index_of(handle)).nbytes;
}

std::vector<ItemPart> TransferEngine::item_parts(int64_t handle) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  return store_.item(index_of(handle)).parts;
}

HostBytes TransferEngine::item_host_bytes(int64_t handle) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const size_t index = index_of(handle);
  const StoredItem& item = store_.item(index);
  return {store_.arena_of(index), item.host, item.nbytes};
}

std::string TransferEngine::item_state_locked(size_t index) const {
  const int slot = ring_.slot_of(index);
  if (slot == SlotRing::kNoSlot) return "host";
  switch (ring_.state(slot)) {
    case SlotState::kFree: return "resident";
    case SlotState::kLoading: return "prefetched";
    case SlotState::kAcquired: return "acquired";
  }
  return "?";
}

std::string TransferEngine::item_state(int64_t handle) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  return item_state_locked(index_of(handle));
}

void TransferEngine::check_handle(int64_t handle) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  (void)index_of(handle);
}

std::string TransferEngine::take_pin_failure() {
  std::lock_guard<std::mutex> lock(mutex_);
  return store_.take_pin_failure();
}

size_t TransferEngine::slot_bytes_needed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return fixed_slot_bytes_ != 0 ? fixed_slot_bytes_ : store_.max_item_bytes();
}

size_t TransferEngine::slot_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return slot_ptrs_.empty() ? fixed_slot_bytes_ : attached_slot_bytes_;
}

bool TransferEngine::slots_attached() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !slot_ptrs_.empty();
}

void TransferEngine::attach_slots(const std::vector<uintptr_t>& slot_ptrs, size_t slot_bytes,
                                  uintptr_t alloc_stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  if (!slot_ptrs_.empty()) throw std::runtime_error("slots are already attached; detach them first");
  if (slot_ptrs.size() != static_cast<size_t>(ring_.num_slots())) {
    throw std::invalid_argument("expected " + std::to_string(ring_.num_slots()) + " slot pointers, got " +
                                std::to_string(slot_ptrs.size()));
  }
  const size_t needed = fixed_slot_bytes_ != 0 ? fixed_slot_bytes_ : store_.max_item_bytes();
  if (slot_bytes == 0 || slot_bytes < needed) {
    throw std::invalid_argument("slots of " + bytes_str(slot_bytes) + " cannot hold the largest item (" +
                                bytes_str(needed) + ")");
  }
  for (uintptr_t p : slot_ptrs) {
    if (p == 0) throw std::invalid_argument("null slot pointer");
  }
  backend_->order_after(alloc_stream);
  for (uintptr_t p : slot_ptrs) slot_ptrs_.push_back(reinterpret_cast<uint8_t*>(p));
  attached_slot_bytes_ = slot_bytes;
}

void TransferEngine::detach_slots() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const int busy = ring_.count(SlotState::kLoading) + ring_.count(SlotState::kAcquired);
  if (busy > 0) {
    throw std::runtime_error("cannot replace the slots while " + std::to_string(busy) +
                             " of them are in use (prefetched or acquired)");
  }
  backend_->synchronize(false);  // copies and released consumers may still touch the old memory
  ring_.forget_all_contents();
  slot_ptrs_.clear();
  attached_slot_bytes_ = 0;
}

bool TransferEngine::prefetch(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const size_t index = index_of(handle);
  const StoredItem& item = store_.item(index);
  if (slot_ptrs_.empty()) throw std::runtime_error("no slot memory is attached (attach_slots first)");
  if (item.nbytes > attached_slot_bytes_) {
    throw std::invalid_argument(describe(handle) + " needs " + bytes_str(item.nbytes) + " but the slots hold " +
                                bytes_str(attached_slot_bytes_));
  }

  const int resident = ring_.slot_of(index);
  if (resident != SlotRing::kNoSlot) {
    switch (ring_.state(resident)) {
      case SlotState::kFree:  // its bytes are still in the slot: no copy
        ring_.reuse(resident);
        ++hits_;
        return false;
      case SlotState::kLoading:  // already prefetched
        ++hits_;
        return false;
      case SlotState::kAcquired:
        throw std::runtime_error(describe(handle) +
                                 " is acquired; release it before prefetching it again (an item is in at most "
                                 "one slot)");
    }
  }

  const int slot = ring_.pick_free_slot();
  if (slot == SlotRing::kNoSlot) {
    throw std::runtime_error(
        "all " + std::to_string(ring_.num_slots()) + " slots are in use (" +
        std::to_string(ring_.count(SlotState::kLoading)) + " prefetched, " +
        std::to_string(ring_.count(SlotState::kAcquired)) + " acquired): release one first or use more slots "
        "(num_slots)");
  }
  ring_.forget_contents(slot);  // about to be overwritten: if the enqueue fails the slot is empty, not stale
  backend_->enqueue_copy(slot, slot_ptrs_[static_cast<size_t>(slot)], item.host, item.nbytes);
  ring_.begin_load(slot, index);
  ++copies_;
  bytes_copied_ += item.nbytes;
  return true;
}

int TransferEngine::acquire(int64_t handle, uintptr_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const size_t index = index_of(handle);
  backend_->check_stream(stream);
  const int slot = ring_.slot_of(index);
  if (slot == SlotRing::kNoSlot) {
    throw std::runtime_error(describe(handle) +
                             " is not in a slot (never prefetched, or evicted since): call prefetch() before "
                             "acquire()");
  }
  if (ring_.state(slot) == SlotState::kFree) {
    throw std::runtime_error(describe(handle) +
                             " is resident but was released: every acquire() needs its own prefetch() (a "
                             "prefetch of a resident item is a hit, no copy)");
  }
  if (ring_.state(slot) == SlotState::kAcquired) {
    throw std::runtime_error(describe(handle) +
                             " is already acquired: release it before acquiring it again (one acquire at a "
                             "time per item)");
  }
  backend_->wait_copy(slot, stream);
  ring_.acquire(slot);
  return slot;
}

void TransferEngine::release(int64_t handle, uintptr_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const size_t index = index_of(handle);
  backend_->check_stream(stream);
  const int slot = ring_.slot_of(index);
  if (slot == SlotRing::kNoSlot || ring_.state(slot) != SlotState::kAcquired) {
    throw std::runtime_error(describe(handle) + " is not acquired (it is " + item_state_locked(index) +
                             "): release() must follow acquire(), once");
  }
  backend_->release_slot(slot, stream);
  ring_.release(slot);
}

void TransferEngine::cancel(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const size_t index = index_of(handle);
  const int slot = ring_.slot_of(index);
  if (slot == SlotRing::kNoSlot || ring_.state(slot) != SlotState::kLoading) {
    throw std::runtime_error(describe(handle) + " is not prefetched (it is " + item_state_locked(index) +
                             "): cancel() undoes a prefetch() that was not acquired");
  }
  ring_.cancel(slot);  // the copy (if any) still lands; the slot keeps the item as a reusable FREE slot
}

bool TransferEngine::invalidate(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const size_t index = index_of(handle);
  const int slot = ring_.slot_of(index);
  if (slot != SlotRing::kNoSlot && ring_.state(slot) == SlotState::kAcquired) {
    throw std::runtime_error(describe(handle) +
                             " is acquired: release it before invalidate() (a consumer may still read its slot)");
  }
  if (slot != SlotRing::kNoSlot && ring_.state(slot) == SlotState::kLoading) {
    throw std::runtime_error(describe(handle) +
                             " is prefetched: cancel() it (or acquire and release it) before invalidate(); its "
                             "copy carries the bytes as they were");
  }
  // A copy of this item may still be reading its host bytes even when no slot names it: after cancel(), or
  // after its slot was taken by another item. Copies drain in order, so waiting for all of them covers it.
  backend_->wait_copies();
  return ring_.drop_item(index);
}

EngineStats TransferEngine::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  EngineStats s;
  s.bytes_copied = bytes_copied_;
  s.copies = copies_;
  s.hits = hits_;
  s.timings = backend_->timings();
  s.pinned_bytes = store_.pinned_bytes();
  s.host_bytes = store_.host_bytes();
  s.registered_bytes = store_.registered_bytes();
  s.device_bytes = slot_ptrs_.size() * attached_slot_bytes_;
  s.items = store_.size();
  s.num_slots = ring_.num_slots();
  s.slot_bytes = slot_ptrs_.empty() ? fixed_slot_bytes_ : attached_slot_bytes_;
  s.backend = backend_->kind();
  s.pinned = store_.all_pinned();
  return s;
}

void TransferEngine::reset_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  bytes_copied_ = copies_ = hits_ = 0;
  backend_->reset_timings();
}

void TransferEngine::synchronize() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  backend_->synchronize(false);
}

void TransferEngine::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) return;
  closed_ = true;
  std::string error;
  try {
    // Acquired slots may still be read by work on streams the engine never saw: wait for the device.
    backend_->synchronize(ring_.count(SlotState::kAcquired) > 0);
  } catch (const std::exception& e) {
    error = e.what();
  }
  try {
    backend_->shutdown();
  } catch (const std::exception& e) {
    if (error.empty()) error = e.what();
  }
  store_.clear();  // only now: copies read from these arenas until the backend was idle
  slot_ptrs_.clear();
  attached_slot_bytes_ = 0;
  if (!error.empty()) throw std::runtime_error(error);
}

bool TransferEngine::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

}  // namespace offload_kernels
