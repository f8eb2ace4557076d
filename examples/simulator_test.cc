// The simulator's metrics where the answer is known: hand-built logits and keys, a budget that
// covers everything (nothing may differ from full), and a window too short for a fact.
#include "examples/simulator.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "engine/cpu_backend.h"
#include "examples/sim_metrics.h"
#include "examples/sim_report.h"
#include "gtest/gtest.h"

namespace kvmem::sim {
namespace {

// Metrics ------------------------------------------------------------------------------------

TEST(SimMetricsTest, KlIsZeroForEqualRowsAndMatchesTheFormulaOtherwise) {
  const float p[3] = {1.0f, 2.0f, 0.5f};
  EXPECT_EQ(KlDivergence(p, p, 3), 0.0);
  // Shifting every logit by a constant changes nothing.
  const float shifted[3] = {4.0f, 5.0f, 3.5f};
  EXPECT_NEAR(KlDivergence(p, shifted, 3), 0.0, 1e-12);
  const float a[2] = {0.0f, 0.0f};            // (1/2, 1/2)
  const float b[2] = {0.0f, std::log(3.0f)};  // (1/4, 3/4)
  const double expected = 0.5 * std::log(0.5 / 0.25) + 0.5 * std::log(0.5 / 0.75);
  EXPECT_NEAR(KlDivergence(a, b, 2), expected, 1e-7);
  EXPECT_GT(KlDivergence(b, a, 2), 0.0);
}

TEST(SimMetricsTest, ArgMaxTakesTheLowestIdAmongEqualsAndLogProbabilityNormalises) {
  const float logits[4] = {1.0f, 3.0f, 3.0f, -1.0f};
  EXPECT_EQ(ArgMax(logits, 4), 1);
  const float two[2] = {0.0f, std::log(3.0f)};
  EXPECT_NEAR(LogProbability(two, 2, 1), std::log(0.75), 1e-7);
}

TEST(SimMetricsTest, CoverageIsTheAttentionShareOnHotPositions) {
  // head_dim 2; the query (1, 0) scores the keys k0 = (0,0), k1 = (ln 3 * sqrt 2, 0),
  // k2 = (0, 5): weights 1/5, 3/5, 1/5 over positions 0..2 (position 3 is the turn itself).
  HeadKv full;
  const float zero[2] = {0, 0};
  const float k1[2] = {static_cast<float>(std::log(3.0) * std::sqrt(2.0)), 0};
  const float k2[2] = {0, 5};
  full.Append(0, zero, zero, 2);
  full.Append(1, k1, zero, 2);
  full.Append(2, k2, zero, 2);
  full.Append(3, zero, zero, 2);
  const float query[2] = {1, 0};  // (1 head, 1 row, 2)
  std::vector<double> a = ContextAttention(full, 3, query, 1, 1, 0, 1, 3);
  ASSERT_EQ(a.size(), 3u);
  EXPECT_NEAR(a[0], 0.2, 1e-6);
  EXPECT_NEAR(a[1], 0.6, 1e-6);
  EXPECT_NEAR(a[2], 0.2, 1e-6);
  EXPECT_NEAR(CoveredShare(a, {0, 1, 2}), 1.0, 1e-12);
  EXPECT_NEAR(CoveredShare(a, {1, 3}), 0.6, 1e-6);
  EXPECT_EQ(CoveredShare(a, {}), 0.0);
  EXPECT_TRUE(std::isnan(CoveredShare(ContextAttention(full, 0, query, 1, 1, 0, 1, 0), {0})));
  // A sliding window of 2 leaves the row at position 3 only position 2.
  std::vector<double> windowed = ContextAttention(full, 3, query, 1, 1, 0, 1, 3, 2);
  EXPECT_NEAR(windowed[2], 1.0, 1e-12);
  EXPECT_EQ(windowed[0], 0.0);
}

// Simulations on stories260K -----------------------------------------------------------------

constexpr char kFiller[] = "The sun was warm and the birds sang in the trees.";

// A session whose second turn plants a name that its last turn asks for.
Scenario FactScenario(int fillers) {
  ScenarioSession s{.name = "sue"};
  s.turns.push_back({.role = Role::kUser, .text = kFiller});
  s.turns.push_back(
      {.role = Role::kUser, .text = "There was a little cat named Sue.", .fact = "cat"});
  for (int i = 0; i < fillers; ++i) {
    s.turns.push_back({.role = i % 2 ? Role::kUser : Role::kAssistant,
                       .text = "The children played in the park all day. They ran and jumped."});
  }
  s.turns.push_back({.role = Role::kUser,
                     .text = "One day, the cat went out to play. The cat's name was",
                     .probe = Probe{"cat", "Sue"}});
  return Scenario{.name = "fact", .sessions = {s}};
}

class SimulatorTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = Model::Load(KVMEM_TEST_MODEL_DIR);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
    backend_ = new CpuBackend(*model_, {.threads = 1});
  }
  static void TearDownTestSuite() {
    delete backend_;
    delete model_;
  }

