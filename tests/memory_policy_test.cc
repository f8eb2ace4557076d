// The memory policies added beside snapkv/window/full: H2O's accumulated attention,
// entropy-adaptive SnapKV windows and Ada-KV per-head budgets; on hand-built caches where the
// answer is known, and on sessions of the real stories260K model.
#include "engine/memory_policy.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/session.h"
#include "gtest/gtest.h"

namespace kvmem {
namespace {

std::unique_ptr<MemoryPolicy> MakePolicy(const MemoryOptions& o) {
  auto p = MakeMemoryPolicy(o);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

// Positions of the entries `keep` selects from `head`.
std::vector<int64_t> PositionsOf(const HeadKv& head, const std::vector<int64_t>& keep) {
  std::vector<int64_t> out;
  for (int64_t i : keep) out.push_back(head.positions[i]);
  return out;
}

// A one-layer cache whose heads hold `keys` (head_dim 2) at `positions`; values are zero.
KvCache OneLayerCache(const std::vector<std::vector<int64_t>>& positions,
                      const std::vector<std::vector<std::array<float, 2>>>& keys) {
  KvCache kv(1, static_cast<int>(positions.size()), 2);
  const float zero[2] = {0, 0};
  for (size_t g = 0; g < positions.size(); ++g) {
    for (size_t i = 0; i < positions[g].size(); ++i) {
      kv.head(0, static_cast<int>(g)).Append(positions[g][i], keys[g][i].data(), zero, 2);
    }
  }
  return kv;
}

TEST(MemoryPolicyTest, FactoryBuildsEveryNamedPolicy) {
  for (const char* name : {"full", "window", "snapkv", "h2o", "snapkv-adaptive", "adakv"}) {
    auto p = MakeMemoryPolicy({.policy = name, .budget = 64, .window = 8});
    ASSERT_TRUE(p.ok()) << name << ": " << p.status();
    EXPECT_STREQ((*p)->name(), name);
    EXPECT_STREQ((*p)->Clone()->name(), name);
  }
  EXPECT_EQ(MakePolicy({.policy = "h2o"})->observe_window(), MemoryPolicy::kWholeTurn);
  EXPECT_EQ(MakePolicy({.policy = "snapkv-adaptive", .window = 16})->observe_window(), 16);
  EXPECT_EQ(MakePolicy({.policy = "adakv", .window = 16})->observe_window(), 16);
}

TEST(MemoryPolicyTest, InvalidSettingsAreRejectedNamingTheSetting) {
  auto message = [](const MemoryOptions& o) {
    absl::Status s = ValidateMemoryOptions(o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << o.policy;
    return std::string(s.message());
  };
  EXPECT_NE(message({.policy = "h2o", .budget = 8, .recent_share = 1.0}).find("recent_share"),
            std::string::npos);
  EXPECT_NE(message({.policy = "h2o", .budget = 8, .recent_share = -0.1}).find("recent_share"),
            std::string::npos);
  EXPECT_NE(message({.policy = "h2o", .budget = 0}).find("budget"), std::string::npos);
  EXPECT_NE(message({.policy = "snapkv-adaptive", .budget = 8, .window = 8}).find("budget"),
            std::string::npos);
  EXPECT_NE(message({.policy = "adakv", .budget = 64, .kernel = 4}).find("kernel"),
            std::string::npos);
  EXPECT_NE(message({.policy = "adakv", .budget = 64, .window = 8, .min_head_share = 1.5})
                .find("min_head_share"),
            std::string::npos);
  EXPECT_NE(message({.policy = "lru"}).find("adakv"), std::string::npos);
  EXPECT_TRUE(ValidateMemoryOptions({.policy = "h2o", .budget = 8, .recent_share = 0.0}).ok());
}

// H2O ----------------------------------------------------------------------------------------

TEST(H2oTest, KeepsRecentEntriesAndTheHeaviestAccumulatedAttention) {
  // Entries 2 and 5 have keys the turn's queries read; everything else is equally dull.
  std::vector<std::array<float, 2>> keys(10, {0, 0});
  keys[2] = {4, 0};
  keys[5] = {4, 0};
  KvCache kv = OneLayerCache({{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}}, {keys});
  const std::vector<std::vector<float>> queries = {{3, 0, 3, 0, 3, 0}};  // (1 head, 3 rows, 2)
  TurnView turn{
      .kv = &kv, .new_tokens = 3, .observed_queries = &queries, .observed = 3, .num_heads = 1};
  auto h2o = MakePolicy({.policy = "h2o", .budget = 4, .recent_share = 0.5});
  EXPECT_EQ(h2o->Select(turn).value(), (std::vector<std::vector<int64_t>>{{2, 5, 8, 9}}));
}

TEST(H2oTest, AccumulatedScoresOfEarlierTurnsStillCount) {
  // Turn 1: positions 0..5, the last two new. Its queries read position 1 hard (and 3, 5 a
  // little); nothing else stands out, so ties keep the lowest position 0.
  KvCache turn1_kv =
      OneLayerCache({{0, 1, 2, 3, 4, 5}}, {{{0, 0}, {5, 0}, {0, 0}, {0, 5}, {0, 0}, {0, 5}}});
  const std::vector<std::vector<float>> q1 = {{3, 1.5f, 3, 1.5f}};
  TurnView turn1{
      .kv = &turn1_kv, .new_tokens = 2, .observed_queries = &q1, .observed = 2, .num_heads = 1};
  auto h2o = MakePolicy({.policy = "h2o", .budget = 4, .recent_share = 0.25});
  ASSERT_EQ(PositionsOf(turn1_kv.head(0, 0), h2o->Select(turn1).value()[0]),
            (std::vector<int64_t>{0, 1, 3, 5}));
  auto clone = h2o->Clone();

  // Turn 2 appends positions 6, 7 whose queries read positions 3 and 5, not 1.
  KvCache turn2_kv =
      OneLayerCache({{0, 1, 3, 5, 6, 7}}, {{{0, 0}, {5, 0}, {0, 5}, {0, 5}, {0, 0}, {0, 0}}});
  const std::vector<std::vector<float>> q2 = {{0, 3, 0, 3}};
  TurnView turn2{
      .kv = &turn2_kv, .new_tokens = 2, .observed_queries = &q2, .observed = 2, .num_heads = 1};
  const HeadKv& head = turn2_kv.head(0, 0);
  // Remembering turn 1, position 1 stays a heavy hitter.
  EXPECT_EQ(PositionsOf(head, h2o->Select(turn2).value()[0]), (std::vector<int64_t>{1, 3, 5, 7}));
  EXPECT_EQ(PositionsOf(head, clone->Select(turn2).value()[0]), (std::vector<int64_t>{1, 3, 5, 7}));
  // A policy that saw only turn 2 would have dropped it.
  auto fresh = MakePolicy({.policy = "h2o", .budget = 4, .recent_share = 0.25});
  EXPECT_EQ(PositionsOf(head, fresh->Select(turn2).value()[0]), (std::vector<int64_t>{0, 3, 5, 7}));
}

// Entropy-adaptive SnapKV ----------------------------------------------------------------------

TEST(AdaptiveSnapKvTest, WindowsAreProportionalToEntropyWithTheMostDiffuseHeadGettingAll) {
  EXPECT_EQ(EntropyAdaptiveWindows({0.5, 0.25, 0.0, 1.0}, 8), (std::vector<int>{4, 2, 1, 8}));
  EXPECT_EQ(EntropyAdaptiveWindows({0.2, 0.4}, 8), (std::vector<int>{4, 8}));
  EXPECT_EQ(EntropyAdaptiveWindows({0.0, 0.0}, 8), (std::vector<int>{8, 8}));
}

TEST(AdaptiveSnapKvTest, EntropyIsOneForUniformAttentionAndNearZeroForOneDominantKey) {
  std::vector<std::array<float, 2>> dull(8, {0, 0}), sharp(8, {0, 0});
  sharp[3] = {20, 0};
  KvCache kv = OneLayerCache({{0, 1, 2, 3, 4, 5, 6, 7}, {0, 1, 2, 3, 4, 5, 6, 7}}, {dull, sharp});
  const std::vector<float> queries = {2, 0, 2, 0, 2, 0, 2, 0};  // (2 heads, 2 rows, 2)
  std::vector<const HeadKv*> heads = {&kv.head(0, 0), &kv.head(0, 1)};
  EXPECT_NEAR(NormalizedAttentionEntropy(queries.data(), 2, 2, heads, 0), 1.0, 1e-9);
  EXPECT_LT(NormalizedAttentionEntropy(queries.data(), 2, 2, heads, 1), 0.01);
}

TEST(AdaptiveSnapKvTest, EqualsSnapKvWhenALayerHasOneKvHead) {
  // With one KV head per layer that head is the most diffuse: it gets the whole window.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const int n = 60, w = 8, hd = 4, heads = 2;
  KvCache kv(1, 1, hd);
  for (int i = 0; i < n; ++i) {
    float k[hd], v[hd];
    for (float& x : k) x = 1.5f * normal(rng);
    for (float& x : v) x = normal(rng);
    kv.head(0, 0).Append(i, k, v, hd);
  }
  std::vector<std::vector<float>> queries(1, std::vector<float>(heads * w * hd));
  for (float& x : queries[0]) x = 1.5f * normal(rng);
  TurnView turn{
      .kv = &kv, .new_tokens = 20, .observed_queries = &queries, .observed = w, .num_heads = heads};
  MemoryOptions o{.policy = "snapkv", .budget = 24, .window = w, .kernel = 5};
  auto snapkv = MakePolicy(o);
  o.policy = "snapkv-adaptive";
  auto adaptive = MakePolicy(o);
  EXPECT_EQ(adaptive->Select(turn).value(), snapkv->Select(turn).value());
}

TEST(AdaptiveSnapKvTest, SharpHeadUsesAShortWindowAndKeepsMoreOlderEntries) {
  // Head 0 attends one old key sharply; head 1 attends uniformly (all keys zero).
  const int n = 40, w = 8, budget = 16;
  std::vector<int64_t> positions(n);
  std::iota(positions.begin(), positions.end(), 0);
  std::vector<std::array<float, 2>> sharp(n, {0, 0}), dull(n, {0, 0});
  for (int i = 0; i < n - w; ++i) sharp[i] = {0, 0.1f * (i % 5)};  // older entries differ a bit
  sharp[10] = {30, 0};
  KvCache kv = OneLayerCache({positions, positions}, {sharp, dull});
  std::vector<std::vector<float>> queries(1);
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < w; ++i) queries[0].insert(queries[0].end(), {1, 1});
  }
  TurnView turn{
      .kv = &kv, .new_tokens = w, .observed_queries = &queries, .observed = w, .num_heads = 2};
  auto keep = MakePolicy({.policy = "snapkv-adaptive", .budget = budget, .window = w, .kernel = 1})
                  ->Select(turn)
                  .value();
  ASSERT_EQ(keep.size(), 2u);
  for (const auto& k : keep) {
    EXPECT_EQ(k.size(), static_cast<size_t>(budget));
    EXPECT_TRUE(std::is_sorted(k.begin(), k.end()));
    EXPECT_EQ(k.back(), n - 1);
  }
  auto older = [&](const std::vector<int64_t>& k) {
    return std::count_if(k.begin(), k.end(), [&](int64_t i) { return i < n - w; });
  };
  EXPECT_GT(older(keep[0]), budget - w) << "the sharp head should spend budget on old entries";
  EXPECT_EQ(older(keep[1]), budget - w) << "the diffuse head keeps its whole window";
  EXPECT_TRUE(std::binary_search(keep[0].begin(), keep[0].end(), 10));
}

// Ada-KV ---------------------------------------------------------------------------------------

TEST(AdaKvTest, ConcentratedHeadGivesBudgetToTheHeadThatScoresHigher) {
  const std::vector<std::vector<double>> scores = {{0.9, 0.8, 0.7, 0.6}, {0.1, 0.1, 0.1, 0.1}};
  // No safeguard: head 0's candidates take the whole shared budget (2 heads x 3 = 6).
  EXPECT_EQ(AllocateAdaKv(scores, 1, 3, 0.0),
            (std::vector<std::vector<int64_t>>{{0, 1, 2, 3, 4}, {4}}));
  // A safeguard of half the budget (2 entries) leaves head 1 its window plus its best one.
  EXPECT_EQ(AllocateAdaKv(scores, 1, 3, 0.5),
            (std::vector<std::vector<int64_t>>{{0, 1, 2, 4}, {0, 4}}));
  // A safeguard of the whole budget is plain SnapKV: 3 each.
  EXPECT_EQ(AllocateAdaKv(scores, 1, 3, 1.0),
            (std::vector<std::vector<int64_t>>{{0, 1, 4}, {0, 1, 4}}));
}

TEST(AdaKvTest, EqualScoresGoToTheLowerHeadThenTheLowerIndex) {
  const std::vector<std::vector<double>> scores = {{0.5, 0.5}, {0.5, 0.5}};
  EXPECT_EQ(AllocateAdaKv(scores, 1, 2, 0.0), (std::vector<std::vector<int64_t>>{{0, 1, 2}, {2}}));
}

TEST(AdaKvTest, LayerTotalIsHeadsTimesBudgetWithWindowsAndSafeguardKept) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int trial = 0; trial < 50; ++trial) {
    const int heads = 1 + trial % 4, w = 1 + trial % 5, budget = w + 1 + trial % 13;
    const double share = (trial % 6) / 5.0;
    std::vector<std::vector<double>> scores(heads);
    int64_t entries = 0;
    for (auto& s : scores) {
      s.resize(rng() % 40);
      for (double& x : s) x = uniform(rng) * uniform(rng);
      entries += static_cast<int64_t>(s.size()) + w;
    }
    auto keep = AllocateAdaKv(scores, w, budget, share);
    ASSERT_EQ(keep.size(), static_cast<size_t>(heads));
    int64_t total = 0;
    const int64_t floor = std::max<int64_t>(w, static_cast<int64_t>(std::ceil(share * budget)));
    for (int g = 0; g < heads; ++g) {
      const int64_t n = static_cast<int64_t>(scores[g].size()) + w;
      const auto& k = keep[g];
      total += static_cast<int64_t>(k.size());
      EXPECT_TRUE(std::is_sorted(k.begin(), k.end()));
      EXPECT_EQ(std::set<int64_t>(k.begin(), k.end()).size(), k.size());
      ASSERT_GE(k.size(), static_cast<size_t>(w));
      for (int i = 0; i < w; ++i) EXPECT_EQ(k[k.size() - w + i], n - w + i);
      EXPECT_GE(static_cast<int64_t>(k.size()), std::min({n, floor, int64_t{budget}}));
    }
    EXPECT_EQ(total, std::min<int64_t>(entries, int64_t{heads} * budget)) << "trial " << trial;
  }
}

