// engine/block_memory.h: KV blocks' memory from the heap, or from a pool of pinned slabs once
// installed. The pool is process-wide, so the cases below hold whichever ran first; ctest runs
// each alone.
#include "engine/block_memory.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "engine/kv_blocks.h"
#include "gtest/gtest.h"
#include "tests/plain_pinner.h"

namespace kvmem {
namespace {

constexpr int64_t kSlab = 64 << 10;

void Install(int64_t max_bytes = int64_t{16} << 20, int fail_after = -1) {
  ASSERT_TRUE(InstallPinnedBlockPool(std::make_unique<PlainPinner>(fail_after),
                                     {.max_bytes = max_bytes, .slab_bytes = kSlab})
                  .ok());
}

bool Pinned(const void* p) {
  PinnedRange r;
  return FindPinnedRange(p, &r);
}

TEST(BlockMemoryTest, BlocksComeFromTheHeapUntilAPoolIsInstalled) {
  if (PinnedBlockPoolInstalled()) GTEST_SKIP() << "an earlier case in this process installed it";
  RegisterBlockBytes(4096);
  void* p = AllocateBlockMemory(4096);
  EXPECT_FALSE(Pinned(p));
  FreeBlockMemory(p, 4096);
  KvBlock b = MakeEmptyBlock(0, 16, 2, 64, BlockDType::kBF16);  // 2048 values: 4096 bytes
  EXPECT_FALSE(Pinned(b.keys16.data()));
  EXPECT_EQ(GetPinnedBlockPoolStats().pinned_bytes, 0);
}

TEST(BlockMemoryTest, RegisteredSizesComeFromPinnedSlabsAndAreReused) {
  Install();
  const size_t size = 3000;  // not a multiple of the 256-byte piece alignment
  RegisterBlockBytes(size);
  const PinnedBlockPoolStats before = GetPinnedBlockPoolStats();
  std::vector<void*> pieces;
  for (int i = 0; i < 40; ++i) pieces.push_back(AllocateBlockMemory(size));  // two slabs' worth
  std::set<void*> distinct(pieces.begin(), pieces.end());
  EXPECT_EQ(distinct.size(), pieces.size());
  for (void* p : pieces) {
    PinnedRange r;
    ASSERT_TRUE(FindPinnedRange(p, &r));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u);
    EXPECT_LE(static_cast<const char*>(p) + size, r.end) << "a piece crosses its slab's end";
    EXPECT_EQ(r.device_offset, PlainPinner::kDeviceOffset);
    std::memset(p, 0xab, size);  // every byte of every piece is ours (ASan would catch overlap)
  }
  EXPECT_EQ(GetPinnedBlockPoolStats().bytes_in_use - before.bytes_in_use, 40 * 3072);
  // A freed piece is handed out again before the pool grows.
  const int64_t pinned = GetPinnedBlockPoolStats().pinned_bytes;
  FreeBlockMemory(pieces[7], size);
  void* again = AllocateBlockMemory(size);
  EXPECT_EQ(again, pieces[7]);
  EXPECT_EQ(GetPinnedBlockPoolStats().pinned_bytes, pinned);
  pieces[7] = again;
  for (void* p : pieces) FreeBlockMemory(p, size);
  EXPECT_EQ(GetPinnedBlockPoolStats().bytes_in_use, before.bytes_in_use);
  // Other sizes stay on the heap.
  void* other = AllocateBlockMemory(size + 1);
  EXPECT_FALSE(Pinned(other));
  FreeBlockMemory(other, size + 1);
}

TEST(BlockMemoryTest, BlocksAndTheirCopiesLiveInThePool) {
  Install();
  RegisterBlockBytes(16 * 2 * 32 * sizeof(uint16_t));
  RegisterBlockBytes(16 * 2 * 32 * sizeof(float));
  for (BlockDType dtype : {BlockDType::kBF16, BlockDType::kF32}) {
    KvBlock b = MakeEmptyBlock(3, 16, 2, 32, dtype);
    EXPECT_TRUE(Pinned(b.KeysAt(0)));
    EXPECT_TRUE(Pinned(b.ValuesAt(0)));
    KvBlock copy = b;
    EXPECT_TRUE(Pinned(copy.KeysAt(0)));
    EXPECT_NE(copy.KeysAt(0), b.KeysAt(0));
    const void* keys = b.KeysAt(0);
    KvBlock moved = std::move(b);
    EXPECT_EQ(moved.KeysAt(0), keys) << "a move keeps the memory";
  }
}

TEST(BlockMemoryTest, PastItsLimitThePoolLeavesBlocksOnTheHeap) {
  // Two slabs in all (an earlier case's larger limit would win: this one runs alone in ctest).
  Install(2 * kSlab);
  if (GetPinnedBlockPoolStats().max_bytes != 2 * kSlab) GTEST_SKIP() << "an earlier limit won";
  const size_t size = 8192;
  RegisterBlockBytes(size);
  const PinnedBlockPoolStats before = GetPinnedBlockPoolStats();
  std::vector<void*> pieces;
  int pinned = 0;
  for (int i = 0; i < 40; ++i) {
    pieces.push_back(AllocateBlockMemory(size));
    pinned += Pinned(pieces.back());
  }
  const PinnedBlockPoolStats after = GetPinnedBlockPoolStats();
  EXPECT_LE(after.pinned_bytes, std::max<int64_t>(2 * kSlab, before.pinned_bytes));
  EXPECT_EQ(pinned, (after.pinned_bytes - before.pinned_bytes) / static_cast<int64_t>(size));
  EXPECT_EQ(after.heap_fallbacks - before.heap_fallbacks, 40 - pinned);
  EXPECT_GT(40 - pinned, 0);
  for (void* p : pieces) FreeBlockMemory(p, size);  // heap pieces go back to the heap
  EXPECT_EQ(GetPinnedBlockPoolStats().bytes_in_use, before.bytes_in_use);
}

TEST(BlockMemoryTest, ALimitBelowOneSlabPinsTwoHalfSlabs) {
  if (PinnedBlockPoolInstalled()) GTEST_SKIP() << "an earlier case in this process installed it";
  ASSERT_TRUE(InstallPinnedBlockPool(std::make_unique<PlainPinner>(),
                                     {.max_bytes = 32 << 10, .slab_bytes = 1 << 20})
                  .ok());
  RegisterBlockBytes(1024);
  RegisterBlockBytes(512);
  void* a = AllocateBlockMemory(1024);
  void* b = AllocateBlockMemory(512);
  EXPECT_TRUE(Pinned(a));
  EXPECT_TRUE(Pinned(b));
  EXPECT_EQ(GetPinnedBlockPoolStats().pinned_bytes, 32 << 10);
  std::vector<void*> more;
  for (int i = 0; i < 20; ++i) more.push_back(AllocateBlockMemory(1024));  // 16 fit in 16 KiB
  EXPECT_EQ(GetPinnedBlockPoolStats().heap_fallbacks, 5);
  for (void* p : more) FreeBlockMemory(p, 1024);
  FreeBlockMemory(a, 1024);
  FreeBlockMemory(b, 512);
}

TEST(BlockMemoryTest, APinnerThatFailsLeavesBlocksOnTheHeap) {
  Install(int64_t{16} << 20, /*fail_after=*/0);
  if (GetPinnedBlockPoolStats().pinned_bytes > 0) GTEST_SKIP() << "an earlier case's pinner won";
  RegisterBlockBytes(2048);
  void* p = AllocateBlockMemory(2048);
  ASSERT_NE(p, nullptr);
  EXPECT_FALSE(Pinned(p));
  std::memset(p, 1, 2048);
  FreeBlockMemory(p, 2048);
  EXPECT_EQ(GetPinnedBlockPoolStats().pinned_bytes, 0);
}

TEST(BlockMemoryTest, BadLimitsAreRefused) {
  EXPECT_EQ(InstallPinnedBlockPool(std::make_unique<PlainPinner>(), {.max_bytes = 0}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(InstallPinnedBlockPool(std::make_unique<PlainPinner>(),
                                   {.max_bytes = 1 << 20, .slab_bytes = -1})
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(InstallPinnedBlockPool(nullptr, {.max_bytes = 1 << 20}).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BlockMemoryTest, ThreadsAllocatingAndFreeingAtOnceNeverShareAPiece) {
  Install();
  const size_t size = 1024;
  RegisterBlockBytes(size);
  std::vector<std::thread> threads;
  std::atomic<int> overlaps{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<uint8_t*> mine;
      for (int round = 0; round < 200; ++round) {
        auto* p = static_cast<uint8_t*>(AllocateBlockMemory(size));
        std::memset(p, t + 1, size);
        mine.push_back(p);
        if (mine.size() > 8) {
          uint8_t* old = mine.front();
          mine.erase(mine.begin());
          // Nobody else wrote into it while it was ours.
          if (std::count(old, old + size, static_cast<uint8_t>(t + 1)) != static_cast<long>(size)) {
            ++overlaps;
          }
          FreeBlockMemory(old, size);
        }
      }
      for (uint8_t* p : mine) FreeBlockMemory(p, size);
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(overlaps.load(), 0);
}

}  // namespace
}  // namespace kvmem
