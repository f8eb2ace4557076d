// Warm and cold tiers on their own: byte budgets, bit-exact round trips, checksums.
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tiers/block_files.h"
#include "tiers/cold_store.h"
#include "tiers/crc32c.h"
#include "tiers/record_codec.h"
#include "tiers/warm_store.h"

namespace kvmem {
namespace {

std::shared_ptr<const KvBlock> RandomBlock(int64_t index, int filled, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  auto b = std::make_shared<KvBlock>(MakeEmptyBlock(index, 16, 4, 8));
  b->filled = filled;
  for (int i = 0; i < filled * 4 * 8; ++i) {
    b->keys[i] = normal(rng);
    b->values[i] = normal(rng);
  }
  return b;
}

TEST(Crc32cTest, MatchesKnownVectors) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xe3069283u);
  std::string zeros(32, '\0');
  EXPECT_EQ(Crc32c(zeros.data(), zeros.size()), 0x8a9136aau);
  EXPECT_EQ(Crc32c("56789", 5, Crc32c("1234", 4)), 0xe3069283u);  // streaming
}

TEST(Crc32cTest, HardwareAndTablePathsAgree) {
  EXPECT_EQ(Crc32cPortable("123456789", 9), 0xe3069283u);
  std::mt19937 rng(11);
  for (size_t n : {0, 1, 7, 8, 9, 63, 64, 1000, 4097}) {
    std::string bytes(n, '\0');
    for (char& c : bytes) c = static_cast<char>(rng());
    EXPECT_EQ(Crc32c(bytes.data(), n), Crc32cPortable(bytes.data(), n)) << n;
    EXPECT_EQ(Crc32c(bytes.data(), n, 0x1234), Crc32cPortable(bytes.data(), n, 0x1234)) << n;
  }
}

TEST(WarmStoreTest, KeepsItsByteBudgetExactlyAndEvictsLeastRecentlyUsed) {
  WarmStore warm(1000);
  for (int i = 0; i < 4; ++i) warm.Put({1, 0, i}, RandomBlock(i, 1, i), 250);
  EXPECT_EQ(warm.bytes(), 1000);
  EXPECT_NE(warm.Get({1, 0, 0}), nullptr);         // block 0 becomes most recently used
  warm.Put({1, 0, 4}, RandomBlock(4, 1, 4), 300);  // must evict 1 and 2 (250 each)
  EXPECT_LE(warm.bytes(), 1000);
  EXPECT_EQ(warm.bytes(), 250 + 250 + 300);
  EXPECT_TRUE(warm.Contains({1, 0, 0}));
  EXPECT_FALSE(warm.Contains({1, 0, 1}));
  EXPECT_FALSE(warm.Contains({1, 0, 2}));
  EXPECT_TRUE(warm.Contains({1, 0, 3}));
  warm.Put({1, 0, 5}, RandomBlock(5, 1, 5), 1001);  // larger than the budget: not kept
  EXPECT_FALSE(warm.Contains({1, 0, 5}));
  EXPECT_EQ(warm.bytes(), 800);
  warm.Put({2, 0, 0}, RandomBlock(0, 1, 9), 200);
  warm.EraseOwner(1);
  EXPECT_EQ(warm.size(), 1);
  EXPECT_EQ(warm.bytes(), 200);
  // Many random operations never break the budget.
  std::mt19937 rng(3);
  for (int i = 0; i < 2000; ++i) {
    warm.Put({3, 0, static_cast<int64_t>(rng() % 50)}, RandomBlock(0, 1, 1), 1 + rng() % 400);
    ASSERT_LE(warm.bytes(), 1000);
  }
}

TEST(WarmStoreTest, OfferedPartialBlockIsNeverKeptEvenAfterTheNewerCopyWasEvicted) {
  WarmStore warm(200);
  // A reader fetched 5 positions of a partial block from cold; then the owner committed 9 and
  // other blocks pushed those 9 out of warm before the reader offered its older copy.
  warm.Put({1, 0, 0}, RandomBlock(0, 9, 1), 100);
  warm.Put({2, 0, 0}, RandomBlock(0, 16, 2), 100);
  warm.Put({2, 0, 1}, RandomBlock(1, 16, 3), 100);
  ASSERT_FALSE(warm.Contains({1, 0, 0}));
  warm.Offer({1, 0, 0}, RandomBlock(0, 5, 4), 16, 100);
  EXPECT_FALSE(warm.Contains({1, 0, 0}));  // the next read goes to cold, which has all 9
  // Held partial copies are left alone too.
  warm.Put({1, 0, 0}, RandomBlock(0, 9, 1), 100);
  warm.Offer({1, 0, 0}, RandomBlock(0, 12, 5), 16, 100);
  EXPECT_EQ(warm.Get({1, 0, 0})->filled, 9);
}

TEST(WarmStoreTest, OfferKeepsFullBlocksOverPartialCopiesButNotOverFullOnes) {
  WarmStore warm(1 << 20);
  warm.Offer({1, 0, 1}, RandomBlock(1, 16, 1), 16, 100);  // absent: kept
  EXPECT_TRUE(warm.Contains({1, 0, 1}));
  auto held = warm.Get({1, 0, 1});
  warm.Offer({1, 0, 1}, RandomBlock(1, 16, 2), 16, 100);  // full copies are all the same
  EXPECT_EQ(warm.Get({1, 0, 1}), held);
  warm.Put({1, 0, 2}, RandomBlock(2, 9, 3), 100);  // the owner's last commit, then it filled
  auto full = RandomBlock(2, 16, 4);
  warm.Offer({1, 0, 2}, full, 16, 100);
  EXPECT_EQ(warm.Get({1, 0, 2}), full);
  EXPECT_EQ(warm.bytes(), 200);
}

TEST(WarmStoreTest, RoundTripIsTheSameBlock) {
  WarmStore warm(1 << 20);
  auto block = RandomBlock(7, 16, 1);
  warm.Put({9, 2, 7}, block, 4096);
  auto got = warm.Get({9, 2, 7});
  ASSERT_NE(got, nullptr);
  EXPECT_EQ(got->keys, block->keys);
  EXPECT_EQ(got->values, block->values);
  EXPECT_EQ(warm.hits(), 1);
  EXPECT_EQ(warm.Get({9, 2, 8}), nullptr);
  EXPECT_EQ(warm.misses(), 1);
}

TEST(RecordCodecTest, BlocksRoundTripBitExactAndCorruptionIsDataLoss) {
  auto block = RandomBlock(3, 11, 2);
  std::string bytes = EncodeBlock(*block, 4, 8);
  auto back = DecodeBlock(bytes, 16, 4, 8);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->index, 3);
  EXPECT_EQ(back->filled, 11);
  EXPECT_EQ(0, std::memcmp(back->keys.data(), block->keys.data(), block->keys.size() * 4));
  EXPECT_EQ(0, std::memcmp(back->values.data(), block->values.data(), block->values.size() * 4));
  for (size_t at : {size_t{0}, bytes.size() / 2, bytes.size() - 1}) {
    std::string bad = bytes;
    bad[at] ^= 0x20;
    EXPECT_EQ(DecodeBlock(bad, 16, 4, 8).status().code(), absl::StatusCode::kDataLoss) << at;
  }
  EXPECT_EQ(DecodeBlock(bytes, 32, 4, 8).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(DecodeBlock("", 16, 4, 8).status().code(), absl::StatusCode::kDataLoss);
}

