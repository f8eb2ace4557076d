#include "engine/block_memory.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <new>

#include "absl/strings/str_cat.h"

namespace kvmem {
namespace {

constexpr int kMaxSizes = 8;
constexpr int kMaxSlabs = 1 << 14;   // 1 TiB of 64 MiB slabs
constexpr size_t kPieceAlign = 256;  // pieces start on 256-byte boundaries (16-byte loads and more)

struct Slab {
  PinnedRange range;
  int size_index = 0;  // the registered size its pieces serve
};

// One registered size: its free pieces and the unused tail of its newest slab.
struct SizeClass {
  size_t stride = 0;  // the size rounded up to kPieceAlign
  std::vector<void*> free;
  char* carve = nullptr;
  char* carve_end = nullptr;
};

class Pool {
 public:
  bool installed() const { return installed_.load(std::memory_order_acquire); }

  absl::Status Install(std::unique_ptr<HostMemoryPinner> pinner,
                       const PinnedBlockPoolOptions& options) {
    if (options.max_bytes <= 0 || options.slab_bytes <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("a pinned block pool needs a positive byte limit and slab size, got ",
                       options.max_bytes, " and ", options.slab_bytes));
    }
    if (pinner == nullptr) return absl::InvalidArgumentError("a pinned block pool needs a pinner");
    std::lock_guard<std::mutex> lock(mu_);
    if (pinner_ == nullptr) {
      pinner_ = std::move(pinner);
      // A limit below one slab still pins: two slabs of half of it, so two block sizes (keys
      // and values of two types, say) each get one.
      slab_bytes_ = options.slab_bytes <= options.max_bytes
                        ? options.slab_bytes
                        : std::max<int64_t>(options.max_bytes / 2, 4096);
    }
    max_bytes_ = std::max(max_bytes_, options.max_bytes);
    installed_.store(true, std::memory_order_release);
    return absl::OkStatus();
  }

