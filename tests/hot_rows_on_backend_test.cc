// Sessions whose hot rows live with the backend (KvCache::RowHome::kBackend), as they do with the
// CUDA backend: the host keeps positions and fresh rows, and reads older rows back from the
// session's blocks when the backend must upload them again. MirrorBackend (tests/
// mirror_backend.h) plays the device. Every session below is compared with the same session on
// the CPU backend, whose host rows are the oracle.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu_backend.h"
#include "engine/safetensors.h"
#include "engine/session.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"
#include "gtest/gtest.h"
#include "tests/mirror_backend.h"
#include "tests/plain_pinner.h"

namespace kvmem {
namespace {

// A store whose block reads can be made to fail, to show a failed read back loses nothing.
class FailingSource : public BlockSource {
 public:
  explicit FailingSource(std::shared_ptr<MemoryBlockStore> store) : store_(std::move(store)) {}
  absl::StatusOr<std::shared_ptr<const KvBlock>> ReadBlock(const BlockKey& key,
                                                           bool* from_cold) override {
    ++reads_;
    if (failing_) return absl::DataLossError(absl::StrCat("block ", key.index, " is damaged"));
    return store_->ReadBlock(key, from_cold);
  }
  absl::StatusOr<std::vector<float>> ReadDigest(const BlockKey& key) override {
    return store_->ReadDigest(key);
  }
  void set_failing(bool failing) { failing_ = failing; }
  int reads() const { return reads_; }

 private:
  std::shared_ptr<MemoryBlockStore> store_;
  std::atomic<bool> failing_{false};
  std::atomic<int> reads_{0};  // backends read rows on several threads
};

const char* const kTurns[] = {
    "Once upon a time, there was a little dog named Max. Max loved to run in the big green "
    "park near his house. Every day he played with a red ball and a small cat named Tom.",
    "One day, Max lost his ball under a tree. He looked and looked, but he could not find it. "
    "He felt very sad and sat down.",
    "Then Tom the cat came by and said, Do not be sad, Max. I will help you find your ball.",
    "They looked under the tree and behind the bench, and at last Max saw something red.",
};

// Everything observable about one session after a call, to compare two backends.
struct Trace {
  std::vector<int32_t> tokens;
  std::vector<std::vector<int64_t>> hot;  // after each call, every head
  std::vector<int64_t> recalled, evicted;

  void Hot(const Session& s) {
    for (int l = 0; l < s.hot().num_layers(); ++l) {
      for (int g = 0; g < s.hot().num_kv_heads(); ++g) hot.push_back(s.hot().head(l, g).positions);
    }
  }
  bool operator==(const Trace& o) const {
    return tokens == o.tokens && hot == o.hot && recalled == o.recalled && evicted == o.evicted;
  }
};

class HotRowsOnBackendTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = Model::Load(KVMEM_TEST_MODEL_DIR);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
    cpu_ = new CpuBackend(*model_, {.threads = 1});
  }
  static void TearDownTestSuite() {
    delete cpu_;
    delete model_;
  }
  void SetUp() override { mirror_ = std::make_unique<MirrorBackend>(*model_, cpu_); }

  static SessionOptions Options(std::string policy = "snapkv") {
    SessionOptions o;
    o.memory = {.policy = policy, .budget = 24, .window = 8, .kernel = 3};
    o.block_size = 8;
    o.recall_blocks = 2;
    return o;
  }