TEST(RecordCodecTest, DeviceRowsTakeHalfTheBytesAndComeBackBitExact) {
  auto block = [](float (*value)(std::mt19937&)) {
    std::mt19937 rng(9);
    auto b = std::make_shared<KvBlock>(MakeEmptyBlock(5, 16, 4, 8));
    b->filled = 16;
    for (float& v : b->keys) v = value(rng);
    for (float& v : b->values) v = value(rng);
    return b;
  };
  // bf16 rows (as the GPU keeps them in bf16 mode): the low 16 bits of every f32 are zero.
  auto bf16 = block([](std::mt19937& rng) {
    uint32_t bits = static_cast<uint32_t>(rng()) & 0xffff0000u;
    if (((bits >> 23) & 0xff) == 0xff) bits &= 0xbfffffffu;  // no infinities or NaNs
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  });
  // f16 rows: an 11-bit significand (odd, so never a bf16) scaled into the half range, plus
  // subnormal halves, zeros of both signs and infinities.
  auto f16 = block([](std::mt19937& rng) {
    switch (rng() % 8) {
      case 0:
        return std::ldexp(static_cast<float>(rng() % 1023 + 1), -24);  // subnormal
      case 1:
        return rng() % 2 ? 0.f : -0.f;
      case 2:
        return rng() % 2 ? INFINITY : -INFINITY;
      default: {
        const float m = static_cast<float>((rng() % 1024 + 1024) | 1);
        const int e = static_cast<int>(rng() % 30) - 14;  // normal halves: 2^-14 .. 2^15
        return (rng() % 2 ? 1.f : -1.f) * std::ldexp(m, e - 10);
      }
    }
  });
  auto f32 = RandomBlock(5, 16, 3);
  const std::string f32_bytes = EncodeBlock(*f32, 4, 8);
  for (const auto& [name, b] : {std::pair{"bf16", bf16}, std::pair{"f16", f16}}) {
    SCOPED_TRACE(name);
    const std::string bytes = EncodeBlock(*b, 4, 8);
    EXPECT_LT(bytes.size(), f32_bytes.size() / 2 + 64);
    auto back = DecodeBlock(bytes, 16, 4, 8);
    ASSERT_TRUE(back.ok()) << back.status();
    // The block comes back in the 16-bit type, holding the very same values.
    EXPECT_EQ(back->dtype, name == std::string("bf16") ? BlockDType::kBF16 : BlockDType::kF16);
    EXPECT_EQ(back->bytes(), b->bytes() / 2);
    const KvBlock wide = WidenedBlock(*back);
    EXPECT_EQ(0, std::memcmp(wide.keys.data(), b->keys.data(), b->keys.size() * 4));
    EXPECT_EQ(0, std::memcmp(wide.values.data(), b->values.data(), b->values.size() * 4));
    // A block typed 16-bit from the start (a GPU session's) is stored the same way.
    KvBlock typed = MakeEmptyBlock(5, 16, 4, 8, back->dtype);
    typed.filled = 16;
    typed.WriteKeys(0, b->keys.data(), b->size());
    typed.WriteValues(0, b->values.data(), b->size());
    EXPECT_EQ(EncodeBlock(typed, 4, 8), bytes);
    EXPECT_EQ(back->keys16, typed.keys16);
  }
  // One value that neither half type holds keeps the whole block in f32.
  auto mixed = std::make_shared<KvBlock>(*bf16);
  mixed->values[77] = 1.0f + 0x1p-20f;
  const std::string bytes = EncodeBlock(*mixed, 4, 8);
  EXPECT_EQ(bytes.size(), f32_bytes.size());
  auto back = DecodeBlock(bytes, 16, 4, 8);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->values, mixed->values);
  EXPECT_EQ(0, std::memcmp(back->keys.data(), mixed->keys.data(), mixed->keys.size() * 4));
}

// A full 16-bit block of random bits (no NaNs), as a device backend's session writes them.
std::shared_ptr<const KvBlock> Random16Block(int64_t index, BlockDType dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  auto b = std::make_shared<KvBlock>(MakeEmptyBlock(index, 16, 4, 8, dtype));
  b->filled = 16;
  for (BlockVector<uint16_t>* v : {&b->keys16, &b->values16}) {
    for (uint16_t& x : *v) x = static_cast<uint16_t>(rng() & 0x3fff);
  }
  return b;
}

// DecodeBlockInto's reader over a record's bytes: fills the pieces in order.
auto ReaderOf(const std::string& bytes) {
  return [&bytes](const std::vector<MutablePiece>& pieces) {
    size_t at = 0;
    for (const MutablePiece& p : pieces) {
      if (at + p.size > bytes.size()) return absl::DataLossError("short");
      std::memcpy(p.data, bytes.data() + at, p.size);
      at += p.size;
    }
    return at == bytes.size() ? absl::OkStatus() : absl::DataLossError("long");
  };
}

