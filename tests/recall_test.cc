// Recall by digest score: a block whose keys align with a new turn's queries comes back.
#include <cmath>
#include <memory>

#include "engine/cpu_backend.h"
#include "engine/session.h"
#include "gtest/gtest.h"

namespace kvmem {
namespace {

constexpr int kLayer = 2, kHead = 1, kBlock = 16;

// Serves one block (and its digest) with the keys of one KV head replaced by `key`.
class PlantedSource : public BlockSource {
 public:
  PlantedSource(std::shared_ptr<MemoryBlockStore> store, int64_t index, std::vector<float> key,
                const ModelConfig& c)
      : store_(std::move(store)), index_(index), key_(std::move(key)), c_(c) {}

  absl::StatusOr<std::shared_ptr<const KvBlock>> ReadBlock(const BlockKey& key,
                                                           bool* from_cold) override {
    auto block = store_->ReadBlock(key, from_cold);
    if (!block.ok() || key.layer != kLayer || key.index != index_) return block;
    auto planted = std::make_shared<KvBlock>(**block);
    for (int s = 0; s < planted->filled; ++s) {
      std::copy(key_.begin(), key_.end(),
                &planted->keys[(static_cast<size_t>(s) * c_.num_kv_heads + kHead) * c_.head_dim]);
    }
    return std::shared_ptr<const KvBlock>(planted);
  }
  absl::StatusOr<std::vector<float>> ReadDigest(const BlockKey& key) override {
    if (key.layer != kLayer || key.index != index_) return store_->ReadDigest(key);
    auto block = ReadBlock(key, nullptr);
    if (!block.ok()) return block.status();
    return ComputeDigest(**block, c_.num_kv_heads, c_.head_dim);
  }

 private:
  std::shared_ptr<MemoryBlockStore> store_;
  int64_t index_;
  std::vector<float> key_;
  const ModelConfig& c_;
};

const char kTurn1[] =
    "Once upon a time, there was a little dog named Max. Max loved to run in the big green "
    "park near his house. Every day he played with a red ball and a small cat named Tom.";
const char kTurn2[] =
    "One day, Max lost his ball under a tree. He looked and looked, but he could not find it.";
const char kTurn3[] = "Then Tom the cat came by and said, I will help you.";

class RecallTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = Model::Load(KVMEM_TEST_MODEL_DIR);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    backend_ = std::make_unique<CpuBackend>(*model_, CpuBackendOptions{.threads = 1});
    options_.memory = {.policy = "snapkv", .budget = 24, .window = 8, .kernel = 3};
    options_.block_size = kBlock;
    options_.recall_blocks = 0;
    store_ = std::make_shared<MemoryBlockStore>();
    auto s = Session::Create(*model_, *backend_, options_, {1, store_, store_});
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE((*s)->AppendTurn(Role::kUser, kTurn1).ok());
    ASSERT_TRUE((*s)->AppendTurn(Role::kUser, kTurn2).ok());
    snapshot_ = (*s)->Snapshot();
  }

  std::unique_ptr<Session> Restore(std::shared_ptr<BlockSource> source, int recall_blocks) {
    SessionOptions o = options_;
    o.recall_blocks = recall_blocks;
    auto s = Session::Restore(*model_, *backend_, o, {1, std::move(source), store_}, snapshot_);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  // A block none of whose positions the head keeps hot.
  int64_t ColdBlockOfHead() const {
    const auto& hot = snapshot_.hot_positions[kLayer * model_->config().num_kv_heads + kHead];
    for (int64_t b = 0; (b + 1) * kBlock <= snapshot_.position; ++b) {
      bool any = false;
      for (int64_t p : hot) any |= p / kBlock == b;
      if (!any) return b;
    }
    return -1;
  }

  std::unique_ptr<Model> model_;
  std::unique_ptr<CpuBackend> backend_;
  SessionOptions options_;
  std::shared_ptr<MemoryBlockStore> store_;
  SessionSnapshot snapshot_;
};

TEST_F(RecallTest, BlockAlignedWithTheTurnsQueriesIsRecalledAndStaysHot) {
  const ModelConfig& c = model_->config();
  const int64_t block = ColdBlockOfHead();
  ASSERT_GE(block, 0) << "no fully evicted block to plant";

  // The turn's window queries of the KV head's query heads, from a dry run.
  auto probe = Restore(store_, 0);
  auto dry = probe->AppendTurn(Role::kUser, kTurn3, {.return_queries = 8});
  ASSERT_TRUE(dry.ok());
  std::vector<float> key(c.head_dim, 0.f);
  const auto& q = dry->queries[kLayer];  // (num_heads, 8, head_dim)
  for (int h = kHead * c.group_size(); h < (kHead + 1) * c.group_size(); ++h) {
    for (int i = 0; i < 8; ++i) {
      for (int d = 0; d < c.head_dim; ++d) key[d] += q[(h * 8 + i) * c.head_dim + d];
    }
  }
  double norm = 0;
  for (float v : key) norm += v * v;
  for (float& v : key) v = static_cast<float>(v * 40.0 / std::sqrt(norm));
  auto planted = std::make_shared<PlantedSource>(store_, block, key, c);

  auto with_recall = Restore(planted, 2);
  auto r = with_recall->AppendTurn(Role::kUser, kTurn3);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->recalled_blocks, 0);
  const HeadKv& hot = with_recall->hot().head(kLayer, kHead);
  int kept = 0;
  for (int64_t p : hot.positions) kept += p / kBlock == block;
  EXPECT_EQ(kept, kBlock) << "every position of the planted block should stay hot";

  auto without = Restore(planted, 0);
  auto r0 = without->AppendTurn(Role::kUser, kTurn3);
  ASSERT_TRUE(r0.ok());
  EXPECT_EQ(r0->recalled_blocks, 0);
  for (int64_t p : without->hot().head(kLayer, kHead).positions) EXPECT_NE(p / kBlock, block);
}

TEST_F(RecallTest, RestoresOfOneSnapshotBehaveIdentically) {
  auto original = Restore(store_, 2);
  auto copy = Restore(store_, 2);
  for (auto* s : {original.get(), copy.get()}) ASSERT_TRUE(s->AppendTurn(Role::kUser, kTurn3).ok());
  auto a = original->Generate({.sampling = {.max_tokens = 16}}, nullptr);
  auto b = copy->Generate({.sampling = {.max_tokens = 16}}, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->generation.tokens, b->generation.tokens);
  EXPECT_EQ(original->Stats().hot_tokens_per_head, copy->Stats().hot_tokens_per_head);
}

}  // namespace
}  // namespace kvmem