  std::unique_ptr<Session> NewSession(Backend& backend, const SessionOptions& o,
                                      std::shared_ptr<MemoryBlockStore> store = nullptr) {
    if (store == nullptr) store = std::make_shared<MemoryBlockStore>();
    auto s = Session::Create(*model_, backend, o, {1, store, store});
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  // Turns [first, last) of kTurns, each followed by a greedy generation (kept or not).
  static void Converse(Session* s, int first, int last, Trace* trace, bool keep = true) {
    for (int t = first; t < last; ++t) {
      auto a = s->AppendTurn(Role::kUser, kTurns[t]);
      ASSERT_TRUE(a.ok()) << a.status();
      trace->recalled.push_back(a->recalled_blocks);
      trace->evicted.push_back(a->evicted);
      trace->Hot(*s);
      auto g = s->Generate({.sampling = {.max_tokens = 12}, .keep = keep}, nullptr);
      ASSERT_TRUE(g.ok()) << g.status();
      trace->tokens.insert(trace->tokens.end(), g->generation.tokens.begin(),
                           g->generation.tokens.end());
      trace->evicted.push_back(g->evicted);
      trace->Hot(*s);
    }
  }

  // The host holds no row of the hot set between calls: positions only.
  static void ExpectPositionsOnly(const Session& s) {
    EXPECT_FALSE(s.hot().host_rows());
    EXPECT_EQ(s.hot().Bytes(), 0) << "fresh rows outlived the commit";
    for (int l = 0; l < s.hot().num_layers(); ++l) {
      for (int g = 0; g < s.hot().num_kv_heads(); ++g) {
        EXPECT_TRUE(s.hot().head(l, g).keys.empty());
        EXPECT_TRUE(s.hot().head(l, g).values.empty());
      }
    }
  }

  static Model* model_;
  static CpuBackend* cpu_;
  std::unique_ptr<MirrorBackend> mirror_;
};
Model* HotRowsOnBackendTest::model_ = nullptr;
CpuBackend* HotRowsOnBackendTest::cpu_ = nullptr;

TEST_F(HotRowsOnBackendTest, SessionWithEvictionAndRecallMatchesTheCpuReference) {
  Trace on_cpu, on_mirror;
  auto a = NewSession(*cpu_, Options());
  auto b = NewSession(*mirror_, Options());
  Converse(a.get(), 0, 4, &on_cpu);
  Converse(b.get(), 0, 4, &on_mirror);
  ASSERT_EQ(on_cpu.tokens.size(), 48u);
  EXPECT_EQ(on_cpu.tokens, on_mirror.tokens);
  EXPECT_EQ(on_cpu.hot, on_mirror.hot);
  EXPECT_EQ(on_cpu.recalled, on_mirror.recalled);
  EXPECT_EQ(on_cpu.evicted, on_mirror.evicted);
  int64_t recalled = 0;
  for (int64_t r : on_cpu.recalled) recalled += r;
  EXPECT_GT(recalled, 0) << "the scenario must exercise recall";
  EXPECT_GT(mirror_->rows_read(), 0) << "recalled rows come back through ReadRows";
  ExpectPositionsOnly(*b);
  EXPECT_EQ(a->Stats().blocks, b->Stats().blocks);
  // The blocks hold the same rows: the fresh rows went into them unchanged.
  const ModelConfig& c = model_->config();
  std::vector<float> ka(c.head_dim), va(c.head_dim), kb(c.head_dim), vb(c.head_dim);
  for (int64_t p = 0; p < a->position(); p += 7) {
    ASSERT_TRUE(a->ReadPosition(2, p, 1, ka.data(), va.data()).ok());
    ASSERT_TRUE(b->ReadPosition(2, p, 1, kb.data(), vb.data()).ok());
    EXPECT_EQ(ka, kb) << "position " << p;
    EXPECT_EQ(va, vb) << "position " << p;
  }
}

TEST_F(HotRowsOnBackendTest, DiscardedGenerationDropsItsPositionsAndFreshRows) {
  Trace on_cpu, on_mirror;
  auto a = NewSession(*cpu_, Options());
  auto b = NewSession(*mirror_, Options());
  Converse(a.get(), 0, 2, &on_cpu, /*keep=*/false);
  Converse(b.get(), 0, 2, &on_mirror, /*keep=*/false);
  ExpectPositionsOnly(*b);
  EXPECT_EQ(a->position(), b->position());
  Converse(a.get(), 2, 4, &on_cpu);
  Converse(b.get(), 2, 4, &on_mirror);
  EXPECT_EQ(on_cpu, on_mirror);
}

TEST_F(HotRowsOnBackendTest, ForkReadsItsRowsFromSharedBlocksAndContinuesLikeTheCpu) {
  Trace on_cpu, on_mirror, fork_cpu, fork_mirror;
  auto a = NewSession(*cpu_, Options());
  auto b = NewSession(*mirror_, Options());
  Converse(a.get(), 0, 2, &on_cpu);
  Converse(b.get(), 0, 2, &on_mirror);
  auto fa = a->Fork();
  auto fb = b->Fork();
  ASSERT_TRUE(fa.ok() && fb.ok());
  ExpectPositionsOnly(**fb);
  const int64_t read_before = mirror_->rows_read();
  Converse(fa->get(), 2, 4, &fork_cpu);
  Converse(fb->get(), 2, 4, &fork_mirror);
  EXPECT_GE(mirror_->rows_read() - read_before, (*fb)->hot().TotalEntries() / 2)
      << "the fork's copy was built from blocks";
  EXPECT_EQ(fork_cpu, fork_mirror);
  // The parent is untouched by its fork and goes on the same way as well.
  Converse(a.get(), 2, 3, &on_cpu);
  Converse(b.get(), 2, 3, &on_mirror);
  EXPECT_EQ(on_cpu, on_mirror);
}

TEST_F(HotRowsOnBackendTest, RestoredSessionReadsItsHotSetBackFromBlocks) {
  auto store_a = std::make_shared<MemoryBlockStore>();
  auto store_b = std::make_shared<MemoryBlockStore>();
  Trace on_cpu, on_mirror;
  auto a = NewSession(*cpu_, Options(), store_a);
  auto b = NewSession(*mirror_, Options(), store_b);
  Converse(a.get(), 0, 2, &on_cpu);
  Converse(b.get(), 0, 2, &on_mirror);
  auto ra = Session::Restore(*model_, *cpu_, Options(), {1, store_a, store_a}, a->Snapshot());
  auto rb = Session::Restore(*model_, *mirror_, Options(), {1, store_b, store_b}, b->Snapshot());
  ASSERT_TRUE(ra.ok() && rb.ok());
  ExpectPositionsOnly(**rb);
  const int64_t hot = (*rb)->hot().TotalEntries();
  const int64_t read_before = mirror_->rows_read();
  Converse(ra->get(), 2, 4, &on_cpu);
  Converse(rb->get(), 2, 4, &on_mirror);
  EXPECT_GE(mirror_->rows_read() - read_before, hot) << "the whole hot set was read back";
  EXPECT_EQ(on_cpu, on_mirror);
}

// With engine/block_memory.h's pool installed, the blocks a session makes (and those a store
// hands back) live in pinned slabs, and a device reads the rows it lacks where they lie:
// through LocateLayerRows' pointers, which must hold ReadLayerRows' values. Eviction, recall and
// a restore, with f32 and bf16 blocks: reading in place changes nothing.
TEST_F(HotRowsOnBackendTest, RowsReadInPlaceFromPinnedBlocksChangeNothing) {
  ASSERT_TRUE(InstallPinnedBlockPool(std::make_unique<PlainPinner>(),
                                     {.max_bytes = int64_t{256} << 20, .slab_bytes = 1 << 20})
                  .ok());
  for (BlockDType dtype : {BlockDType::kF32, BlockDType::kBF16}) {
    SCOPED_TRACE(dtype == BlockDType::kF32 ? "f32 blocks" : "bf16 blocks");
    auto run = [&](MirrorBackend& backend, Trace* trace) {
      auto store = std::make_shared<MemoryBlockStore>();
      auto s = NewSession(backend, Options(), store);
      Converse(s.get(), 0, 2, trace);
      auto r = Session::Restore(*model_, backend, Options(), {1, store, store}, s->Snapshot());
      ASSERT_TRUE(r.ok()) << r.status();
      Converse(r->get(), 2, 4, trace);
      EXPECT_GT(GetPinnedBlockPoolStats().bytes_in_use, 0) << "the blocks are in the pool";
    };
    MirrorBackend staged(*model_, cpu_), in_place(*model_, cpu_);
    if (dtype == BlockDType::kBF16) {
      staged.set_bf16_rows(dtype);
      in_place.set_bf16_rows(dtype);
    }
    in_place.set_reads_in_place(true);
    Trace a, b;
    run(staged, &a);
    run(in_place, &b);
    EXPECT_EQ(a, b);
    if (dtype == BlockDType::kF32) {
      Trace on_cpu;
      auto store = std::make_shared<MemoryBlockStore>();
      auto s = NewSession(*cpu_, Options(), store);
      Converse(s.get(), 0, 2, &on_cpu);
      auto r = Session::Restore(*model_, *cpu_, Options(), {1, store, store}, s->Snapshot());
      ASSERT_TRUE(r.ok()) << r.status();
      Converse(r->get(), 2, 4, &on_cpu);
      EXPECT_EQ(on_cpu, b);
    }
    EXPECT_EQ(in_place.rows_read(), staged.rows_read());
    EXPECT_GT(in_place.rows_read_in_place(), in_place.rows_read() / 2)
        << "most rows read back (the restored hot set, recalled blocks) lie in blocks";
    EXPECT_EQ(in_place.in_place_mismatches(), 0);
    EXPECT_EQ(in_place.rows_outside_pool(), 0) << "a block a device reads is outside the pool";
  }
  EXPECT_GT(GetPinnedBlockPoolStats().pinned_bytes, 0);
  EXPECT_EQ(GetPinnedBlockPoolStats().heap_fallbacks, 0);
}

TEST_F(HotRowsOnBackendTest, PolicyThatReadsRowsGetsThemFromBlocks) {
  for (const char* policy : {"h2o", "adakv", "snapkv-adaptive"}) {
    SCOPED_TRACE(policy);
    Trace on_cpu, on_mirror;
    auto a = NewSession(*cpu_, Options(policy));
    auto b = NewSession(*mirror_, Options(policy));
    Converse(a.get(), 0, 3, &on_cpu);
    Converse(b.get(), 0, 3, &on_mirror);
    EXPECT_EQ(on_cpu, on_mirror);
    ExpectPositionsOnly(*b);
  }
}

TEST_F(HotRowsOnBackendTest, HostHotRowsOptionKeepsRowsOnTheHost) {
  SessionOptions o = Options();
  o.host_hot_rows = true;
  Trace on_cpu, on_mirror;
  auto a = NewSession(*cpu_, Options());
  auto b = NewSession(*mirror_, o);
  ASSERT_TRUE(b->hot().host_rows());
  Converse(a.get(), 0, 2, &on_cpu);
  Converse(b.get(), 0, 2, &on_mirror);
  EXPECT_EQ(on_cpu, on_mirror);
  EXPECT_EQ(b->hot().Bytes(), a->hot().Bytes());
  EXPECT_GT(b->hot().Bytes(), 0);
}

TEST_F(HotRowsOnBackendTest, SnapKvFallsBackToRowsReadFromBlocksWhenTheBackendCannotSelect) {
  Trace on_cpu, on_mirror;
  auto a = NewSession(*cpu_, Options());
  auto b = NewSession(*mirror_, Options());
  mirror_->set_select_fails(true);
  Converse(a.get(), 0, 3, &on_cpu);
  Converse(b.get(), 0, 3, &on_mirror);
  EXPECT_EQ(on_cpu, on_mirror);
  EXPECT_FALSE(b->broken());
  ExpectPositionsOnly(*b);
}

TEST_F(HotRowsOnBackendTest, RestoreReadsTheHotBlocksBeforeTheFirstPassAndRefusesDamagedOnes) {
  SessionOptions o = Options();
  o.recall_blocks = 0;  // recall would read storage during the pass
  auto store = std::make_shared<MemoryBlockStore>();
  auto source = std::make_shared<FailingSource>(store);
  Trace on_cpu, unused, after;
  auto a = NewSession(*cpu_, o);
  auto b = NewSession(*mirror_, o, store);
  Converse(a.get(), 0, 2, &on_cpu);
  Converse(b.get(), 0, 2, &unused);
  // A damaged block is DATA_LOSS at restore, as with host rows.
  source->set_failing(true);
  auto damaged = Session::Restore(*model_, *mirror_, o, {1, source, store}, b->Snapshot());
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss) << damaged.status();
  // Otherwise the restore reads the hot blocks, and the first pass (the device's upload, under
  // its lock) reads no storage at all.
  source->set_failing(false);
  auto restored = Session::Restore(*model_, *mirror_, o, {1, source, store}, b->Snapshot());
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_GT(source->reads(), 0);
  source->set_failing(true);
  auto first = (*restored)->AppendTurn(Role::kUser, kTurns[2]);
  ASSERT_TRUE(first.ok()) << first.status();
  source->set_failing(false);
  auto g = (*restored)->Generate({.sampling = {.max_tokens = 12}}, nullptr);
  ASSERT_TRUE(g.ok()) << g.status();
  Converse(a.get(), 2, 3, &on_cpu);
  const std::vector<int32_t> tail(on_cpu.tokens.end() - 12, on_cpu.tokens.end());
  EXPECT_EQ(g->generation.tokens, tail);
}