// Sessions on stories260K ----------------------------------------------------------------------

const char* const kTurns[] = {
    "Once upon a time, there was a little dog named Max. Max loved to run in the big green "
    "park near his house. Every day he played with a red ball and a small cat named Tom.",
    "One day, Max lost his ball under a tree. He looked and looked, but he could not find it. "
    "He felt very sad and sat down.",
    "Then Tom the cat came by and said, Do not be sad, Max. I will help you find your ball.",
};

class PolicySessionTest : public ::testing::TestWithParam<const char*> {
 protected:
  static void SetUpTestSuite() {
    auto model = Model::Load(KVMEM_TEST_MODEL_DIR);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
    backend_ = new CpuBackend(*model_, {.threads = 2});
  }
  static void TearDownTestSuite() {
    delete backend_;
    delete model_;
  }
  std::unique_ptr<Session> NewSession(const MemoryOptions& memory) {
    auto s = Session::Create(*model_, *backend_, {.memory = memory, .recall_blocks = 0});
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  static Model* model_;
  static CpuBackend* backend_;
};
Model* PolicySessionTest::model_ = nullptr;
CpuBackend* PolicySessionTest::backend_ = nullptr;

TEST_P(PolicySessionTest, BudgetCoveringEverythingGivesTheUncompressedLogits) {
  auto full = NewSession({.policy = "full"});
  auto s = NewSession({.policy = GetParam(), .budget = 4096, .window = 8});
  for (const char* turn : kTurns) {
    auto a = full->AppendTurn(Role::kUser, turn, {.return_logits = true});
    auto b = s->AppendTurn(Role::kUser, turn, {.return_logits = true});
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->logits, b->logits);
    EXPECT_EQ(b->evicted, 0);
  }
}

