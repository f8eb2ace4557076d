// PlanKvSync: the bookkeeping that keeps a device copy of a KV head equal to the host's.
#include "engine/kv_sync_plan.h"

#include <algorithm>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem {
namespace {

// Applies a plan the way the CUDA backend does, to rows that are just positions.
std::vector<int64_t> Apply(const KvSyncPlan& plan, std::vector<int64_t> rows,
                           const std::vector<int64_t>& wanted) {
  const size_t m = rows.size();
  if (!plan.gather) {
    rows.resize(plan.keep);
    for (int64_t u : plan.uploads) rows.push_back(wanted[u]);
    return rows;
  }
  rows.resize(m);
  for (int64_t u : plan.uploads) rows.push_back(wanted[u]);
  std::vector<int64_t> out;
  for (int32_t s : plan.sources) out.push_back(rows.at(s));
  return out;
}

TEST(KvSyncPlanTest, SameEntriesNeedNothing) {
  const std::vector<int64_t> p = {0, 3, 4, 9};
  const KvSyncPlan plan = PlanKvSync(p, p);
  EXPECT_TRUE(plan.unchanged(4));
  EXPECT_FALSE(plan.gather);
  EXPECT_TRUE(plan.uploads.empty());
}

TEST(KvSyncPlanTest, AppendedEntriesUploadInPlace) {
  const KvSyncPlan plan = PlanKvSync({{0, 1, 2}}, {{0, 1, 2, 7, 8}});
  EXPECT_FALSE(plan.gather);
  EXPECT_EQ(plan.keep, 3);
  EXPECT_EQ(plan.uploads, (std::vector<int64_t>{3, 4}));
  EXPECT_FALSE(plan.unchanged(3));
}

TEST(KvSyncPlanTest, RollBackTruncatesWithoutUploads) {
  // Generate rolled back: the same positions come back later with different data, so the
  // copy must forget them now.
  const KvSyncPlan plan = PlanKvSync({{0, 1, 2, 3, 4}}, {{0, 1, 2}});
  EXPECT_FALSE(plan.gather);
  EXPECT_EQ(plan.keep, 3);
  EXPECT_TRUE(plan.uploads.empty());
  EXPECT_FALSE(plan.unchanged(5));
}

TEST(KvSyncPlanTest, EvictionGathersWithoutUploads) {
  const std::vector<int64_t> mirrored = {0, 1, 2, 3, 4, 5};
  const std::vector<int64_t> wanted = {0, 2, 5};
  const KvSyncPlan plan = PlanKvSync(mirrored, wanted);
  ASSERT_TRUE(plan.gather);
  EXPECT_TRUE(plan.uploads.empty());
  EXPECT_EQ(plan.sources, (std::vector<int32_t>{0, 2, 5}));
  EXPECT_EQ(Apply(plan, mirrored, wanted), wanted);
}

TEST(KvSyncPlanTest, RecallUploadsOnlyMissingEntries) {
  const std::vector<int64_t> mirrored = {0, 10, 11};
  const std::vector<int64_t> wanted = {0, 4, 5, 10, 11};
  const KvSyncPlan plan = PlanKvSync(mirrored, wanted);
  ASSERT_TRUE(plan.gather);
  EXPECT_EQ(plan.uploads, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(plan.sources, (std::vector<int32_t>{0, 3, 4, 1, 2}));
  EXPECT_EQ(Apply(plan, mirrored, wanted), wanted);
}

TEST(KvSyncPlanTest, EmptyCopyUploadsEverything) {
  const std::vector<int64_t> wanted = {2, 3, 8};
  const KvSyncPlan plan = PlanKvSync({}, wanted);
  EXPECT_FALSE(plan.gather);
  EXPECT_EQ(plan.keep, 0);
  EXPECT_EQ(plan.uploads, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(Apply(plan, {}, wanted), wanted);
}

TEST(KvSyncPlanTest, RandomEditsAlwaysReproduceTheHost) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    // Random sorted subsets of [0, 64) for the copy and for the host.
    std::vector<int64_t> mirrored, wanted;
    const int pm = rng() % 100, pw = rng() % 100;
    for (int64_t p = 0; p < 64; ++p) {
      if (static_cast<int>(rng() % 100) < pm) mirrored.push_back(p);
      if (static_cast<int>(rng() % 100) < pw) wanted.push_back(p);
    }
    const KvSyncPlan plan = PlanKvSync(mirrored, wanted);
    ASSERT_EQ(Apply(plan, mirrored, wanted), wanted) << "trial " << trial;
    // Nothing the copy holds is uploaded again.
    for (int64_t u : plan.uploads) {
      EXPECT_FALSE(std::binary_search(mirrored.begin(), mirrored.end(), wanted[u]));
    }
    if (!plan.gather) {
      EXPECT_TRUE(std::equal(mirrored.begin(), mirrored.begin() + plan.keep, wanted.begin()));
    }
  }
}

}  // namespace
}  // namespace kvmem