TEST_F(HotRowsOnBackendTest, FailedReadBackFailsTheCallAndLosesNothing) {
  auto store = std::make_shared<MemoryBlockStore>();
  auto source = std::make_shared<FailingSource>(store);
  Trace on_cpu, unused;
  auto a = NewSession(*cpu_, Options());
  auto b = NewSession(*mirror_, Options(), store);
  Converse(a.get(), 0, 2, &on_cpu);
  Converse(b.get(), 0, 2, &unused);
  // A fork has no device copy: its first call reads its hot blocks, which fails here.
  auto fork = b->Fork({2, source, store});
  ASSERT_TRUE(fork.ok()) << fork.status();
  Session& f = **fork;
  const size_t turns = f.turns().size();
  const int64_t position = f.position();
  source->set_failing(true);
  auto failed = f.AppendTurn(Role::kUser, kTurns[2]);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kDataLoss) << failed.status();
  auto failed_generate = f.Generate({.sampling = {.max_tokens = 4}}, nullptr);
  EXPECT_EQ(failed_generate.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(f.broken());
  EXPECT_EQ(f.turns().size(), turns);
  EXPECT_EQ(f.position(), position);
  source->set_failing(false);
  Trace after;
  Converse(&f, 2, 4, &after);
  Converse(a.get(), 2, 4, &on_cpu);
  // The CPU trace also holds turns 0-1: compare the continuation only.
  const std::vector<int32_t> tail(on_cpu.tokens.end() - static_cast<long>(after.tokens.size()),
                                  on_cpu.tokens.end());
  EXPECT_EQ(after.tokens, tail);
}