TEST(RecordCodecTest, SixteenBitBlocksAreWrittenFromAndReadIntoTheBlockItself) {
  for (BlockDType dtype : {BlockDType::kBF16, BlockDType::kF16}) {
    SCOPED_TRACE(static_cast<int>(dtype));
    auto block = Random16Block(6, dtype, 4);
    const BlockRecord record = EncodeBlockRecord(*block, 4, 8);
    // The values are not copied: the pieces are views of the block's own memory.
    EXPECT_EQ(record.keys.data(), reinterpret_cast<const char*>(block->keys16.data()));
    EXPECT_EQ(record.values.data(), reinterpret_cast<const char*>(block->values16.data()));
    const std::string bytes = record.Flatten();
    EXPECT_EQ(bytes, EncodeBlock(*block, 4, 8));
    // The bytes of the stored layout, written field by field (what stores already hold).
    ByteWriter golden;
    golden.U32(0x4b564231);  // "KVB1"
    golden.U8(dtype == BlockDType::kBF16 ? 2 : 3);
    golden.I64(6);
    golden.U32(16);  // filled
    golden.U32(16);  // block size
    golden.U32(4);   // KV heads
    golden.U32(8);   // head_dim
    golden.U16s(block->keys16);
    golden.U16s(block->values16);
    EXPECT_EQ(bytes, golden.Finish());
    EXPECT_EQ(bytes.size(), record.size());
    EXPECT_EQ(bytes.size(), Block16RecordSize(block->size()));
    EXPECT_EQ(TrailingCrc(bytes), record.crc);

    KvBlock back = MakeEmptyBlock(0, 16, 4, 8, BlockDType::kBF16);
    ASSERT_TRUE(DecodeBlockInto(ReaderOf(bytes), 16, 4, 8, &back).ok());
    EXPECT_EQ(back.dtype, dtype);
    EXPECT_EQ(back.index, 6);
    EXPECT_EQ(back.filled, 16);
    EXPECT_EQ(back.keys16, block->keys16);
    EXPECT_EQ(back.values16, block->values16);
    // A flipped bit anywhere (header, keys, the values' count, values, checksum) is DATA_LOSS.
    for (size_t at : {size_t{2}, size_t{40}, record.head.size() + record.keys.size() + 3,
                      bytes.size() - 9, bytes.size() - 1}) {
      std::string bad = bytes;
      bad[at] ^= 0x04;
      KvBlock into = MakeEmptyBlock(0, 16, 4, 8, BlockDType::kBF16);
      EXPECT_EQ(DecodeBlockInto(ReaderOf(bad), 16, 4, 8, &into).code(), absl::StatusCode::kDataLoss)
          << at;
    }
    // Another layout is DATA_LOSS; the reader's own error passes through as it is.
    KvBlock wide = MakeEmptyBlock(0, 16, 8, 4, BlockDType::kBF16);
    EXPECT_EQ(DecodeBlockInto(ReaderOf(bytes), 16, 8, 4, &wide).code(),
              absl::StatusCode::kDataLoss);
    auto exhausted = [](const std::vector<MutablePiece>&) {
      return absl::ResourceExhaustedError("no descriptors");
    };
    EXPECT_EQ(DecodeBlockInto(exhausted, 16, 4, 8, &back).code(),
              absl::StatusCode::kResourceExhausted);
  }
  // An f32 block is narrowed, so it is encoded whole.
  const BlockRecord f32 = EncodeBlockRecord(*RandomBlock(1, 16, 5), 4, 8);
  EXPECT_TRUE(f32.keys.empty() && f32.values.empty() && f32.mid.empty());
  EXPECT_EQ(f32.Flatten(), EncodeBlock(*RandomBlock(1, 16, 5), 4, 8));
}

TEST(KvBlockTest, TypedBlocksHoldTheirTypesValuesAndRoundBf16ToNearestEven) {
  KvBlock bf16 = MakeEmptyBlock(0, 2, 1, 4, BlockDType::kBF16);
  EXPECT_EQ(bf16.bytes(), 2 * 8 * 2);
  EXPECT_TRUE(bf16.keys.empty());
  // 1 + 2^-8 is halfway between two bf16s and rounds to the even one (1); 1 + 3 * 2^-8 rounds
  // up; values of the type are kept exactly.
  const float in[4] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -2.5f, 0.f};
  bf16.WriteKeys(2, in, 4);
  float out[4];
  bf16.ReadKeys(2, 4, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 1.0f + 0x1p-6f);
  EXPECT_EQ(out[2], -2.5f);
  EXPECT_EQ(out[3], 0.f);
  bf16.WriteValues(2, in, 4);
  bf16.ZeroFrom(3);
  bf16.ReadKeys(0, 4, out);
  EXPECT_EQ(out[2], 1.0f);
  EXPECT_EQ(out[3], 0.f);
  bf16.ReadValues(0, 8, out);
  EXPECT_EQ(out[2], 1.0f);
  for (int i = 3; i < 8; ++i) EXPECT_EQ(out[i], 0.f) << i;
  // f16 keeps f16 values exactly (a NaN stays a NaN); f32 keeps everything.
  KvBlock f16 = MakeEmptyBlock(0, 1, 1, 4, BlockDType::kF16);
  const float halves[4] = {0x1p-24f, -65504.f, INFINITY, NAN};
  f16.WriteValues(0, halves, 4);
  f16.ReadValues(0, 4, out);
  EXPECT_EQ(out[0], 0x1p-24f);
  EXPECT_EQ(out[1], -65504.f);
  EXPECT_EQ(out[2], INFINITY);
  EXPECT_TRUE(std::isnan(out[3]));
  const KvBlock wide = WidenedBlock(f16);
  EXPECT_EQ(wide.dtype, BlockDType::kF32);
  EXPECT_EQ(wide.values[1], -65504.f);
  EXPECT_EQ(wide.bytes(), 2 * f16.bytes());
}

TEST(KvBlockTest, CopiesAndBf16ReadsConvertOnlyBetweenTypes) {
  // f32 values: exact in bf16 (1.5), rounding up (1 + 2^-8 + 2^-9 -> 1 + 2^-7), and one
  // that is a tie (1 + 2^-8 -> 1, even).
  const float in[] = {1.5f, 1.0f + 0x1p-8f + 0x1p-9f, 1.0f + 0x1p-8f, -2.0f};
  KvBlock f32 = MakeEmptyBlock(0, 1, 1, 4, BlockDType::kF32);
  f32.WriteKeys(0, in, 4);
  f32.WriteValues(0, in, 4);
  uint16_t bits[4];
  f32.ReadKeysBf16(0, 4, bits);
  EXPECT_EQ(std::vector<uint16_t>(bits, bits + 4),
            (std::vector<uint16_t>{0x3fc0, 0x3f81, 0x3f80, 0xc000}));
  // f32 -> bf16 rounds as WriteKeys does; bf16 -> f32 widens exactly; bf16 -> bf16 copies.
  KvBlock bf16 = MakeEmptyBlock(0, 2, 1, 4, BlockDType::kBF16);
  bf16.CopyFrom(4, f32, 0, 4);
  EXPECT_EQ(std::vector<uint16_t>(bf16.keys16.begin() + 4, bf16.keys16.end()),
            std::vector<uint16_t>(bits, bits + 4));
  EXPECT_EQ(std::vector<uint16_t>(bf16.values16.begin() + 4, bf16.values16.end()),
            std::vector<uint16_t>(bits, bits + 4));
  KvBlock wide = MakeEmptyBlock(0, 1, 1, 4, BlockDType::kF32);
  wide.CopyFrom(0, bf16, 4, 4);
  EXPECT_EQ(wide.values, (BlockVector<float>{1.5f, 1.0f + 0x1p-7f, 1.0f, -2.0f}));
  KvBlock same = MakeEmptyBlock(0, 1, 1, 4, BlockDType::kBF16);
  same.CopyFrom(0, bf16, 4, 4);
  EXPECT_EQ(same.keys16, BlockVector<uint16_t>(bits, bits + 4));
  // Growable rows: grown, written in the block's own type, cut, dropped from the front.
  KvBlock rows;
  rows.dtype = BlockDType::kBF16;
  rows.Resize(4);
  std::memcpy(rows.KeysAt(0), bits, sizeof(bits));
  std::memcpy(rows.ValuesAt(0), bits, sizeof(bits));
  rows.Resize(6);
  std::memcpy(rows.KeysAt(4), bits, 2 * sizeof(uint16_t));
  std::memcpy(rows.ValuesAt(4), bits, 2 * sizeof(uint16_t));
  EXPECT_EQ(rows.size(), 6u);
  rows.EraseFront(3);
  EXPECT_EQ(rows.keys16, (BlockVector<uint16_t>{0xc000, 0x3fc0, 0x3f81}));
  rows.Resize(1);
  EXPECT_EQ(rows.values16, (BlockVector<uint16_t>{0xc000}));
  EXPECT_EQ(rows.bytes(), 4);
}

