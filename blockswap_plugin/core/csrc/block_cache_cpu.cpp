// A cache of large CPU memory blocks behind torch's CPU allocator, for search.
//
// Scoring one candidate allocates and frees a few hundred tensors of 1 to 16
// MB. glibc serves them from per-thread heaps, which fragment and keep freed
// memory. In a two-thread WRN-40-2 search the process held about 0.7 GB more
// than its tensors used. Trimming those heaps after each candidate returns
// the memory, but the next candidate then faults every page in again.
//
// While enabled, this allocator serves each request of at least kMinBlock
// bytes from its own anonymous mappings. A freed block goes into a cache and
// is handed out again for a request of the same size class. The limit caps
// live plus cached bytes: before a new block is mapped, and when a block is
// freed, cached blocks are unmapped, least recently freed first, until the
// total fits. Where that would unmap a larger cached block, the larger block
// serves the request instead. So the blocks mapped at any time total the live
// tensors or the limit, whichever is more. Smaller requests go to the allocator that was
// installed before (glibc by way of c10).
//
// Once installed it stays installed: tensors made through it may outlive the
// search. When disabled it passes every request on and unmaps each of its
// blocks as the block is freed. Pointers it did not hand out are passed to
// the previous allocator's deleter, so memory allocated before installation
// is freed correctly.
#include "ops.h"

#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace {

constexpr size_t kMinBlock = size_t(1) << 20;
constexpr size_t kSmallStep = size_t(64) << 10;
constexpr size_t kLargeStep = size_t(2) << 20;
constexpr size_t kHugePage = size_t(2) << 20;

size_t size_class(size_t bytes) {
  size_t step = bytes < 4 * kLargeStep ? kSmallStep : kLargeStep;
  return (bytes + step - 1) / step * step;
}

// Maps a new block. With ``huge_pages``, a block of 2 MB or more starts on a
// 2 MB boundary, and its whole 2 MB pieces ask for transparent huge pages.
// Kernels whose setting is "always" or "madvise" grant them, and one page
// fault then fills 2 MB instead of 4 KB. Every huge page stays inside its
// block, so a block never makes the pages of a neighbouring mapping resident.
void* map_block(size_t size, bool huge_pages) {
  const int protection = PROT_READ | PROT_WRITE;
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS;
#ifdef MADV_HUGEPAGE
  if (huge_pages && size >= kHugePage) {
    // Map 2 MB more than needed, then unmap the parts before the first 2 MB
    // boundary and after the block.
    char* raw = static_cast<char*>(mmap(nullptr, size + kHugePage, protection, flags, -1, 0));
    if (raw == MAP_FAILED) return MAP_FAILED;
    uintptr_t address = reinterpret_cast<uintptr_t>(raw);
    char* data = raw + ((address + kHugePage - 1) / kHugePage * kHugePage - address);
    if (data > raw) munmap(raw, data - raw);
    char* end = raw + size + kHugePage;
    if (end > data + size) munmap(data + size, end - (data + size));
    // Advice only: if it fails, the block keeps 4 KB pages.
    madvise(data, size / kHugePage * kHugePage, MADV_HUGEPAGE);
    return data;
  }
#endif
  return mmap(nullptr, size, protection, flags, -1, 0);
}