TEST_F(HotRowsOnBackendTest, CpuBackendRefusesACacheWithoutHostRows) {
  const ModelConfig& c = model_->config();
  KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim, KvCache::RowHome::kBackend);
  ForwardResult r;
  const std::vector<int32_t> tokens = {1, 2};
  absl::Status s = cpu_->Forward(tokens, 0, &kv, {}, &r);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_EQ(kv.TotalEntries(), 0);
}

// A row source over a map, counting its calls.
class MapRows : public KvRowSource {
 public:
  absl::Status ReadRows(int layer, int kv_head, absl::Span<const int64_t> positions, float* keys,
                        float* values) override {
    ++calls;
    for (size_t i = 0; i < positions.size(); ++i) {
      if (positions[i] >= 100) return absl::NotFoundError("no such row");
      keys[i * 2] = keys[i * 2 + 1] = static_cast<float>(positions[i] + 1000 * layer);
      values[i * 2] = values[i * 2 + 1] = static_cast<float>(-positions[i] - 10 * kv_head);
    }
    return absl::OkStatus();
  }
  absl::Status ReadRowsBf16(int layer, int kv_head, absl::Span<const int64_t> positions,
                            uint16_t* keys, uint16_t* values) override {
    std::vector<float> k(positions.size() * 2), v(k.size());
    KVMEM_RETURN_IF_ERROR(ReadRows(layer, kv_head, positions, k.data(), v.data()));
    for (size_t i = 0; i < k.size(); ++i) {
      keys[i] = Bf16Rne(k[i]);
      values[i] = Bf16Rne(v[i]);
    }
    return absl::OkStatus();
  }
  int calls = 0;
};