TEST(KvStoreTest, DigestIsEachHeadsKeyMinAndMaxOverTheFilledRows) {
  // Against the obvious loop with std::min/std::max, bit for bit: signed zeros and infinities
  // included, rows past `filled` ignored, for f32 and bf16 blocks.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const float specials[] = {0.f, -0.f, INFINITY, -INFINITY, 1e-40f};
  for (BlockDType dtype : {BlockDType::kF32, BlockDType::kBF16}) {
    KvBlock b = MakeEmptyBlock(0, 16, 4, 24, dtype);
    b.filled = 11;
    std::vector<float> keys(b.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      keys[i] = rng() % 7 == 0 ? specials[rng() % 5] : normal(rng);
    }
    // One column of zeros of both signs: which zero is the min depends on the comparison.
    for (int s = 0; s < 16; ++s) keys[s * 4 * 24] = s == 0 ? 0.f : -0.f;
    b.WriteKeys(0, keys.data(), keys.size());
    const KvBlock wide = WidenedBlock(b);
    std::vector<float> want(4 * 2 * 24);
    for (int g = 0; g < 4; ++g) {
      for (int d = 0; d < 24; ++d) {
        float lo = INFINITY, hi = -INFINITY;
        for (int s = 0; s < b.filled; ++s) {
          lo = std::min(lo, wide.keys[(s * 4 + g) * 24 + d]);
          hi = std::max(hi, wide.keys[(s * 4 + g) * 24 + d]);
        }
        want[(g * 2) * 24 + d] = lo;
        want[(g * 2 + 1) * 24 + d] = hi;
      }
    }
    const std::vector<float> got = ComputeDigest(b, 4, 24);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float)))
        << static_cast<int>(dtype);
  }
}

TEST(RecordCodecTest, HotIndexStoresGapsAndReadsTheFirstLayoutToo) {
  std::mt19937 rng(4);
  std::vector<int64_t> positions;
  for (int64_t p = 0; p < 20000; p += 1 + static_cast<int64_t>(rng() % 5)) positions.push_back(p);
  positions.push_back(int64_t{1} << 40);  // a gap of several varint bytes
  const std::vector<double> scores = {0.5, -2.25};
  const std::string bytes = EncodeHotIndex(positions, scores);
  // A byte per entry here, where the first layout took eight.
  EXPECT_LT(bytes.size(), positions.size() * 2);
  std::vector<int64_t> got_positions;
  std::vector<double> got_scores;
  ASSERT_TRUE(DecodeHotIndex(bytes, &got_positions, &got_scores).ok());
  EXPECT_EQ(got_positions, positions);
  EXPECT_EQ(got_scores, scores);
  ASSERT_TRUE(DecodeHotIndex(EncodeHotIndex({}, {}), &got_positions, &got_scores).ok());
  EXPECT_TRUE(got_positions.empty());
  // Records written in the first layout (eight bytes per position) still read back.
  ByteWriter old;
  old.I64s({3, 9, 27});
  old.U64(1);
  old.F64(4.5);
  ASSERT_TRUE(DecodeHotIndex(old.Finish(), &got_positions, &got_scores).ok());
  EXPECT_EQ(got_positions, (std::vector<int64_t>{3, 9, 27}));
  EXPECT_EQ(got_scores, (std::vector<double>{4.5}));
  // A gap of zero (a repeated position) and a cut varint are corruption.
  ByteWriter repeated;
  repeated.U64(0xfffffffffffffe03ull);
  repeated.U64(2);
  repeated.U8(1);
  repeated.U8(0);
  repeated.U64(0);
  EXPECT_EQ(DecodeHotIndex(repeated.Finish(), &got_positions, &got_scores).code(),
            absl::StatusCode::kDataLoss);
  ByteWriter cut;
  cut.U64(0xfffffffffffffe03ull);
  cut.U64(1);
  cut.U8(0x80);
  EXPECT_EQ(DecodeHotIndex(cut.Finish(), &got_positions, &got_scores).code(),
            absl::StatusCode::kDataLoss);
}

TEST(RecordCodecTest, DigestsOfBf16KeysTakeHalfTheBytesAndOldRecordsStillRead) {
  std::vector<float> exact = {0.f, -1.5f, 0.15625f, 0x1p127f, -0.f}, inexact = exact;
  inexact[2] = 0.1f;
  const std::string narrow = EncodeFloats(exact), wide = EncodeFloats(inexact);
  EXPECT_LT(narrow.size(), wide.size() - 8);
  auto back = DecodeFloats(narrow, "digest");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(0, std::memcmp(back->data(), exact.data(), exact.size() * 4));
  back = DecodeFloats(wide, "digest");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, inexact);
  ByteWriter old;
  old.Floats(inexact);
  back = DecodeFloats(old.Finish(), "digest");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, inexact);
  std::string bad = narrow;
  bad[9] ^= 0x7f;  // the type byte
  EXPECT_EQ(DecodeFloats(bad, "digest").status().code(), absl::StatusCode::kDataLoss);
}

TEST(RecordCodecTest, SessionRecordsAndTurnsRoundTrip) {
  SessionRecord r;
  r.tenant = "acme";
  r.session_id = "s1";
  r.uid = 77;
  r.fingerprint = "abc";
  r.labels = {{"team", "x"}, {"k", ""}};
  r.options.memory.policy = "window";
  r.options.memory.budget = 99;
  r.options.memory.pooling = Pooling::kAvg;
  r.options.recall_blocks = 3;
  r.options.chat_template = "zephyr";
  r.position = 1234;
  r.turns = 5;
  r.owners = {{0, 5}, {40, 77}};
  r.last_logits = {1.5f, -2.25f, 3.0f};
  auto back = DecodeSessionRecord(EncodeSessionRecord(r));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->tenant, "acme");
  EXPECT_EQ(back->labels, r.labels);
  EXPECT_EQ(back->options.memory.policy, "window");
  EXPECT_EQ(back->options.memory.budget, 99);
  EXPECT_EQ(back->options.memory.pooling, Pooling::kAvg);
  EXPECT_EQ(back->options.recall_blocks, 3);
  EXPECT_EQ(back->options.chat_template, "zephyr");
  EXPECT_EQ(back->owners, r.owners);
  EXPECT_EQ(back->last_logits, r.last_logits);
  TurnRecord t{Role::kTool, "hello", {1, 2, 3}, 17};
  auto tb = DecodeTurn(EncodeTurn(t));
  ASSERT_TRUE(tb.ok());
  EXPECT_EQ(tb->role, Role::kTool);
  EXPECT_EQ(tb->text, "hello");
  EXPECT_EQ(tb->tokens, t.tokens);
  EXPECT_EQ(tb->first_position, 17);
}

// A turn's commit with no text or tokens (blocks alone), and what it points at: keep it alive
// until the commit is written.
struct BareTurn {
  explicit BareTurn(const SessionRecord& record) : owners(record.owners) {
    commit.last_logits = &logits;
    commit.owners = &owners;
  }
  BareTurn(const BareTurn&) = delete;
  BareTurn& operator=(const BareTurn&) = delete;
  std::vector<float> logits = {0.5f};
  std::vector<std::pair<int64_t, uint64_t>> owners;
  TurnCommit commit;
};

