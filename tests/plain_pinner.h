// A HostMemoryPinner over plain heap memory, for tests of engine/block_memory.h's pool where no
// device is present: the "device" address is the host one shifted by a fixed offset, so that a
// test can tell the two apart (nothing dereferences it).
#ifndef KVMEM_TESTS_PLAIN_PINNER_H_
#define KVMEM_TESTS_PLAIN_PINNER_H_

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "engine/block_memory.h"

namespace kvmem {

class PlainPinner : public HostMemoryPinner {
 public:
  static constexpr intptr_t kDeviceOffset = intptr_t{1} << 40;

  // fail_after: slabs given before Allocate starts failing (-1: never).
  explicit PlainPinner(int fail_after = -1) : fail_after_(fail_after) {}

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    if (fail_after_ >= 0 && given_.load() >= fail_after_) {
      return absl::ResourceExhaustedError("no more pinned memory (test)");
    }
    ++given_;
    return std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);  // never freed, as pinned slabs
  }
  absl::StatusOr<const void*> DeviceAddress(void* base) override {
    return reinterpret_cast<const void*>(reinterpret_cast<intptr_t>(base) + kDeviceOffset);
  }

 private:
  int fail_after_;
  std::atomic<int> given_{0};
};

}  // namespace kvmem

#endif  // KVMEM_TESTS_PLAIN_PINNER_H_