TEST_P(PolicySessionTest, SmallBudgetKeepsTheBudgetAndTheRecentEntries) {
  const int budget = 24, window = 6;
  const std::string policy = GetParam();
  auto s = NewSession({.policy = policy, .budget = budget, .window = window, .kernel = 5});
  const ModelConfig& c = model_->config();
  int64_t evicted = 0;
  std::set<int64_t> head_sizes;
  for (const char* turn : kTurns) {
    auto r = s->AppendTurn(Role::kUser, turn);
    ASSERT_TRUE(r.ok()) << r.status();
    evicted += r->evicted;
    const int64_t end = s->position();
    for (int l = 0; l < c.num_layers; ++l) {
      int64_t layer_total = 0;
      for (int g = 0; g < c.num_kv_heads; ++g) {
        const HeadKv& h = s->hot().head(l, g);
        layer_total += h.size();
        head_sizes.insert(h.size());
        if (policy != "adakv") {
          EXPECT_EQ(h.size(), budget) << "layer " << l << " head " << g;
        }
        EXPECT_TRUE(std::is_sorted(h.positions.begin(), h.positions.end()));
        EXPECT_EQ(h.positions.back(), end - 1);
        // The last entry of the turn is always kept; h2o (12 recent) and adakv keep all `window`.
        if (policy != "snapkv-adaptive") {
          ASSERT_GE(h.size(), window);
          for (int i = 0; i < window; ++i) {
            EXPECT_EQ(h.positions[h.size() - window + i], end - window + i);
          }
        }
      }
      EXPECT_EQ(layer_total, int64_t{budget} * c.num_kv_heads) << "layer " << l;
    }
  }
  EXPECT_GT(evicted, 0);
  // Only adakv shares the budget unevenly among heads.
  EXPECT_EQ(head_sizes.size() > 1, policy == "adakv");
}

INSTANTIATE_TEST_SUITE_P(NewPolicies, PolicySessionTest,
                         ::testing::Values("h2o", "snapkv-adaptive", "adakv"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace kvmem