TEST(ColdStoreTest, BlocksRoundTripBitExactAcrossReopen) {
  testing::TempDir dir;
  SessionRecord record;
  record.session_id = "a";
  auto block = RandomBlock(0, 16, 5);
  {
    auto cold = ColdStore::Open({.path = dir.path()});
    ASSERT_TRUE(cold.ok()) << cold.status();
    ASSERT_TRUE((*cold)->CreateSession(&record).ok());
    TurnCommit commit;
    std::string text = "t";
    std::vector<int32_t> tokens = {1};
    std::vector<float> logits = {0.5f};
    std::vector<std::pair<int64_t, uint64_t>> owners = record.owners;
    commit.text = &text;
    commit.tokens = &tokens;
    commit.last_logits = &logits;
    commit.owners = &owners;
    commit.blocks.push_back({{record.uid, 0, 0}, block, std::vector<float>(64, 1.0f)});
    const std::vector<int64_t> hot = {0, 3};
    commit.hot_positions.assign(4, &hot);
    record.turns = 1;
    ASSERT_TRUE((*cold)->CommitTurn(record, commit, "req-1", 4, 8).ok());
  }
  auto cold = ColdStore::Open({.path = dir.path()});
  ASSERT_TRUE(cold.ok()) << cold.status();
  auto got = (*cold)->ReadBlock({record.uid, 0, 0}, 16, 4, 8);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(0, std::memcmp((*got)->keys.data(), block->keys.data(), block->keys.size() * 4));
  EXPECT_EQ(0, std::memcmp((*got)->values.data(), block->values.data(), block->values.size() * 4));
  auto listed = (*cold)->ListSessions();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].turns, 1);
  auto snapshot = (*cold)->LoadSnapshot((*listed)[0], 1, 4);
  ASSERT_TRUE(snapshot.ok()) << snapshot.status();
  EXPECT_EQ(snapshot->turns.size(), 1u);
  EXPECT_EQ(snapshot->hot_positions[2], (std::vector<int64_t>{0, 3}));
  auto request = (*cold)->FindRequest(record.uid, "req-1");
  ASSERT_TRUE(request.ok());
  EXPECT_EQ(request->value_or(-1), 0);
  // A damaged block fails its checksum.
  std::string bytes = EncodeBlock(*block, 4, 8);
  bytes[100] ^= 1;
  ASSERT_TRUE((*cold)->PutRawBlock({record.uid, 0, 0}, bytes).ok());
  EXPECT_EQ((*cold)->ReadBlock({record.uid, 0, 0}, 16, 4, 8).status().code(),
            absl::StatusCode::kDataLoss);
}

