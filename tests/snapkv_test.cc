// SnapKV selection against a direct transcription of the paper's formula.
#include "engine/snapkv.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem {
namespace {

// Keys and queries of one layer for the test: ragged KV heads with gapped positions.
struct Layer {
  int num_heads, num_kv_heads, head_dim, w;
  std::vector<HeadKv> heads;
  std::vector<float> queries;  // (num_heads, w, head_dim)
};

Layer RandomLayer(int num_heads, int num_kv_heads, int head_dim, int w,
                  const std::vector<int>& lengths, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Layer layer{num_heads, num_kv_heads, head_dim, w, {}, {}};
  for (int g = 0; g < num_kv_heads; ++g) {
    HeadKv h;
    int64_t pos = 0;
    for (int i = 0; i < lengths[g]; ++i) {
      pos += 1 + static_cast<int64_t>(rng() % 3);  // gaps: earlier evictions
      std::vector<float> k(head_dim), v(head_dim);
      for (float& x : k) x = 1.5f * normal(rng);
      for (float& x : v) x = normal(rng);
      h.Append(pos, k.data(), v.data(), head_dim);
    }
    layer.heads.push_back(std::move(h));
  }
  layer.queries.resize(static_cast<size_t>(num_heads) * w * head_dim);
  for (float& x : layer.queries) x = 1.5f * normal(rng);
  return layer;
}

// The paper's selection written out in matrix form, for one KV head:
//   A[h] = softmax(Q_obs[h] K^T / sqrt(d) + causal mask)          (w x L) per query head
//   v    = mean over the group's heads of sum over rows of A[h][:, :L-w]
//   p    = pool1d(v, kernel, stride 1, padding kernel/2; padding never wins / never counts)
//   keep = window  U  indices of the top (budget - w) of p (ties: lower index)
std::vector<int64_t> PaperSelection(const Layer& layer, int g, const SnapKvOptions& o) {
  const HeadKv& head = layer.heads[g];
  const int L = static_cast<int>(head.size()), w = layer.w, d = layer.head_dim;
  if (L <= o.budget) {
    std::vector<int64_t> all(L);
    for (int i = 0; i < L; ++i) all[i] = i;
    return all;
  }
  const int group = layer.num_heads / layer.num_kv_heads;
  std::vector<double> v(L - w, 0.0);
  for (int h = g * group; h < (g + 1) * group; ++h) {
    for (int r = 0; r < w; ++r) {
      std::vector<double> logits(L);
      for (int c = 0; c < L; ++c) {
        double dot = 0;
        for (int x = 0; x < d; ++x) {
          dot += double(layer.queries[(h * w + r) * d + x]) * head.keys[c * d + x];
        }
        const bool masked = c > L - w + r;  // row r is the entry at L - w + r
        logits[c] = masked ? -INFINITY : dot / std::sqrt(double(d));
      }
      const double m = *std::max_element(logits.begin(), logits.end());
      double z = 0;
      for (double l : logits) z += std::exp(l - m);
      for (int c = 0; c < L - w; ++c) v[c] += std::exp(logits[c] - m) / z / group;
    }
  }
  std::vector<double> p(L - w);
  const int pad = o.kernel / 2;
  for (int c = 0; c < L - w; ++c) {
    double best = -INFINITY, sum = 0;
    int count = 0;
    for (int t = c - pad; t <= c + pad; ++t) {
      if (t < 0 || t >= L - w) continue;  // padding
      best = std::max(best, v[t]);
      sum += v[t];
      ++count;
    }
    p[c] = o.pooling == Pooling::kMax ? best : sum / count;
  }
  std::vector<int> idx(L - w);
  for (int i = 0; i < L - w; ++i) idx[i] = i;
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return p[a] > p[b]; });
  std::set<int64_t> keep(idx.begin(), idx.begin() + (o.budget - w));
  for (int i = L - w; i < L; ++i) keep.insert(i);
  return std::vector<int64_t>(keep.begin(), keep.end());
}

struct Config {
  int heads, kv_heads, head_dim, w, kernel, budget;
  Pooling pooling;
  std::vector<int> lengths;
};

