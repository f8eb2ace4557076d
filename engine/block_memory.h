// Host memory for KV blocks: ordinary heap memory, or, once a device backend installs a pool,
// page-locked memory the device reads in place.
//
// A GPU session's warm blocks are where its page-ins and recalls come from. From pageable
// memory every row must first be packed into a pinned staging buffer on the host (on an H100
// machine a 16K-token page-in at 8B shape ran at 5.9 GB/s that way, 0.11 of the pinned copy
// bandwidth). Blocks in pinned memory the device can address are read by the device itself:
// the upload sends only where each row lies, and a kernel gathers the rows over the bus.
//
// Every KvBlock keeps its values in BlockVector, whose allocator asks this module. Until
// InstallPinnedBlockPool is called (the CPU backend never calls it), that is plain operator
// new. After it, allocations of a registered block size come from pinned slabs, up to the
// pool's byte limit; past it, and for every other size, from the heap as before. Freed pieces
// go back to their slab's free list, so the pool never gives memory back to the system (it is
// bounded by its limit) and blocks reuse memory that is already faulted in.
#ifndef KVMEM_ENGINE_BLOCK_MEMORY_H_
#define KVMEM_ENGINE_BLOCK_MEMORY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvmem {

// Where pinned memory comes from: the CUDA backend's page-locked, device-mapped allocations,
// or plain memory in tests.
class HostMemoryPinner {
 public:
  virtual ~HostMemoryPinner() = default;
  // `bytes` of host memory the device can read, or an error (the pool then stops growing).
  virtual absl::StatusOr<void*> Allocate(size_t bytes) = 0;
  // The device's address of `base`, an address Allocate returned.
  virtual absl::StatusOr<const void*> DeviceAddress(void* base) = 0;
};

struct PinnedBlockPoolOptions {
  // Pinned bytes the pool may hold in all (whole slabs). Past it, blocks come from the heap.
  int64_t max_bytes = 0;
  // Default: 64 MiB. Bytes pinned at a time; each slab serves one block size.
  int64_t slab_bytes = int64_t{64} << 20;
};

// Makes block allocations of the registered sizes come from memory `pinner` gives, up to
// options.max_bytes. The pool lives as long as the process (blocks made from it may outlive
// any backend). A second call keeps the first pinner and raises the limit to the larger of the
// two. INVALID_ARGUMENT for a limit or slab size that is not positive.
absl::Status InstallPinnedBlockPool(std::unique_ptr<HostMemoryPinner> pinner,
                                    const PinnedBlockPoolOptions& options);
bool PinnedBlockPoolInstalled();

// Allocations of exactly `bytes` (one block's keys, or its values, in one type) come from the
// pool once it is installed. Sessions register their block shape when they are made; sizes past
// the eighth distinct one, or larger than a slab, stay on the heap.
void RegisterBlockBytes(size_t bytes);

// The allocator's two halves: memory for `bytes`, from the pool where it serves that size and
// has room, else from operator new (which throws std::bad_alloc when out of memory); and its
// release, to whichever of the two it came from.
void* AllocateBlockMemory(size_t bytes);
void FreeBlockMemory(void* p, size_t bytes);

// A run of pinned host memory and where the device sees it.
struct PinnedRange {
  const char* begin = nullptr;
  const char* end = nullptr;
  intptr_t device_offset = 0;  // device address = host address + device_offset

  bool Contains(const void* p) const {
    const char* c = static_cast<const char*>(p);
    return c >= begin && c < end;
  }
};

// The pinned slab holding `p`, or false when `p` is not in the pool. Lock-free: a device's
// upload calls it for every block it reads (keep the last range and test it first).
bool FindPinnedRange(const void* p, PinnedRange* range);

struct PinnedBlockPoolStats {
  int64_t pinned_bytes = 0;    // slabs taken from the pinner
  int64_t bytes_in_use = 0;    // pieces handed out and not yet freed
  int64_t heap_fallbacks = 0;  // allocations of a registered size the pool had no room for
  int64_t max_bytes = 0;       // the limit in force (0: no pool)
};
PinnedBlockPoolStats GetPinnedBlockPoolStats();

// The standard allocator interface over AllocateBlockMemory (stateless: every BlockVector can
// take another's memory).
template <typename T>
struct BlockAllocator {
  using value_type = T;
  BlockAllocator() = default;
  template <typename U>
  BlockAllocator(const BlockAllocator<U>&) {}  // NOLINT: conversion as std::allocator's
  T* allocate(size_t n) { return static_cast<T*>(AllocateBlockMemory(n * sizeof(T))); }
  void deallocate(T* p, size_t n) { FreeBlockMemory(p, n * sizeof(T)); }
  friend bool operator==(const BlockAllocator&, const BlockAllocator&) { return true; }
  friend bool operator!=(const BlockAllocator&, const BlockAllocator&) { return false; }
};

template <typename T>
using BlockVector = std::vector<T, BlockAllocator<T>>;

}  // namespace kvmem

#endif  // KVMEM_ENGINE_BLOCK_MEMORY_H_