TEST(BlockFilesTest, AppendsReadBackAndRefsNameExactlyOneRecord) {
  testing::TempDir dir;
  // Two open descriptors at most, for three owners: reads reopen evicted files.
  auto files = BlockFiles::Open(dir.path() + "/b", {.sync = true, .max_open_files = 2});
  ASSERT_TRUE(files.ok()) << files.status();
  std::vector<std::vector<std::string>> records(3);
  std::vector<std::vector<BlockFileRef>> refs(3);
  for (uint64_t owner = 0; owner < 3; ++owner) {
    for (int i = 0; i < 3; ++i) {
      records[owner].push_back(EncodeBlock(*RandomBlock(i, 16, 10 * owner + i), 4, 8));
    }
    ASSERT_TRUE((*files)->Append(owner + 7, records[owner], &refs[owner]).ok());
    ASSERT_EQ(refs[owner].size(), 3u);
    EXPECT_EQ(refs[owner][0].offset, 0u);
    EXPECT_EQ(refs[owner][1].offset, records[owner][0].size());
  }
  for (uint64_t owner = 0; owner < 3; ++owner) {
    for (int i = 0; i < 3; ++i) {
      auto got = (*files)->Read(owner + 7, refs[owner][i]);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(*got, records[owner][i]);
    }
  }
  EXPECT_EQ(*(*files)->ListOwners(), (std::vector<uint64_t>{7, 8, 9}));
  // A reference to other bytes, past the end, or into a missing file is DATA_LOSS.
  BlockFileRef shifted = refs[0][1];
  shifted.offset -= 8;
  EXPECT_EQ((*files)->Read(7, shifted).status().code(), absl::StatusCode::kDataLoss);
  BlockFileRef past = refs[0][2];
  past.offset += past.length;
  EXPECT_EQ((*files)->Read(7, past).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ((*files)->Read(99, refs[0][0]).status().code(), absl::StatusCode::kDataLoss);
  // The next append follows the last.
  std::vector<BlockFileRef> again;
  ASSERT_TRUE((*files)->Append(7, {records[1][0]}, &again).ok());
  EXPECT_EQ(again[0].offset, refs[0][2].offset + refs[0][2].length);
  EXPECT_EQ(*(*files)->Read(7, again[0]), records[1][0]);
  EXPECT_EQ(*(*files)->Read(7, refs[0][2]), records[0][2]);
  // Removal is durable and idempotent.
  ASSERT_TRUE((*files)->Remove(8).ok());
  ASSERT_TRUE((*files)->Remove(8).ok());
  EXPECT_EQ((*files)->Read(8, refs[1][0]).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(*(*files)->ListOwners(), (std::vector<uint64_t>{7, 9}));
}

TEST(BlockFilesTest, RecordsInPiecesAreAppendedWholeAndReadBackInPlace) {
  testing::TempDir dir;
  auto files = BlockFiles::Open(dir.path(), {});
  ASSERT_TRUE(files.ok());
  std::vector<std::shared_ptr<const KvBlock>> blocks;
  std::vector<BlockRecord> records;
  records.reserve(3);  // the pieces are views of the records' strings: they must not move
  std::vector<BlockFiles::RecordPieces> pieces;
  for (int i = 0; i < 3; ++i) {
    blocks.push_back(Random16Block(i, BlockDType::kBF16, 20 + i));
    records.push_back(EncodeBlockRecord(*blocks.back(), 4, 8));
    const BlockRecord& r = records.back();
    pieces.push_back({r.head, r.keys, r.mid, r.values, r.tail});
  }
  std::vector<BlockFileRef> refs;
  ASSERT_TRUE((*files)->Append(3, pieces, &refs).ok());
  ASSERT_EQ(refs.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(refs[i].offset, i * records[0].size());
    EXPECT_EQ(refs[i].crc, records[i].crc);
    EXPECT_EQ(*(*files)->Read(3, refs[i]), records[i].Flatten());
    KvBlock back = MakeEmptyBlock(0, 16, 4, 8, BlockDType::kBF16);
    const absl::Status s = DecodeBlockInto(
        [&](const std::vector<MutablePiece>& p) { return (*files)->ReadInto(3, refs[i], p); }, 16,
        4, 8, &back);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(back.index, i);
    EXPECT_EQ(back.keys16, blocks[i]->keys16);
    EXPECT_EQ(back.values16, blocks[i]->values16);
  }
  // Pieces that do not add up to the record are refused; a reference to other bytes, past the
  // end or into a missing file is DATA_LOSS.
  std::string buf(refs[0].length, '\0');
  EXPECT_EQ((*files)->ReadInto(3, refs[0], {{buf.data(), buf.size() - 1}}).code(),
            absl::StatusCode::kInternal);
  BlockFileRef shifted = refs[1];
  shifted.offset -= 2;
  EXPECT_EQ((*files)->ReadInto(3, shifted, {{buf.data(), buf.size()}}).code(),
            absl::StatusCode::kDataLoss);
  BlockFileRef past = refs[2];
  past.offset += 16;
  EXPECT_EQ((*files)->ReadInto(3, past, {{buf.data(), buf.size()}}).code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ((*files)->ReadInto(4, refs[0], {{buf.data(), buf.size()}}).code(),
            absl::StatusCode::kDataLoss);
  // A record whose last piece cannot hold its CRC is refused before anything is written.
  std::vector<BlockFileRef> none;
  EXPECT_EQ((*files)->Append(3, std::vector<BlockFiles::RecordPieces>{{"abc"}}, &none).code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ((*files)->Append(3, pieces, &none).ok(), true);
  EXPECT_EQ(none[0].offset, 3 * records[0].size());
}

TEST(BlockFilesTest, ConcurrentAppendsReadsAndRemovesKeepEveryCommittedRecord) {
  testing::TempDir dir;
  // Fewer descriptors than owners, so that the cache evicts and reopens all the time.
  auto files = BlockFiles::Open(dir.path(), {.sync = false, .max_open_files = 2});
  ASSERT_TRUE(files.ok());
  std::vector<std::string> records;
  for (int i = 0; i < 8; ++i) records.push_back(EncodeBlock(*RandomBlock(i, 16, 70 + i), 4, 8));
  // Owners 1-3 each get their records up front; owner 1 keeps appending while others read.
  std::vector<std::vector<BlockFileRef>> refs(4);
  for (uint64_t owner = 1; owner <= 3; ++owner) {
    ASSERT_TRUE((*files)->Append(owner, records, &refs[owner]).ok());
  }
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::thread appender([&] {
    std::vector<BlockFileRef> more;
    for (int i = 0; i < 200; ++i) {
      if (!(*files)->Append(1, {records[i % 8]}, &more).ok()) ++bad;
    }
  });
  std::thread remover([&] {
    // Owner 9 comes and goes; reads of it may fail, but never touch other owners.
    std::vector<BlockFileRef> r;
    for (int i = 0; i < 100; ++i) {
      if (!(*files)->Append(9, {records[0]}, &r).ok() || !(*files)->Remove(9).ok()) ++bad;
    }
  });
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t) {
    readers.emplace_back([&, t] {
      std::mt19937 rng(t);
      while (!stop) {
        const uint64_t owner = 1 + rng() % 3;
        const int i = static_cast<int>(rng() % 8);
        auto got = (*files)->Read(owner, refs[owner][i]);
        if (!got.ok() || *got != records[i]) ++bad;
        // The same record read straight into pieces (as a 16-bit block is).
        std::string head(16, '\0'), rest(records[i].size() - 16, '\0');
        const absl::Status into = (*files)->ReadInto(
            owner, refs[owner][i], {{head.data(), head.size()}, {rest.data(), rest.size()}});
        if (!into.ok() || head + rest != records[i]) ++bad;
        (*files)->Read(9, refs[1][0]).IgnoreError();
      }
    });
  }
  appender.join();
  remover.join();
  stop = true;
  for (std::thread& r : readers) r.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST(BlockFilesTest, AppendAfterACrashLeftoverKeepsEarlierRecords) {
  testing::TempDir dir;
  std::vector<BlockFileRef> first, second;
  const std::string a = EncodeBlock(*RandomBlock(0, 16, 1), 4, 8);
  const std::string b = EncodeBlock(*RandomBlock(1, 16, 2), 4, 8);
  {
    auto files = BlockFiles::Open(dir.path(), {});
    ASSERT_TRUE(files.ok());
    ASSERT_TRUE((*files)->Append(1, {a}, &first).ok());
  }
  {
    // Bytes of a commit that never happened (the process died before its RocksDB write).
    std::ofstream f(absl::StrFormat("%s/%016x.kvb", dir.path(), 1), std::ios::app);
    f << "half a block";
  }
  auto files = BlockFiles::Open(dir.path(), {});
  ASSERT_TRUE(files.ok());
  ASSERT_TRUE((*files)->Append(1, {b}, &second).ok());
  EXPECT_EQ(second[0].offset, a.size() + 12);
  EXPECT_EQ(*(*files)->Read(1, first[0]), a);
  EXPECT_EQ(*(*files)->Read(1, second[0]), b);
}

TEST(ColdStoreTest, FullBlocksGoToTheOwnersFilePartialOnesStayInRocksDb) {
  testing::TempDir dir;
  SessionRecord record;
  record.session_id = "a";
  auto full = RandomBlock(0, 16, 5);
  auto partial = RandomBlock(1, 9, 6);
  {
    auto cold = ColdStore::Open({.path = dir.path()});
    ASSERT_TRUE(cold.ok()) << cold.status();
    ASSERT_TRUE((*cold)->CreateSession(&record).ok());
    BareTurn turn(record);
    TurnCommit& commit = turn.commit;
    commit.blocks.push_back({{record.uid, 0, 0}, full, std::vector<float>(64, 1.0f)});
    commit.blocks.push_back({{record.uid, 0, 1}, partial, std::vector<float>(64, 2.0f)});
    ASSERT_TRUE((*cold)->CommitTurn(record, commit, "", 4, 8).ok());
    EXPECT_EQ(*(*cold)->CountBlocks(record.uid), 2);
    EXPECT_EQ(*(*cold)->CountFileBlocks(record.uid), 1);
  }
  const std::string file = absl::StrFormat("%s/kvblocks/%016x.kvb", dir.path(), record.uid);
  EXPECT_EQ(std::filesystem::file_size(file), EncodeBlock(*full, 4, 8).size());
  // A file no session references (a crash between a delete's commit and its unlink) is removed
  // at open; the session's own file stays.
  const std::string orphan = absl::StrFormat("%s/kvblocks/%016x.kvb", dir.path(), 4242);
  std::ofstream(orphan) << "left over";
  auto cold = ColdStore::Open({.path = dir.path()});
  ASSERT_TRUE(cold.ok()) << cold.status();
  EXPECT_FALSE(std::filesystem::exists(orphan));
  for (const auto& [index, want] : {std::pair{0, full}, std::pair{1, partial}}) {
    auto got = (*cold)->ReadBlock({record.uid, 0, index}, 16, 4, 8);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ((*got)->filled, want->filled);
    EXPECT_EQ(0, std::memcmp((*got)->keys.data(), want->keys.data(), want->keys.size() * 4));
  }
  std::vector<uint64_t> freed;
  ASSERT_TRUE((*cold)->DeleteSession(record, &freed).ok());
  EXPECT_EQ(freed, std::vector<uint64_t>{record.uid});
  EXPECT_FALSE(std::filesystem::exists(file));
}

// The bytes of the store's RocksDB log files (RocksDB may delete one while this looks).
uint64_t LogBytes(const std::string& dir) {
  uint64_t bytes = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.path().extension() != ".log") continue;
    const uint64_t size = e.file_size(ec);
    if (!ec) bytes += size;
  }
  return bytes;
}

TEST(ColdStoreTest, LogStaysNearItsBoundAndLosesNothing) {
  testing::TempDir dir;
  SessionRecord record;
  record.session_id = "a";
  // A partial block (kept in RocksDB, so written through its log; f32, 1 MB), filling by one
  // position a turn.
  const int kTurns = 60;
  auto partial = std::make_shared<KvBlock>(MakeEmptyBlock(0, 256, 8, 64));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < kTurns * 8 * 64; ++i) {
    partial->keys[i] = normal(rng);
    partial->values[i] = normal(rng);
  }
  {
    auto cold = ColdStore::Open({.path = dir.path(), .max_log_bytes = 1 << 20});
    ASSERT_TRUE(cold.ok()) << cold.status();
    ASSERT_TRUE((*cold)->CreateSession(&record).ok());
    uint64_t most = 0;
    for (int t = 0; t < kTurns; ++t) {
      BareTurn turn(record);
      TurnCommit& commit = turn.commit;
      auto turn_block = std::make_shared<KvBlock>(*partial);
      turn_block->filled = t + 1;
      turn_block->ZeroFrom(static_cast<size_t>(t + 1) * 8 * 64);
      commit.blocks.push_back({{record.uid, 0, 0}, turn_block, std::vector<float>(8 * 128, 1.0f)});
      ASSERT_TRUE((*cold)->CommitTurn(record, commit, "", 8, 64).ok());
      most = std::max(most, LogBytes(dir.path()));
    }
    // Each turn wrote about 1 MB through the log; RocksDB's own limit (from its memtables)
    // would have kept every byte. Flushes run in the background, so the log passes its bound
    // by one turn for each turn a flush takes (7-28 MB on the 2-core VM, loaded or not), but
    // stays well below the total.
    EXPECT_LT(most, uint64_t{kTurns} * 3 << 18) << "the log grew to " << most << " bytes";
  }
  // The last turn's block is read back, through the flushes and the one at close.
  auto cold = ColdStore::Open({.path = dir.path()});
  ASSERT_TRUE(cold.ok()) << cold.status();
  auto got = (*cold)->ReadBlock({record.uid, 0, 0}, 256, 8, 64);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)->filled, kTurns);
  EXPECT_EQ(0, std::memcmp((*got)->keys.data(), partial->keys.data(), partial->keys.size() * 4));
  EXPECT_EQ(0,
            std::memcmp((*got)->values.data(), partial->values.data(), partial->values.size() * 4));
}

