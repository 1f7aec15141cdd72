#include "engine/slot_ring.h"

#include <stdexcept>
#include <string>

namespace offload_kernels {

const char* slot_state_name(SlotState state) {
  switch (state) {
    case SlotState::kFree: return "FREE";
    case SlotState::kLoading: return "LOADING";
    case SlotState::kAcquired: return "ACQUIRED";
  }
  return "?";
}

SlotRing::SlotRing(int num_slots) : slots_(static_cast<size_t>(num_slots)) {}

void SlotRing::track_items(size_t count) {
  if (count > slot_of_item_.size()) slot_of_item_.resize(count, kNoSlot);
}

int SlotRing::count(SlotState state) const {
  int n = 0;
  for (const Slot& s : slots_) n += s.state == state;
  return n;
}

int SlotRing::pick_free_slot() const {
  int best = kNoSlot;
  for (int i = 0; i < num_slots(); ++i) {
    const Slot& s = slots_[i];
    if (s.state == SlotState::kFree && (best == kNoSlot || s.freed_at < slots_[best].freed_at)) best = i;
  }
  return best;
}

void SlotRing::expect(int slot, SlotState state, const char* transition) const {
  if (slot < 0 || slot >= num_slots() || slots_[slot].state != state) {
    throw std::logic_error(std::string("internal error: slot transition ") + transition + " on slot " +
                           std::to_string(slot) + " in the wrong state");
  }
}

void SlotRing::begin_load(int slot, size_t item) {
  expect(slot, SlotState::kFree, "begin_load");
  Slot& s = slots_[slot];
  if (s.item != kNoItem) slot_of_item_[static_cast<size_t>(s.item)] = kNoSlot;
  s.item = static_cast<int64_t>(item);
  s.state = SlotState::kLoading;
  slot_of_item_[item] = slot;
}

void SlotRing::reuse(int slot) {
  expect(slot, SlotState::kFree, "reuse");
  if (slots_[slot].item == kNoItem) throw std::logic_error("internal error: reuse of an empty slot");
  slots_[slot].state = SlotState::kLoading;
}

void SlotRing::acquire(int slot) {
  expect(slot, SlotState::kLoading, "acquire");
  slots_[slot].state = SlotState::kAcquired;
}

void SlotRing::release(int slot) {
  expect(slot, SlotState::kAcquired, "release");
  mark_free(slots_[slot]);
}

void SlotRing::cancel(int slot) {
  expect(slot, SlotState::kLoading, "cancel");
  mark_free(slots_[slot]);
}

void SlotRing::forget_contents(int slot) {
  expect(slot, SlotState::kFree, "forget_contents");
  Slot& s = slots_[slot];
  if (s.item != kNoItem) slot_of_item_[static_cast<size_t>(s.item)] = kNoSlot;
  s.item = kNoItem;
  s.freed_at = 0;  // an empty slot is the first to reuse: taking it evicts nothing still valid
}

bool SlotRing::drop_item(size_t item) {
  const int slot = slot_of_item_[item];
  if (slot == kNoSlot) return false;
  forget_contents(slot);  // checks the slot is FREE
  return true;
}

void SlotRing::forget_all_contents() {
  for (int i = 0; i < num_slots(); ++i) forget_contents(i);
}

}  // namespace offload_kernels