TEST(KvCacheTest, FreshRowsAppendDropAndServeReads) {
  KvCache kv(2, 2, 2, KvCache::RowHome::kBackend);
  // Positions 10, 11 of layer 1: (n, kv_heads, head_dim).
  const float k[] = {1, 1, 2, 2, 3, 3, 4, 4}, v[] = {5, 5, 6, 6, 7, 7, 8, 8};
  kv.AppendFresh(1, 10, 2, k, v);
  EXPECT_EQ(kv.fresh_size(1), 2);
  EXPECT_EQ(kv.fresh_size(0), 0);
  EXPECT_EQ(kv.Bytes(), 16 * static_cast<int64_t>(sizeof(float)));
  float rk[4], rv[4];
  const int64_t both[] = {11, 10};
  ASSERT_TRUE(kv.ReadRows(1, 1, both, rk, rv).ok());
  EXPECT_EQ(std::vector<float>(rk, rk + 4), (std::vector<float>{4, 4, 2, 2}));
  EXPECT_EQ(std::vector<float>(rv, rv + 4), (std::vector<float>{8, 8, 6, 6}));
  // Older positions need a source.
  const int64_t older[] = {3, 11};
  EXPECT_EQ(kv.ReadRows(1, 0, older, rk, rv).code(), absl::StatusCode::kFailedPrecondition);
  MapRows source;
  kv.set_row_source(&source);
  ASSERT_TRUE(kv.ReadRows(1, 0, older, rk, rv).ok());
  EXPECT_EQ(std::vector<float>(rk, rk + 4), (std::vector<float>{1003, 1003, 3, 3}));
  EXPECT_EQ(std::vector<float>(rv, rv + 4), (std::vector<float>{-3, -3, 7, 7}));
  // Older rows after fresh ones land in their places too.
  const int64_t newer_first[] = {11, 3};
  ASSERT_TRUE(kv.ReadRows(1, 0, newer_first, rk, rv).ok());
  EXPECT_EQ(std::vector<float>(rk, rk + 4), (std::vector<float>{3, 3, 1003, 1003}));
  EXPECT_EQ(std::vector<float>(rv, rv + 4), (std::vector<float>{7, 7, -3, -3}));
  // As bf16 bits, fresh and older rows alike (1003 rounds to 1004, the nearest bf16).
  uint16_t bk[4], bv[4];
  ASSERT_TRUE(kv.ReadRowsBf16(1, 0, older, bk, bv).ok());
  EXPECT_EQ(BFloat16ToFloat(bk[0]), 1004.f);
  EXPECT_EQ(BFloat16ToFloat(bk[2]), 3.f);
  EXPECT_EQ(BFloat16ToFloat(bv[1]), -3.f);
  EXPECT_EQ(BFloat16ToFloat(bv[3]), 7.f);
  const int64_t missing[] = {100};
  EXPECT_EQ(kv.ReadRows(0, 0, missing, rk, rv).code(), absl::StatusCode::kNotFound);
  // A copy keeps the fresh rows, not the source.
  KvCache copy = kv;
  EXPECT_EQ(copy.fresh_size(1), 2);
  EXPECT_EQ(copy.ReadRows(1, 0, older, rk, rv).code(), absl::StatusCode::kFailedPrecondition);
  // Dropping from a position rolls back; dropping before one keeps the rest readable.
  KvCache rolled = kv;
  rolled.DropFreshFrom(11);
  EXPECT_EQ(rolled.fresh_size(1), 1);
  kv.DropFreshBefore(11);
  EXPECT_EQ(kv.fresh_size(1), 1);
  const int64_t eleven[] = {11};
  const int calls = source.calls;
  ASSERT_TRUE(kv.ReadRows(1, 1, eleven, rk, rv).ok());
  EXPECT_EQ(source.calls, calls);
  EXPECT_EQ(rk[0], 4);
  kv.AppendFresh(1, 12, 1, k, v);  // continues where the rows end
  EXPECT_EQ(kv.fresh(1).first, 11);
  kv.DropFreshBefore(20);
  EXPECT_EQ(kv.Bytes(), 0);
  // Rows dropped to none give their memory back.
  EXPECT_EQ(kv.fresh(1).rows.keys.capacity(), 0u);
  EXPECT_EQ(kv.fresh(1).rows.values.capacity(), 0u);
  kv.AppendFresh(1, 20, 1, k, v);
  kv.DropFreshFrom(20);
  EXPECT_EQ(kv.fresh(1).rows.keys.capacity(), 0u);
}