TEST(ColdStoreTest, BatchedDigestReadsKeepTheKeysOrderAndNameAMissingOne) {
  testing::TempDir dir;
  SessionRecord record;
  record.session_id = "a";
  auto cold = ColdStore::Open({.path = dir.path()});
  ASSERT_TRUE(cold.ok()) << cold.status();
  ASSERT_TRUE((*cold)->CreateSession(&record).ok());
  BareTurn turn(record);
  TurnCommit& commit = turn.commit;
  for (int layer = 0; layer < 2; ++layer) {
    for (int index = 0; index < 3; ++index) {
      commit.blocks.push_back({{record.uid, layer, index},
                               RandomBlock(index, 16, 10 * layer + index),
                               std::vector<float>(64, static_cast<float>(10 * layer + index))});
    }
  }
  ASSERT_TRUE((*cold)->CommitTurn(record, commit, "", 4, 8).ok());
  const std::vector<BlockKey> keys = {
      {record.uid, 1, 2}, {record.uid, 0, 0}, {record.uid, 1, 0}, {record.uid, 0, 2}};
  auto digests = (*cold)->ReadDigests(keys);
  ASSERT_TRUE(digests.ok()) << digests.status();
  ASSERT_EQ(digests->size(), keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    auto one = (*cold)->ReadDigest(keys[i]);
    ASSERT_TRUE(one.ok()) << one.status();
    EXPECT_EQ((*digests)[i], *one);
    EXPECT_EQ((*digests)[i][0], static_cast<float>(10 * keys[i].layer + keys[i].index));
  }
  auto missing = (*cold)->ReadDigests({{record.uid, 0, 1}, {record.uid, 1, 7}});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("layer 1, index 7"), std::string::npos)
      << missing.status();
}

TEST(ColdStoreTest, SixteenBitBlocksComeBackFromTheirFileBitForBit) {
  testing::TempDir dir;
  SessionRecord record;
  record.session_id = "a";
  std::vector<std::shared_ptr<const KvBlock>> blocks = {Random16Block(0, BlockDType::kBF16, 1),
                                                        Random16Block(1, BlockDType::kF16, 2)};
  {
    auto cold = ColdStore::Open({.path = dir.path()});
    ASSERT_TRUE(cold.ok()) << cold.status();
    ASSERT_TRUE((*cold)->CreateSession(&record).ok());
    BareTurn turn(record);
    TurnCommit& commit = turn.commit;
    for (int64_t i = 0; i < 2; ++i) {
      commit.blocks.push_back({{record.uid, 0, i}, blocks[i], std::vector<float>(64, 1.0f)});
    }
    ASSERT_TRUE((*cold)->CommitTurn(record, commit, "", 4, 8).ok());
    EXPECT_EQ(*(*cold)->CountFileBlocks(record.uid), 2);
  }
  const std::string file = absl::StrFormat("%s/kvblocks/%016x.kvb", dir.path(), record.uid);
  EXPECT_EQ(std::filesystem::file_size(file), 2 * Block16RecordSize(blocks[0]->size()));
  {
    auto cold = ColdStore::Open({.path = dir.path()});
    ASSERT_TRUE(cold.ok()) << cold.status();
    for (int64_t i = 0; i < 2; ++i) {
      auto got = (*cold)->ReadBlock({record.uid, 0, i}, 16, 4, 8);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ((*got)->dtype, blocks[i]->dtype);
      EXPECT_EQ((*got)->index, i);
      EXPECT_EQ((*got)->keys16, blocks[i]->keys16);
      EXPECT_EQ((*got)->values16, blocks[i]->values16);
    }
  }
  // One flipped bit in the second block's values fails that block alone, as DATA_LOSS.
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    const std::streamoff at = static_cast<std::streamoff>(Block16RecordSize(blocks[0]->size()) +
                                                          Block16RecordSize(blocks[0]->size()) / 2);
    f.seekg(at);
    const char c = static_cast<char>(f.get() ^ 0x01);
    f.seekp(at);
    f.put(c);
  }
  auto cold = ColdStore::Open({.path = dir.path()});
  ASSERT_TRUE(cold.ok()) << cold.status();
  EXPECT_TRUE((*cold)->ReadBlock({record.uid, 0, 0}, 16, 4, 8).ok());
  EXPECT_EQ((*cold)->ReadBlock({record.uid, 0, 1}, 16, 4, 8).status().code(),
            absl::StatusCode::kDataLoss);
}