  void Register(size_t bytes) {
    if (bytes == 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    const int n = size_count_.load(std::memory_order_relaxed);
    if (n == kMaxSizes) return;
    for (int i = 0; i < n; ++i) {
      if (sizes_[i].load(std::memory_order_relaxed) == bytes) return;
    }
    classes_[n].stride = (bytes + kPieceAlign - 1) / kPieceAlign * kPieceAlign;
    sizes_[n].store(bytes, std::memory_order_relaxed);
    size_count_.store(n + 1, std::memory_order_release);
  }

  // A piece of registered size `bytes`, or null when the size is not served or the pool is full.
  void* Allocate(size_t bytes) {
    const int n = size_count_.load(std::memory_order_acquire);
    int index = -1;
    for (int i = 0; i < n; ++i) {
      if (sizes_[i].load(std::memory_order_relaxed) == bytes) index = i;
    }
    if (index < 0) return nullptr;
    std::unique_lock<std::mutex> lock(mu_);
    SizeClass& c = classes_[index];
    void* piece = nullptr;
    for (;;) {
      if (!c.free.empty()) {
        piece = c.free.back();
        c.free.pop_back();
        break;
      }
      if (c.carve != nullptr && c.carve + c.stride <= c.carve_end) {
        piece = c.carve;
        c.carve += c.stride;
        break;
      }
      if (growing_) {  // another thread is pinning a slab: its pieces may serve this one
        grown_.wait(lock);
        continue;
      }
      if (!NewSlab(index, lock)) break;
    }
    if (piece == nullptr) {
      heap_fallbacks_.fetch_add(1, std::memory_order_relaxed);
      return nullptr;
    }
    in_use_.fetch_add(static_cast<int64_t>(c.stride), std::memory_order_relaxed);
    return piece;
  }

  // True when `p` was a piece of the pool (now free again).
  bool Free(void* p) {
    const Slab* slab = FindSlab(p);
    if (slab == nullptr) return false;
    std::lock_guard<std::mutex> lock(mu_);
    SizeClass& c = classes_[slab->size_index];
    c.free.push_back(p);
    in_use_.fetch_sub(static_cast<int64_t>(c.stride), std::memory_order_relaxed);
    return true;
  }

  const Slab* FindSlab(const void* p) const {
    const int n = slab_count_.load(std::memory_order_acquire);
    for (int i = 0; i < n; ++i) {
      if (slabs_[i].range.Contains(p)) return &slabs_[i];
    }
    return nullptr;
  }

  PinnedBlockPoolStats Stats() const {
    PinnedBlockPoolStats s;
    s.pinned_bytes = pinned_bytes_.load(std::memory_order_relaxed);
    s.bytes_in_use = in_use_.load(std::memory_order_relaxed);
    s.heap_fallbacks = heap_fallbacks_.load(std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu_);
    s.max_bytes = max_bytes_;
    return s;
  }

 private:
  // Pins a new slab for size class `index` and makes it the class's carving slab; false when
  // the limit is reached or the pinner fails. Pinning takes milliseconds, so `lock` (on mu_) is
  // released meanwhile, with growing_ set: frees go on, and allocations wait for the slab.
  bool NewSlab(int index, std::unique_lock<std::mutex>& lock) {
    SizeClass& c = classes_[index];
    if (pinner_failed_ || static_cast<int64_t>(c.stride) > slab_bytes_ ||
        reserved_bytes_ + slab_bytes_ > max_bytes_ ||
        slab_count_.load(std::memory_order_relaxed) == kMaxSlabs) {
      return false;
    }
    growing_ = true;
    reserved_bytes_ += slab_bytes_;
    const size_t bytes = static_cast<size_t>(slab_bytes_);
    lock.unlock();
    absl::StatusOr<void*> base = pinner_->Allocate(bytes);
    absl::StatusOr<const void*> device =
        base.ok() ? pinner_->DeviceAddress(*base) : absl::StatusOr<const void*>(base.status());
    lock.lock();
    growing_ = false;
    grown_.notify_all();
    if (!device.ok()) {
      // Pinned memory ran out or the device refused it: the heap serves from here on. (A
      // refused slab stays allocated, unused: the pinner has no way to give it back.)
      pinner_failed_ = true;
      reserved_bytes_ -= slab_bytes_;
      return false;
    }
    // Room for every piece of the slab on the free list, so that freeing never allocates.
    const size_t pieces = bytes / c.stride;
    c.free.reserve(c.free.size() + pieces);
    const int n = slab_count_.load(std::memory_order_relaxed);
    char* b = static_cast<char*>(*base);
    Slab& slab = slabs_[n];
    slab.range.begin = b;
    slab.range.end = b + slab_bytes_;
    slab.range.device_offset = reinterpret_cast<intptr_t>(*device) - reinterpret_cast<intptr_t>(b);
    slab.size_index = index;
    slab_count_.store(n + 1, std::memory_order_release);  // readers see it whole
    pinned_bytes_.fetch_add(slab_bytes_, std::memory_order_relaxed);
    c.carve = b;
    c.carve_end = b + pieces * c.stride;
    return true;
  }

  std::atomic<bool> installed_{false};
  std::atomic<size_t> sizes_[kMaxSizes] = {};
  std::atomic<int> size_count_{0};
  Slab slabs_[kMaxSlabs];
  std::atomic<int> slab_count_{0};
  std::atomic<int64_t> pinned_bytes_{0};
  std::atomic<int64_t> in_use_{0};
  std::atomic<int64_t> heap_fallbacks_{0};

  mutable std::mutex mu_;  // guards what follows, and the growth of the slabs
  std::unique_ptr<HostMemoryPinner> pinner_;
  int64_t max_bytes_ = 0;
  int64_t slab_bytes_ = 0;
  int64_t reserved_bytes_ = 0;  // slabs pinned or being pinned
  bool growing_ = false;        // a thread is pinning a slab (with mu_ released)
  std::condition_variable grown_;
  bool pinner_failed_ = false;
  SizeClass classes_[kMaxSizes];
};

// Never destroyed: blocks made from the pool may be freed during static destruction.
Pool& ThePool() {
  static Pool* pool = new Pool;
  return *pool;
}

}  // namespace

absl::Status InstallPinnedBlockPool(std::unique_ptr<HostMemoryPinner> pinner,
                                    const PinnedBlockPoolOptions& options) {
  return ThePool().Install(std::move(pinner), options);
}

bool PinnedBlockPoolInstalled() { return ThePool().installed(); }

void RegisterBlockBytes(size_t bytes) { ThePool().Register(bytes); }

void* AllocateBlockMemory(size_t bytes) {
  Pool& pool = ThePool();
  if (pool.installed()) {
    if (void* p = pool.Allocate(bytes)) return p;
  }
  return ::operator new(bytes);
}

void FreeBlockMemory(void* p, size_t bytes) {
  if (p == nullptr) return;
  if (ThePool().Free(p)) return;
  ::operator delete(p, bytes);
}

bool FindPinnedRange(const void* p, PinnedRange* range) {
  const Slab* slab = ThePool().FindSlab(p);
  if (slab == nullptr) return false;
  *range = slab->range;
  return true;
}

PinnedBlockPoolStats GetPinnedBlockPoolStats() { return ThePool().Stats(); }

}  // namespace kvmem