TEST(KvCacheTest, Bf16FreshRowsStayBf16AndReadBackExactly) {
  // A bf16 device hands its new rows over as bf16 bits: held in half the bytes, read back as
  // bf16 bits unchanged and as f32 exactly, and put into blocks of either type without loss.
  KvCache kv(1, 2, 2, KvCache::RowHome::kBackend);
  // Positions 4, 5: (n, kv_heads, head_dim). 0x3f81 is 1.0078125 (not an f16 either).
  const uint16_t k[] = {0x3f80, 0x3f81, 0x4000, 0xc040, 0x4080, 0x40a0, 0x3f81, 0x0000};
  const uint16_t v[] = {0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
  kv.AppendFresh(0, 4, 2, BlockDType::kBF16, k, v);
  EXPECT_EQ(kv.fresh(0).rows.dtype, BlockDType::kBF16);
  EXPECT_EQ(kv.fresh_size(0), 2);
  EXPECT_EQ(kv.Bytes(), 16 * static_cast<int64_t>(sizeof(uint16_t)));
  const int64_t both[] = {5, 4};
  uint16_t bk[4], bv[4];
  ASSERT_TRUE(kv.ReadRowsBf16(0, 1, both, bk, bv).ok());
  EXPECT_EQ(std::vector<uint16_t>(bk, bk + 4),
            (std::vector<uint16_t>{0x3f81, 0x0000, 0x4000, 0xc040}));
  EXPECT_EQ(std::vector<uint16_t>(bv, bv + 4),
            (std::vector<uint16_t>{0x4160, 0x4170, 0x4120, 0x4130}));
  float fk[4], fv[4];
  ASSERT_TRUE(kv.ReadRows(0, 0, both, fk, fv).ok());
  EXPECT_EQ(std::vector<float>(fk, fk + 4), (std::vector<float>{4.f, 5.f, 1.f, 1.0078125f}));
  // Into blocks: a bf16 block copies the bits, an f32 one widens them.
  for (BlockDType dtype : {BlockDType::kBF16, BlockDType::kF32}) {
    KvBlock block = MakeEmptyBlock(0, 4, 2, 2, dtype);
    block.CopyFrom(4, kv.fresh(0).rows, 0, 8);
    float wk[8];
    block.ReadKeys(4, 8, wk);
    for (int i = 0; i < 8; ++i) EXPECT_EQ(wk[i], BFloat16ToFloat(k[i])) << i;
    uint16_t back[8];
    block.ReadValuesBf16(4, 8, back);
    EXPECT_EQ(std::vector<uint16_t>(back, back + 8), std::vector<uint16_t>(v, v + 8));
  }
  // Dropping keeps the type; the next pass continues in it.
  kv.DropFreshBefore(5);
  EXPECT_EQ(kv.fresh_size(0), 1);
  ASSERT_TRUE(kv.ReadRowsBf16(0, 1, absl::MakeConstSpan(both, 1), bk, bv).ok());
  EXPECT_EQ(bk[0], 0x3f81);
  kv.AppendFresh(0, 6, 1, BlockDType::kBF16, k, v);
  EXPECT_EQ(kv.fresh_size(0), 2);
  kv.DropFreshFrom(6);
  EXPECT_EQ(kv.fresh_size(0), 1);
  // A backend may copy a pass's rows straight into room grown for them.
  const auto [gk, gv] = kv.GrowFresh(0, 6, 1, BlockDType::kBF16);
  std::memcpy(gk, k + 4, 4 * sizeof(uint16_t));
  std::memcpy(gv, v + 4, 4 * sizeof(uint16_t));
  const int64_t six[] = {6};
  ASSERT_TRUE(kv.ReadRowsBf16(0, 1, six, bk, bv).ok());
  EXPECT_EQ(bk[0], 0x3f81);
  EXPECT_EQ(bv[1], 0x4170);
  kv.DropFreshBefore(10);
  EXPECT_EQ(kv.Bytes(), 0);
  // Once empty, rows of another type may follow (a backend of another type took over).
  const float f[] = {1, 2, 3, 4};
  kv.AppendFresh(0, 10, 1, f, f);
  EXPECT_EQ(kv.fresh(0).rows.dtype, BlockDType::kF32);
  ASSERT_TRUE(kv.ReadRows(0, 1, std::vector<int64_t>{10}, fk, fv).ok());
  EXPECT_EQ(fk[1], 4.f);
}

TEST(KvCacheTest, LayerRowsOfSeveralHeadsComeBackInTheirOrder) {
  KvCache kv(2, 2, 2, KvCache::RowHome::kBackend);
  const float k[] = {1, 1, 2, 2}, v[] = {5, 5, 6, 6};  // position 10 of layer 1, both heads
  kv.AppendFresh(1, 10, 1, k, v);
  // A source that reads head by head only (the default layer read falls back to it).
  MapRows source;
  kv.set_row_source(&source);
  const KvRowRef rows[] = {{3, 1}, {10, 1}, {3, 0}, {7, 1}, {10, 0}};
  float rk[10], rv[10];
  ASSERT_TRUE(kv.ReadLayerRows(1, rows, rk, rv).ok());
  EXPECT_EQ(std::vector<float>(rk, rk + 10),
            (std::vector<float>{1003, 1003, 2, 2, 1003, 1003, 1007, 1007, 1, 1}));
  EXPECT_EQ(std::vector<float>(rv, rv + 10),
            (std::vector<float>{-13, -13, 6, 6, -3, -3, -17, -17, 5, 5}));
  uint16_t bk[10], bv[10];
  ASSERT_TRUE(kv.ReadLayerRowsBf16(1, rows, bk, bv).ok());
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(bk[i], Bf16Rne(rk[i])) << i;
    EXPECT_EQ(bv[i], Bf16Rne(rv[i])) << i;
  }
  // Errors of the source pass through.
  const KvRowRef missing[] = {{3, 0}, {100, 1}};
  EXPECT_EQ(kv.ReadLayerRows(1, missing, rk, rv).code(), absl::StatusCode::kNotFound);
}

