// The registered items: their bytes packed into host arenas, and the layout of each item's parts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/pinned_arena.h"

namespace offload_kernels {

// Parts of a multi-part item, and items within an arena, start on this boundary: device views of the
// parts stay aligned for vectorized loads.
constexpr size_t kPartAlignment = 256;

struct HostSpan {  // source bytes handed in by the caller for one part
  const void* data = nullptr;
  size_t nbytes = 0;
};

struct ItemPart {  // where a part lies inside its item
  size_t offset = 0;
  size_t nbytes = 0;
};

struct StoredItem {
  uint8_t* host = nullptr;        // first byte of the item in its arena
  size_t arena = 0;               // index of that arena
  size_t nbytes = 0;              // the span copied to a slot: parts plus the padding between them
  size_t payload_bytes = 0;       // the caller's bytes only
  std::vector<ItemPart> parts;
};

// Item size (parts laid out back to back, each aligned to kPartAlignment) and each part's offset.
size_t layout_item(const std::vector<HostSpan>& parts, std::vector<ItemPart>* out_parts);

class ItemStore {
 public:
  ItemStore(HostMemoryKind memory, int device);

  // Copies the items into host storage and returns the index of the first one (the rest follow in
  // order). A call's items share one allocation, or the unused tail of the previous one when they fit,
  // so many small registrations do not each pay a page. Callers validate the spans first.
  size_t add(const std::vector<std::vector<HostSpan>>& items);

  const StoredItem& item(size_t index) const { return items_[index]; }
  // Shared so that host views handed out to callers keep their arena alive after clear().
  std::shared_ptr<HostArena> arena_of(size_t index) const { return arenas_[items_[index].arena]; }
  size_t size() const { return items_.size(); }
  size_t max_item_bytes() const { return max_item_bytes_; }

  size_t registered_bytes() const { return registered_bytes_; }  // sum of payload bytes
  size_t pinned_bytes() const { return pinned_bytes_; }
  size_t host_bytes() const { return host_bytes_; }              // pinned + pageable arena bytes
  bool all_pinned() const { return memory_ == HostMemoryKind::kPinned && pinned_bytes_ == host_bytes_; }

  // Why the most recent allocation could not be pinned, once per failure; empty when nothing new failed.
  std::string take_pin_failure();

  void clear();  // drops every arena (freed once no host view holds it any more)

 private:
  HostMemoryKind memory_;
  int device_;
  std::vector<std::shared_ptr<HostArena>> arenas_;
  size_t open_arena_used_ = 0;  // bytes used in arenas_.back()
  std::vector<StoredItem> items_;
  size_t max_item_bytes_ = 0;
  size_t registered_bytes_ = 0;
  size_t pinned_bytes_ = 0;
  size_t host_bytes_ = 0;
  std::string pending_pin_failure_;
};

}  // namespace offload_kernels
