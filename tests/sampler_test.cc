#include "engine/sampler.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem {
namespace {

std::vector<float> Logits() { return {0.5f, 2.0f, -1.0f, 1.5f, 2.0f, 0.0f}; }

TEST(SamplerTest, GreedyPicksHighestLogitLowerIdOnTies) {
  Sampler sampler({});
  auto logits = Logits();
  EXPECT_EQ(sampler.Sample(logits.data(), 6), 1);
  logits[4] = 2.5f;
  EXPECT_EQ(sampler.Sample(logits.data(), 6), 4);
}

TEST(SamplerTest, SameSeedSameTokensOtherSeedOtherTokens) {
  auto logits = Logits();
  auto run = [&](uint64_t seed) {
    Sampler sampler({.temperature = 1.0f, .seed = seed});
    std::vector<int> out;
    for (int i = 0; i < 64; ++i) out.push_back(sampler.Sample(logits.data(), 6));
    return out;
  };
  EXPECT_EQ(run(7), run(7));
  EXPECT_NE(run(7), run(8));
}

TEST(SamplerTest, TemperatureSamplingFollowsSoftmax) {
  auto logits = Logits();
  const float temperature = 0.8f;
  Sampler sampler({.temperature = temperature, .seed = 3});
  std::map<int, int> counts;
  const int draws = 40000;
  for (int i = 0; i < draws; ++i) ++counts[sampler.Sample(logits.data(), 6)];
  double z = 0;
  for (float l : logits) z += std::exp(l / temperature);
  for (int id = 0; id < 6; ++id) {
    const double p = std::exp(logits[id] / temperature) / z;
    const double sigma = std::sqrt(p * (1 - p) / draws);
    EXPECT_NEAR(counts[id] / static_cast<double>(draws), p, 5 * sigma + 1e-4) << "token " << id;
  }
}

TEST(SamplerTest, TopKKeepsOnlyTheKMostLikely) {
  auto logits = Logits();
  Sampler sampler({.temperature = 2.0f, .top_k = 2, .seed = 5});
  std::map<int, int> counts;
  for (int i = 0; i < 2000; ++i) ++counts[sampler.Sample(logits.data(), 6)];
  EXPECT_EQ(counts.size(), 2u);
  EXPECT_GT(counts[1], 0);
  EXPECT_GT(counts[4], 0);
}

TEST(SamplerTest, TopPKeepsSmallestSetReachingTheMass) {
  // Probabilities at T=1: token 0 ~0.64, token 1 ~0.24, the rest small.
  std::vector<float> logits = {3.0f, 2.0f, 0.0f, -1.0f};
  Sampler sampler({.temperature = 1.0f, .top_p = 0.8f, .seed = 9});
  std::map<int, int> counts;
  for (int i = 0; i < 4000; ++i) ++counts[sampler.Sample(logits.data(), 4)];
  EXPECT_EQ(counts.size(), 2u);
  EXPECT_EQ(counts.count(2), 0u);
  Sampler narrow({.temperature = 1.0f, .top_p = 0.5f, .seed = 9});
  for (int i = 0; i < 100; ++i) EXPECT_EQ(narrow.Sample(logits.data(), 4), 0);
}

TEST(SamplerTest, RejectsOutOfRangeParameters) {
  EXPECT_TRUE(ValidateSamplingParams({}).ok());
  EXPECT_EQ(ValidateSamplingParams({.temperature = -1}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSamplingParams({.temperature = NAN}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSamplingParams({.top_k = -2}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSamplingParams({.top_p = 0}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSamplingParams({.top_p = 1.5f}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSamplingParams({.max_tokens = 0}).code(), absl::StatusCode::kInvalidArgument);
  SamplingParams empty_stop;
  empty_stop.stop = {""};
  EXPECT_EQ(ValidateSamplingParams(empty_stop).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(ValidateSamplingParams({.top_p = 0}).message().find("top_p"), absl::string_view::npos);
}

TEST(RngTest, UniformStaysInUnitIntervalAndIsReproducible) {
  Rng a(42), b(42);
  for (int i = 0; i < 1000; ++i) {
    const double u = a.Uniform();
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
    EXPECT_EQ(u, b.Uniform());
  }
}

}  // namespace
}  // namespace kvmem