TEST(KvCacheTest, WithHostRowsReadsEveryEntry) {
  KvCache kv(1, 2, 2, KvCache::RowHome::kBackend);
  MapRows source;
  kv.set_row_source(&source);
  kv.head(0, 0).positions = {1, 4};
  kv.head(0, 1).positions = {2};
  auto rows = kv.WithHostRows();
  ASSERT_TRUE(rows.ok()) << rows.status();
  EXPECT_TRUE(rows->host_rows());
  EXPECT_EQ(rows->head(0, 0).positions, (std::vector<int64_t>{1, 4}));
  EXPECT_EQ(rows->head(0, 0).keys, (std::vector<float>{1, 1, 4, 4}));
  EXPECT_EQ(rows->head(0, 1).values, (std::vector<float>{-12, -12}));
  kv.head(0, 1).positions = {200};
  EXPECT_EQ(kv.WithHostRows().status().code(), absl::StatusCode::kNotFound);
}

TEST_F(HotRowsOnBackendTest, Bf16BlocksKeepABf16DevicesRowsExactlyInHalfTheBytes) {
  // Two bf16 devices, one whose sessions keep f32 blocks and one bf16 blocks: the blocks hold
  // the same values, so everything that follows from them (read-backs after recall, forks)
  // is the same.
  MirrorBackend f32_blocks(*model_, cpu_), bf16_blocks(*model_, cpu_);
  f32_blocks.set_bf16_rows(BlockDType::kF32);
  bf16_blocks.set_bf16_rows(BlockDType::kBF16);
  auto store_a = std::make_shared<MemoryBlockStore>();
  auto store_b = std::make_shared<MemoryBlockStore>();
  auto a = NewSession(f32_blocks, Options(), store_a);
  auto b = NewSession(bf16_blocks, Options(), store_b);
  Trace ta, tb;
  Converse(a.get(), 0, 3, &ta);
  Converse(b.get(), 0, 3, &tb);
  EXPECT_EQ(ta, tb);
  int64_t recalled = 0;
  for (int64_t r : tb.recalled) recalled += r;
  EXPECT_GT(recalled, 0) << "the scenario must read rows back from blocks";
  EXPECT_GT(bf16_blocks.rows_read(), 0);
  EXPECT_EQ(f32_blocks.bf16_mismatches(), 0);
  EXPECT_EQ(bf16_blocks.bf16_mismatches(), 0);
  EXPECT_EQ(b->Stats().block_bytes * 2, a->Stats().block_bytes);
  const ModelConfig& c = model_->config();
  for (int64_t index : {int64_t{0}, a->position() / 8 - 1}) {
    auto block_a = store_a->ReadBlock({1, 3, index}, nullptr);
    auto block_b = store_b->ReadBlock({1, 3, index}, nullptr);
    ASSERT_TRUE(block_a.ok() && block_b.ok());
    EXPECT_EQ((*block_b)->dtype, BlockDType::kBF16);
    EXPECT_EQ((*block_b)->bytes() * 2, (*block_a)->bytes());
    EXPECT_EQ(WidenedBlock(**block_b).keys, (*block_a)->keys);
    EXPECT_EQ(WidenedBlock(**block_b).values, (*block_a)->values);
  }
  std::vector<float> ka(c.head_dim), va(c.head_dim), kb(c.head_dim), vb(c.head_dim);
  for (int64_t p = 0; p < a->position(); p += 5) {
    ASSERT_TRUE(a->ReadPosition(1, p, 0, ka.data(), va.data()).ok());
    ASSERT_TRUE(b->ReadPosition(1, p, 0, kb.data(), vb.data()).ok());
    EXPECT_EQ(ka, kb) << "position " << p;
    EXPECT_EQ(va, vb) << "position " << p;
  }
  // Forks rebuild their device copies from the blocks.
  auto fa = a->Fork();
  auto fb = b->Fork();
  ASSERT_TRUE(fa.ok() && fb.ok());
  Trace fork_a, fork_b;
  Converse(fa->get(), 3, 4, &fork_a);
  Converse(fb->get(), 3, 4, &fork_b);
  EXPECT_EQ(fork_a, fork_b);
  EXPECT_EQ(f32_blocks.bf16_mismatches(), 0);
  EXPECT_EQ(bf16_blocks.bf16_mismatches(), 0);
}