// A commit of full blocks [first, first + count) of session `record` to `cold`.
absl::Status CommitFullBlocks(ColdStore& cold, const SessionRecord& record, int64_t first,
                              int64_t count) {
  BareTurn turn(record);
  TurnCommit& commit = turn.commit;
  for (int64_t i = first; i < first + count; ++i) {
    commit.blocks.push_back(
        {{record.uid, 0, i}, RandomBlock(i, 16, 40 + i), std::vector<float>(64, 1.0f)});
  }
  return cold.CommitTurn(record, commit, "", 4, 8);
}

TEST(ColdStoreTest, LeftoversOfACommitThatNeverHappenedAreCutAtTheFirstLoadAfterOpen) {
  testing::TempDir dir;
  SessionRecord record;
  record.session_id = "a";
  const size_t one = EncodeBlock(*RandomBlock(0, 16, 40), 4, 8).size();
  {
    auto cold = ColdStore::Open({.path = dir.path()});
    ASSERT_TRUE(cold.ok()) << cold.status();
    ASSERT_TRUE((*cold)->CreateSession(&record).ok());
    ASSERT_TRUE(CommitFullBlocks(**cold, record, 0, 3).ok());
  }
  const std::string file = absl::StrFormat("%s/kvblocks/%016x.kvb", dir.path(), record.uid);
  ASSERT_EQ(std::filesystem::file_size(file), 3 * one);
  auto leave_bytes = [&] {
    // What a crash between the block file's sync and the turn's RocksDB write leaves.
    std::ofstream(file, std::ios::app | std::ios::binary) << std::string(1000, 'x');
  };
  leave_bytes();
  {
    auto cold = ColdStore::Open({.path = dir.path()});
    ASSERT_TRUE(cold.ok()) << cold.status();
    // Opening alone cuts nothing; the session's first load does.
    EXPECT_EQ(std::filesystem::file_size(file), 3 * one + 1000);
    ASSERT_TRUE((*cold)->LoadSnapshot(record, 1, 4).ok());
    EXPECT_EQ(std::filesystem::file_size(file), 3 * one);
    for (int64_t i = 0; i < 3; ++i) {
      EXPECT_TRUE((*cold)->ReadBlock({record.uid, 0, i}, 16, 4, 8).ok()) << i;
    }
    // The next commit appends where the committed records end.
    ASSERT_TRUE(CommitFullBlocks(**cold, record, 3, 1).ok());
    EXPECT_EQ(std::filesystem::file_size(file), 4 * one);
    // After a commit in this process nothing is cut again: a write RocksDB reported as failed
    // could still be replayed at the next open and refer to bytes past the last reference.
    leave_bytes();
    ASSERT_TRUE((*cold)->LoadSnapshot(record, 1, 4).ok());
    EXPECT_EQ(std::filesystem::file_size(file), 4 * one + 1000);
  }
  {
    // A commit before the first load settles the owner as well. It appends after the
    // leftovers, which stay between two referenced records from then on.
    auto cold = ColdStore::Open({.path = dir.path()});
    ASSERT_TRUE(cold.ok()) << cold.status();
    ASSERT_TRUE(CommitFullBlocks(**cold, record, 4, 1).ok());
    EXPECT_EQ(std::filesystem::file_size(file), 5 * one + 1000);
    leave_bytes();
    ASSERT_TRUE((*cold)->LoadSnapshot(record, 1, 4).ok());
    EXPECT_EQ(std::filesystem::file_size(file), 5 * one + 2000);
  }
  auto cold = ColdStore::Open({.path = dir.path()});
  ASSERT_TRUE(cold.ok()) << cold.status();
  ASSERT_TRUE((*cold)->LoadSnapshot(record, 1, 4).ok());
  EXPECT_EQ(std::filesystem::file_size(file), 5 * one + 1000);
  for (int64_t i = 0; i < 5; ++i) {
    EXPECT_TRUE((*cold)->ReadBlock({record.uid, 0, i}, 16, 4, 8).ok()) << i;
  }
}

TEST(ColdStoreTest, ResourceErrorsKeepTheirCodeAndLoseNothingCommitted) {
  testing::TempDir dir;
  SessionRecord record;
  record.session_id = "a";
  {
    auto cold = ColdStore::Open({.path = dir.path()});
    ASSERT_TRUE(cold.ok()) << cold.status();
    ASSERT_TRUE((*cold)->CreateSession(&record).ok());
    // Larger than every file RocksDB writes in the child, whose size limit it sets.
    ASSERT_TRUE(CommitFullBlocks(**cold, record, 0, 512).ok());
  }
  // In a child, whose limits the test process does not share; the exit code says which check
  // failed.
  const pid_t child = fork();
  if (child == 0) {
    auto cold = ColdStore::Open({.path = dir.path()});
    if (!cold.ok()) _exit(10);
    // 1. The block file grows past what the process may write: the commit fails and the file is
    // cut back; the committed block still reads.
    const std::string file = absl::StrFormat("%s/kvblocks/%016x.kvb", dir.path(), record.uid);
    const auto size = std::filesystem::file_size(file);
    signal(SIGXFSZ, SIG_IGN);
    rlimit fsize = {size + 1000, size + 1000};
    if (setrlimit(RLIMIT_FSIZE, &fsize) != 0) _exit(11);
    if (CommitFullBlocks(**cold, record, 512, 1).ok()) _exit(12);
    if (std::filesystem::file_size(file) != size) _exit(13);
    if (!(*cold)->ReadBlock({record.uid, 0, 0}, 16, 4, 8).ok()) _exit(14);
    // 2. No descriptor left to open the block file with: RESOURCE_EXHAUSTED, not DATA_LOSS.
    cold->reset();
    cold = ColdStore::Open({.path = dir.path()});
    if (!cold.ok()) _exit(15);
    rlimit nofile = {256, 256};
    if (setrlimit(RLIMIT_NOFILE, &nofile) != 0) _exit(16);
    while (open("/dev/null", O_RDONLY) >= 0) {
    }
    auto got = (*cold)->ReadBlock({record.uid, 0, 0}, 16, 4, 8);
    if (got.status().code() != absl::StatusCode::kResourceExhausted) {
      std::fprintf(stderr, "%s\n", got.status().ToString().c_str());
      _exit(17);
    }
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "see the exit codes in the test";
  // Nothing committed was lost, and the failed commit left nothing behind.
  auto cold = ColdStore::Open({.path = dir.path()});
  ASSERT_TRUE(cold.ok());
  EXPECT_TRUE((*cold)->ReadBlock({record.uid, 0, 0}, 16, 4, 8).ok());
  EXPECT_EQ(*(*cold)->CountBlocks(record.uid), 512);
}

}  // namespace
}  // namespace kvmem