TEST(SnapKvTest, SelectionEqualsPaperFormulaOnRandomInputs) {
  const std::vector<Config> configs = {
      {4, 2, 8, 4, 3, 10, Pooling::kMax, {40, 25}},
      {4, 2, 8, 4, 3, 10, Pooling::kAvg, {40, 25}},
      {8, 2, 16, 8, 7, 20, Pooling::kMax, {100, 60}},
      {8, 2, 16, 8, 7, 20, Pooling::kAvg, {100, 21}},
      {6, 6, 4, 2, 5, 9, Pooling::kMax, {30, 31, 9, 50, 12, 44}},
      {8, 1, 8, 16, 1, 40, Pooling::kAvg, {200}},
      {4, 4, 8, 3, 9, 5, Pooling::kMax, {7, 6, 5, 4}},
      {2, 1, 32, 32, 7, 64, Pooling::kMax, {300}},
  };
  uint32_t seed = 1;
  for (const Config& cfg : configs) {
    for (int trial = 0; trial < 3; ++trial) {
      Layer layer = RandomLayer(cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.w, cfg.lengths, seed++);
      SnapKvOptions o{.window = cfg.w, .kernel = cfg.kernel, .pooling = cfg.pooling,
                      .budget = cfg.budget};
      ASSERT_TRUE(ValidateSnapKvOptions(o).ok());
      std::vector<const HeadKv*> heads;
      for (const HeadKv& h : layer.heads) heads.push_back(&h);
      auto got = SelectSnapKv(o, layer.queries.data(), cfg.heads, cfg.w, heads);
      ASSERT_EQ(got.size(), static_cast<size_t>(cfg.kv_heads));
      for (int g = 0; g < cfg.kv_heads; ++g) {
        EXPECT_EQ(got[g], PaperSelection(layer, g, o))
            << "heads " << cfg.heads << "/" << cfg.kv_heads << " w " << cfg.w << " kernel "
            << cfg.kernel << " kv head " << g << " trial " << trial;
        const int64_t n = layer.heads[g].size();
        EXPECT_EQ(static_cast<int64_t>(got[g].size()), std::min<int64_t>(cfg.budget, n));
        for (int64_t i = n - cfg.w; i < n; ++i) {
          EXPECT_TRUE(std::binary_search(got[g].begin(), got[g].end(), i)) << "window entry " << i;
        }
      }
    }
  }
}

TEST(SnapKvTest, TiesGoToTheLowerPosition) {
  // Identical keys: every candidate gets the same vote, so the earliest ones are kept.
  const int d = 4, w = 2;
  HeadKv head;
  std::vector<float> k(d, 0.5f), v(d, 1.0f);
  for (int i = 0; i < 12; ++i) head.Append(i, k.data(), v.data(), d);
  std::vector<float> q(2 * w * d, 0.25f);
  SnapKvOptions o{.window = w, .kernel = 3, .pooling = Pooling::kMax, .budget = 5};
  auto got = SelectSnapKv(o, q.data(), 2, w, {&head});
  EXPECT_EQ(got[0], (std::vector<int64_t>{0, 1, 2, 10, 11}));
}

TEST(SnapKvTest, PoolingBringsNeighboursOfAStrongVoteAlong) {
  const int d = 4, w = 1;
  HeadKv head;
  std::vector<float> v(d, 1.0f);
  for (int i = 0; i < 20; ++i) {
    std::vector<float> k(d, i == 9 ? 4.0f : 0.0f);
    head.Append(i, k.data(), v.data(), d);
  }
  std::vector<float> q(d, 1.0f);
  SnapKvOptions o{.window = w, .kernel = 3, .pooling = Pooling::kMax, .budget = 4};
  auto got = SelectSnapKv(o, q.data(), 1, w, {&head});
  EXPECT_EQ(got[0], (std::vector<int64_t>{8, 9, 10, 19}));
  o.kernel = 1;
  got = SelectSnapKv(o, q.data(), 1, w, {&head});
  EXPECT_EQ(got[0][0], 0);  // without pooling the other picks are ties, lowest first
  EXPECT_TRUE(std::binary_search(got[0].begin(), got[0].end(), 9));
}

TEST(SnapKvTest, RejectsInvalidSettings) {
  EXPECT_EQ(ValidateSnapKvOptions({.window = 32, .budget = 32}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSnapKvOptions({.window = 32, .budget = 16}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSnapKvOptions({.window = 8, .kernel = 4, .budget = 64}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSnapKvOptions({.window = 0, .budget = 64}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateSnapKvOptions({.window = 8, .kernel = 5, .budget = 9}).ok());
}

}  // namespace
}  // namespace kvmem