class BlockCache final : public c10::Allocator {
 public:
  bool enable(size_t limit, bool huge_pages) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (previous_ == nullptr) {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current != this) {
        previous_ = current;
        // Priority 1 beats torch's default CPU allocator (priority 0).
        c10::SetCPUAllocator(this, 1);
      }
      if (c10::GetCPUAllocator() != this) {
        previous_ = nullptr;
        return false;
      }
    }
    limit_ = limit;
    huge_pages_ = huge_pages;
    enabled_ = true;
    peak_bytes_ = live_bytes_ + cached_bytes_;
    return true;
  }

  void disable() {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      enabled_ = false;
      drop.swap(free_);
      cached_bytes_ = 0;
    }
    unmap(drop);
  }

  void release() {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      drop.swap(free_);
      cached_bytes_ = 0;
    }
    unmap(drop);
  }

  std::map<std::string, int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {{"enabled", enabled_ ? 1 : 0},   {"hits", hits_},
            {"misses", misses_},             {"unmapped", unmapped_},
            {"live_bytes", int64_t(live_bytes_)}, {"cached_bytes", int64_t(cached_bytes_)},
            {"peak_bytes", int64_t(peak_bytes_)}, {"limit_bytes", int64_t(limit_)}};
  }

  c10::DataPtr allocate(size_t bytes) override {
    c10::Allocator* previous;
    size_t size = 0;
    void* data = nullptr;
    bool huge_pages = false;
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      previous = previous_;
      huge_pages = huge_pages_;
      if (enabled_ && bytes >= kMinBlock) {
        size = size_class(bytes);
        data = take(size, drop);
      }
    }
    unmap(drop);
    if (size == 0) {
      return previous->allocate(bytes);
    }
    if (data == nullptr) {
      data = map_block(size, huge_pages);
      if (data == MAP_FAILED) {
        // Hand the cached blocks back and try once more before giving up.
        release();
        data = map_block(size, huge_pages);
        TORCH_CHECK(data != MAP_FAILED, "blockswap block cache: cannot map ", size, " bytes: ",
                    std::strerror(errno));
      }
      std::lock_guard<std::mutex> guard(mutex_);
      ++misses_;
      note_live(data, size);
    }
    return {data, data, &BlockCache::free_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void free_block(void* data);

 private:
  struct Block {
    void* data;
    size_t size;
    uint64_t last_use;
  };

  // Called with the mutex held. Returns a cached block of the size class, or
  // nullptr after moving into ``drop`` the blocks to unmap so that a new
  // block of ``size`` keeps live + cached bytes within the limit. When that
  // would unmap a larger block, the larger block is handed out instead.
  void* take(size_t size, std::vector<Block>& drop) {
    auto exact = std::find_if(free_.begin(), free_.end(), [&](const Block& b) { return b.size == size; });
    auto chosen = exact;
    if (chosen == free_.end() && live_bytes_ + cached_bytes_ + size > limit_) {
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->size > size && (chosen == free_.end() || it->size < chosen->size)) chosen = it;
      }
    }
    if (chosen != free_.end()) {
      void* data = chosen->data;
      size_t got = chosen->size;
      remove(chosen);
      ++hits_;
      note_live(data, got);
      return data;
    }
    evict_until(size, drop);
    return nullptr;
  }

  // Called with the mutex held: move the least recently freed blocks into
  // ``drop`` until ``extra`` more bytes fit under the limit.
  void evict_until(size_t extra, std::vector<Block>& drop) {
    while (!free_.empty() && live_bytes_ + cached_bytes_ + extra > limit_) {
      auto oldest = std::min_element(free_.begin(), free_.end(),
                                     [](const Block& a, const Block& b) { return a.last_use < b.last_use; });
      drop.push_back(*oldest);
      remove(oldest);
      ++unmapped_;
    }
  }

  // Called with the mutex held.
  void remove(std::vector<Block>::iterator it) {
    cached_bytes_ -= it->size;
    *it = free_.back();
    free_.pop_back();
  }

  // Called with the mutex held.
  void note_live(void* data, size_t size) {
    sizes_[data] = size;
    live_bytes_ += size;
    peak_bytes_ = std::max(peak_bytes_, live_bytes_ + cached_bytes_);
  }

  void give_back(void* data) {
    std::vector<Block> drop;
    c10::DeleterFnPtr foreign = nullptr;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto found = sizes_.find(data);
      if (found == sizes_.end()) {
        foreign = previous_->raw_deleter();
      } else {
        size_t size = found->second;
        sizes_.erase(found);
        live_bytes_ -= size;
        if (enabled_) {
          evict_until(size, drop);
        }
        if (enabled_ && live_bytes_ + cached_bytes_ + size <= limit_) {
          free_.push_back({data, size, ++clock_});
          cached_bytes_ += size;
        } else {
          drop.push_back({data, size, 0});
          ++unmapped_;
        }
      }
    }
    if (foreign != nullptr) {
      foreign(data);
      return;
    }
    unmap(drop);
  }

  static void unmap(const std::vector<Block>& blocks) {
    for (const Block& block : blocks) munmap(block.data, block.size);
  }

  std::mutex mutex_;
  c10::Allocator* previous_ = nullptr;
  bool enabled_ = false;
  size_t limit_ = 0;
  bool huge_pages_ = false;
  std::vector<Block> free_;
  std::unordered_map<void*, size_t> sizes_;
  uint64_t clock_ = 0;
  size_t live_bytes_ = 0;
  size_t cached_bytes_ = 0;
  size_t peak_bytes_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  int64_t unmapped_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown.
BlockCache& cache() {
  static BlockCache* instance = new BlockCache();
  return *instance;
}

void BlockCache::free_block(void* data) { cache().give_back(data); }

}  // namespace

bool block_cache_enable(int64_t limit_bytes, bool huge_pages) {
  TORCH_CHECK(limit_bytes >= 0, "block cache limit must be 0 or more bytes, got ", limit_bytes);
  return cache().enable(size_t(limit_bytes), huge_pages);
}

void block_cache_disable() { cache().disable(); }

void block_cache_release() { cache().release(); }

std::map<std::string, int64_t> block_cache_stats() { return cache().stats(); }
