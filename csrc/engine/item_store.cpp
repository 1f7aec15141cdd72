#include "engine/item_store.h"

#include <cstring>

namespace offload_kernels {

size_t layout_item(const std::vector<HostSpan>& parts, std::vector<ItemPart>* out_parts) {
  size_t end = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const size_t offset = i == 0 ? 0 : round_up(end, kPartAlignment);
    if (out_parts != nullptr) out_parts->push_back({offset, parts[i].nbytes});
    end = offset + parts[i].nbytes;
  }
  return end;
}

ItemStore::ItemStore(HostMemoryKind memory, int device) : memory_(memory), device_(device) {}

size_t ItemStore::add(const std::vector<std::vector<HostSpan>>& items) {
  // Lay out the whole call first: item offsets relative to the start of this call's block.
  std::vector<StoredItem> laid_out(items.size());
  std::vector<size_t> offsets(items.size());
  size_t block_bytes = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    StoredItem& it = laid_out[i];
    it.nbytes = layout_item(items[i], &it.parts);
    for (const HostSpan& s : items[i]) it.payload_bytes += s.nbytes;
    offsets[i] = round_up(block_bytes, kPartAlignment);
    block_bytes = offsets[i] + it.nbytes;
  }

  items_.reserve(items_.size() + items.size());  // the only allocation after the arena: fail before it

  // Place the block in the open arena's tail when it fits, else in a new arena of exactly its size.
  uint8_t* base = nullptr;
  size_t arena_index = 0;
  const size_t tail_start = round_up(open_arena_used_, kPartAlignment);
  if (!arenas_.empty() && tail_start + block_bytes <= arenas_.back()->capacity()) {
    base = arenas_.back()->data() + tail_start;
    arena_index = arenas_.size() - 1;
    open_arena_used_ = tail_start + block_bytes;
  } else {
    auto arena = std::make_shared<HostArena>(block_bytes, memory_, device_);
    if (memory_ == HostMemoryKind::kPinned && !arena->pinned()) pending_pin_failure_ = arena->pin_failure();
    if (arena->pinned()) pinned_bytes_ += arena->capacity();
    host_bytes_ += arena->capacity();
    base = arena->data();
    arena_index = arenas_.size();
    open_arena_used_ = block_bytes;
    arenas_.push_back(std::move(arena));
  }

  const size_t first = items_.size();
  for (size_t i = 0; i < items.size(); ++i) {
    StoredItem& it = laid_out[i];
    uint8_t* dst = base + offsets[i];
    for (size_t p = 0; p < items[i].size(); ++p) {
      const ItemPart& part = it.parts[p];
      if (p > 0) {  // zero the padding so that copied slots are fully deterministic
        const size_t prev_end = it.parts[p - 1].offset + it.parts[p - 1].nbytes;
        std::memset(dst + prev_end, 0, part.offset - prev_end);
      }
      std::memcpy(dst + part.offset, items[i][p].data, part.nbytes);
    }
    it.host = dst;
    it.arena = arena_index;
    if (it.nbytes > max_item_bytes_) max_item_bytes_ = it.nbytes;
    registered_bytes_ += it.payload_bytes;
    items_.push_back(std::move(it));
  }
  return first;
}

std::string ItemStore::take_pin_failure() {
  std::string out;
  out.swap(pending_pin_failure_);
  return out;
}

void ItemStore::clear() {
  items_.clear();
  arenas_.clear();
  open_arena_used_ = 0;
  max_item_bytes_ = registered_bytes_ = pinned_bytes_ = host_bytes_ = 0;
}

}  // namespace offload_kernels