  static Model* model_;
  static CpuBackend* backend_;
};
Model* SimulatorTest::model_ = nullptr;
CpuBackend* SimulatorTest::backend_ = nullptr;

// (strategy, turn) -> metrics of session 0 at `budget`.
std::map<std::pair<std::string, int>, TurnMetrics> ByStrategyAndTurn(const SimResults& r,
                                                                     int budget) {
  std::map<std::pair<std::string, int>, TurnMetrics> out;
  for (const TurnMetrics& m : r.turns) {
    if (m.budget == budget && m.session == 0) out[{m.strategy, m.turn}] = m;
  }
  return out;
}

TEST_F(SimulatorTest, BudgetCoveringTheSessionGivesZeroKlAndFullAgreementForEveryStrategy) {
  const Scenario scenario = FactScenario(3);
  auto r = RunSimulation(*model_, *backend_, scenario, {.budgets = {512}});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->options.strategies, AllStrategies());
  const int turns = static_cast<int>(scenario.sessions[0].turns.size());
  ASSERT_EQ(r->turns.size(), AllStrategies().size() * turns);
  auto rows = ByStrategyAndTurn(*r, 512);
  for (const std::string& s : AllStrategies()) {
    for (int t = 0; t < turns; ++t) {
      const TurnMetrics& m = rows.at({s, t});
      const TurnMetrics& full = rows.at({"full", t});
      EXPECT_EQ(m.kl, 0.0) << s << " turn " << t;
      EXPECT_EQ(m.top1, 1.0) << s << " turn " << t;
      EXPECT_EQ(m.evicted, 0) << s << " turn " << t;
      EXPECT_EQ(m.hot_tokens, full.hot_tokens) << s << " turn " << t;
      if (t > 0) {
        EXPECT_NEAR(m.coverage_mean, 1.0, 1e-9) << s << " turn " << t;
      }
      if (m.probe) {
        EXPECT_EQ(m.fact_hot, 1.0) << s;
        EXPECT_EQ(m.fact_prob, full.fact_prob) << s;
        EXPECT_GT(m.fact_prob, 0.0);
      }
    }
  }
}

TEST_F(SimulatorTest, WindowDropsAFactPlantedBeforeTheWindow) {
  const Scenario scenario = FactScenario(4);
  // 16 hot entries: 4 sinks (the first turn's start) + the 12 most recent, far after the fact.
  auto r = RunSimulation(*model_, *backend_, scenario,
                         {.strategies = {"window"}, .budgets = {16, 512}, .sink_tokens = 4});
  ASSERT_TRUE(r.ok()) << r.status();
  const int probe = static_cast<int>(scenario.sessions[0].turns.size()) - 1;
  auto small = ByStrategyAndTurn(*r, 16);
  const TurnMetrics& window = small.at({"window", probe});
  const TurnMetrics& full = small.at({"full", probe});
  ASSERT_TRUE(window.probe);
  EXPECT_EQ(full.fact_hot, 1.0);
  EXPECT_EQ(window.fact_hot, 0.0);
  EXPECT_LT(window.coverage_mean, 1.0);
  EXPECT_GT(window.kl, 0.0);
  // Without the fact the model cannot copy the name: the answer loses most of its probability.
  EXPECT_LT(window.fact_prob, 0.5 * full.fact_prob)
      << "window " << window.fact_prob << " full " << full.fact_prob;
  // With room for everything the same window keeps the fact.
  EXPECT_EQ(ByStrategyAndTurn(*r, 512).at({"window", probe}).fact_hot, 1.0);
}