TEST_F(HotRowsOnBackendTest, Bf16SessionRestoredOnAnF32BackendKeepsItsNewRowsExact) {
  // A bf16 device's session (bf16 blocks, a partial last block) restored on the CPU backend:
  // the partial block goes on filling with f32 rows, which must stay f32, not round to bf16.
  MirrorBackend bf16(*model_, cpu_);
  bf16.set_bf16_rows(BlockDType::kBF16);
  auto store = std::make_shared<MemoryBlockStore>();
  auto b = NewSession(bf16, Options(), store);
  Trace unused;
  Converse(b.get(), 0, 2, &unused);
  ASSERT_NE(b->position() % 8, 0) << "the last block must be partial";
  auto tail = store->ReadBlock({1, 0, b->position() / 8}, nullptr);
  ASSERT_TRUE(tail.ok());
  EXPECT_EQ((*tail)->dtype, BlockDType::kBF16);
  for (Backend* backend : {static_cast<Backend*>(cpu_), static_cast<Backend*>(&bf16)}) {
    SCOPED_TRACE(backend->name());
    auto restored =
        Session::Restore(*model_, *backend, Options(), {1, store, store}, b->Snapshot());
    ASSERT_TRUE(restored.ok()) << restored.status();
    Session& r = **restored;
    const int64_t first_new = r.position();
    auto a = r.AppendTurn(Role::kUser, "The end.");
    ASSERT_TRUE(a.ok()) << a.status();
    // The turn's rows are in the window, so hot; the CPU backend holds them as it computed them.
    const ModelConfig& c = model_->config();
    std::vector<float> k(c.head_dim), v(c.head_dim);
    for (int64_t p = first_new; p < r.position(); ++p) {
      ASSERT_TRUE(r.ReadPosition(2, p, 1, k.data(), v.data()).ok());
      if (backend == cpu_) {
        const HeadKv& h = r.hot().head(2, 1);
        const auto at = std::lower_bound(h.positions.begin(), h.positions.end(), p);
        ASSERT_TRUE(at != h.positions.end() && *at == p) << p;
        const int64_t e = at - h.positions.begin();
        EXPECT_EQ(k, std::vector<float>(&h.keys[e * c.head_dim], &h.keys[(e + 1) * c.head_dim]));
        EXPECT_EQ(v,
                  std::vector<float>(&h.values[e * c.head_dim], &h.values[(e + 1) * c.head_dim]));
      } else {
        for (float x : k) EXPECT_EQ(x, BFloat16ToFloat(Bf16Rne(x))) << "a bf16 device's rows";
      }
    }
  }
}

}  // namespace
}  // namespace kvmem
