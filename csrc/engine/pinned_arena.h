// Host storage for registered items: one allocation of exactly the requested size rounded up to a 4 KiB
// page (never to a power of two), page-locked with cudaHostAlloc when asked and possible, else pageable.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace offload_kernels {

constexpr size_t kHostPageBytes = 4096;

constexpr size_t round_up(size_t n, size_t multiple) { return (n + multiple - 1) / multiple * multiple; }

enum class HostMemoryKind { kPageable, kPinned };

// Process-wide count of live arenas and their bytes: lets tests prove that close() frees everything.
struct LiveHostMemory {
  int64_t arenas = 0;
  int64_t pinned_bytes = 0;
  int64_t pageable_bytes = 0;
};
LiveHostMemory live_host_memory();

// Test hook: while set, every attempt to pin fails as if cudaHostAlloc had run out of page-locked memory,
// so the pageable fallback path can be exercised on purpose.
void set_force_pin_failure(bool fail);
bool force_pin_failure();

class HostArena {
 public:
  // Allocates round_up(bytes, kHostPageBytes) bytes. When `want` is kPinned, tries cudaHostAlloc on CUDA
  // device `device`; if that fails the arena is pageable and pin_failure() says why. Throws std::bad_alloc
  // when even pageable memory cannot be had.
  HostArena(size_t bytes, HostMemoryKind want, int device);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  uint8_t* data() const { return data_; }
  size_t capacity() const { return capacity_; }
  bool pinned() const { return pinned_; }
  const std::string& pin_failure() const { return pin_failure_; }

 private:
  bool try_pin(int device);

  uint8_t* data_ = nullptr;
  size_t capacity_ = 0;
  int device_ = -1;
  bool pinned_ = false;
  std::string pin_failure_;
};

}  // namespace offload_kernels