TEST_F(SimulatorTest, RetentionIsOneEverywhereForFullAndRecordsFacts) {
  auto r = RunSimulation(*model_, *backend_, FactScenario(2),
                         {.strategies = {"snapkv"}, .budgets = {24}});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->retention.size(), 2u);
  const RetentionMap& full = r->retention[0];
  EXPECT_EQ(full.strategy, "full");
  EXPECT_EQ(full.heads, r->num_layers * r->num_kv_heads);
  EXPECT_EQ(full.positions, r->session_tokens[0]);
  for (double share : full.share) EXPECT_EQ(share, 1.0);
  ASSERT_EQ(full.facts.size(), 1u);
  EXPECT_EQ(full.facts[0].first, full.turn_starts[1]);
  EXPECT_EQ(full.facts[0].second, full.turn_starts[2]);
  const RetentionMap& snapkv = r->retention[1];
  double kept = 0;
  for (double share : snapkv.share) {
    EXPECT_GE(share, 0.0);
    EXPECT_LE(share, 1.0);
    kept += share;
  }
  EXPECT_LT(kept, static_cast<double>(snapkv.share.size()));
}

TEST_F(SimulatorTest, BadSettingsAndOverlongSessionsAreClearErrors) {
  auto unknown = RunSimulation(*model_, *backend_, FactScenario(1), {.strategies = {"lru"}});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("unknown strategy \"lru\""), absl::string_view::npos);

  auto small = RunSimulation(*model_, *backend_, FactScenario(1),
                             {.strategies = {"snapkv"}, .budgets = {8}, .window = 8});
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("strategy snapkv at budget 8"), absl::string_view::npos)
      << small.status();

  auto long_session = RunSimulation(*model_, *backend_, FactScenario(30), {});
  EXPECT_EQ(long_session.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(long_session.status().message().find("512-token context"), absl::string_view::npos)
      << long_session.status();
}

TEST_F(SimulatorTest, ReportWritesTablesForEveryStrategyAndBudget) {
  auto r = RunSimulation(*model_, *backend_, FactScenario(2),
                         {.strategies = {"window", "h2o"}, .budgets = {24, 48}});
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string dir =
      (std::filesystem::temp_directory_path() / "kvmem-sim-report-test").string();
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(WriteReport(*r, {.out_dir = dir, .reference_budget = 48, .gnuplot = ""}).ok());
  auto read = [&](const std::string& name) {
    std::ifstream in(dir + "/" + name);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  };
  const std::string turns = read("turns.csv");
  EXPECT_EQ(std::count(turns.begin(), turns.end(), '\n'), 1 + 3 * 2 * 5);  // header + rows
  const std::string summary = read("summary.csv");
  EXPECT_EQ(std::count(summary.begin(), summary.end(), '\n'), 1 + 3 * 2);
  const std::string md = read("summary.md");
  EXPECT_NE(md.find("## Strategies at hot budget 48"), std::string::npos);
  for (const char* s : {"| full |", "| window |", "| h2o |"}) {
    EXPECT_NE(md.find(s), std::string::npos) << s;
  }
  EXPECT_NE(read("plots.gp").find("sim_retention.png"), std::string::npos);
  EXPECT_FALSE(read("retention_0.dat").empty());
  EXPECT_EQ(WriteReport(*r, {.out_dir = dir, .reference_budget = 30, .gnuplot = ""}).code(),
            absl::StatusCode::kInvalidArgument);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvmem::sim
