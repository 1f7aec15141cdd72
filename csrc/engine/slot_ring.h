// The slot state machine, free of any I/O: which item each device slot holds, what the slot is doing, and
// which free slot to reuse next.
//
//   FREE (holds stale-but-valid data, reusable) --prefetch--> LOADING --acquire--> ACQUIRED --release--> FREE
//   LOADING --cancel--> FREE
//   FREE holding an item --drop_item--> FREE and empty (the item's host bytes changed)
//
// A prefetch of an item already held by a FREE slot reuses it without a copy (a hit). Otherwise it takes
// the least recently released FREE slot, evicting whatever that slot held.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace offload_kernels {

enum class SlotState : uint8_t { kFree, kLoading, kAcquired };
const char* slot_state_name(SlotState state);

class SlotRing {
 public:
  static constexpr int64_t kNoItem = -1;
  static constexpr int kNoSlot = -1;

  explicit SlotRing(int num_slots);

  int num_slots() const { return static_cast<int>(slots_.size()); }
  void track_items(size_t count);  // the item table grows with registrations

  int slot_of(size_t item) const { return slot_of_item_[item]; }  // kNoSlot when not resident
  SlotState state(int slot) const { return slots_[slot].state; }
  int64_t item_in(int slot) const { return slots_[slot].item; }
  int count(SlotState state) const;

  int pick_free_slot() const;  // least recently released FREE slot, kNoSlot when none is free

  // Transitions; each one checks its precondition and throws std::logic_error on an internal misuse.
  void begin_load(int slot, size_t item);  // FREE -> LOADING with a new item (the old one is evicted)
  void reuse(int slot);                     // FREE -> LOADING keeping the item (a hit)
  void acquire(int slot);                   // LOADING -> ACQUIRED
  void release(int slot);                   // ACQUIRED -> FREE
  void cancel(int slot);                    // LOADING -> FREE
  void forget_contents(int slot);           // FREE slot no longer holds valid data
  void forget_all_contents();               // every slot FREE and empty (slot memory replaced)
  // The item's host bytes changed: the FREE slot holding it (if any) forgets it. Returns whether one did.
  bool drop_item(size_t item);

 private:
  struct Slot {
    SlotState state = SlotState::kFree;
    int64_t item = kNoItem;
    uint64_t freed_at = 0;  // tick of the last release/cancel; 0 = never used, so preferred
  };
  void expect(int slot, SlotState state, const char* transition) const;
  void mark_free(Slot& s) { s.state = SlotState::kFree; s.freed_at = ++tick_; }

  std::vector<Slot> slots_;
  std::vector<int> slot_of_item_;
  uint64_t tick_ = 0;
};

}  // namespace offload_kernels
