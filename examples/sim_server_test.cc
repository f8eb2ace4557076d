// kvmem-sim's server mode against a real kvmemd child process on loopback (stories260K).
#include "examples/sim_server.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "examples/sim_scenario.h"
#include "gtest/gtest.h"
#include "tests/kvmemd_process.h"

namespace kvmem::sim {
namespace {

using ::kvmem::testing::KvmemdProcess;

// A small synthetic scenario: 2 sessions of 6 turns, one fact each, well within 512 tokens.
Scenario SmallScenario() {
  absl::StatusOr<Scenario> scenario =
      GenerateScenario({.sessions = 2, .turns = 6, .facts = 1, .seed = 3});
  EXPECT_TRUE(scenario.ok()) << scenario.status();
  return *scenario;
}

// A loopback port nothing listens on (bound, then released).
int UnusedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  EXPECT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  close(fd);
  return ntohs(addr.sin_port);
}

// Runs `command` through the shell; returns its exit status and combined output.
int RunCommand(const std::string& command, std::string* output) {
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return -1;
  char buf[512];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) output->append(buf, n);
  const int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

class SimServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<KvmemdProcess>> server =
        KvmemdProcess::Start({"--threads", "2", "--backend-threads", "1"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    client_ = std::make_unique<AgentMemoryClient>(ClientOptions{.address = server_->address()});
  }

  // The sessions carrying the run label of `prefix` that still exist.
  size_t SessionsLeft(const std::string& prefix) {
    absl::StatusOr<std::vector<v1::Session>> left =
        client_->ListAllSessions({{"kvmem-sim-run", prefix}});
    EXPECT_TRUE(left.ok()) << left.status();
    return left.ok() ? left->size() : 0;
  }

  static KvmemdProcess* server_;
  std::unique_ptr<AgentMemoryClient> client_;
};
KvmemdProcess* SimServerTest::server_ = nullptr;

TEST_F(SimServerTest, BudgetCoveringEverySessionAgreesWithFullAtEveryProbe) {
  const Scenario scenario = SmallScenario();
  SimOptions options;
  options.budgets = {512};  // stories260K's whole context
  absl::StatusOr<SimResults> results = RunServerSimulation(
      *client_, server_->address(), scenario, options, {.session_prefix = "simtest-cover"});
  ASSERT_TRUE(results.ok()) << results.status();
  EXPECT_EQ(results->num_layers, 5);
  EXPECT_EQ(results->num_kv_heads, 4);
  // Every strategy either ran or was skipped with a note.
  EXPECT_EQ(results->options.strategies.size() + results->notes.size(), AllStrategies().size());
  for (const char* s : {"full", "window", "snapkv"}) {
    EXPECT_NE(std::find(results->options.strategies.begin(), results->options.strategies.end(), s),
              results->options.strategies.end())
        << s << " should run on kvmemd";
  }
  std::map<std::string, int> probes;
  for (const TurnMetrics& m : results->turns) {
    const std::string where = absl::StrCat(m.strategy, " session ", m.session, " turn ", m.turn);
    // Nothing leaves hot: every position so far is hot in every head.
    EXPECT_EQ(m.hot_per_head, static_cast<double>(m.first_position + m.turn_tokens)) << where;
    EXPECT_EQ(m.evicted, 0) << where;
    EXPECT_TRUE(std::isnan(m.kl)) << where << ": KL needs logits";
    EXPECT_TRUE(std::isnan(m.fact_prob)) << where;
    EXPECT_GT(m.cold_bytes, 0) << where;
    EXPECT_GT(m.turn_ms, 0) << where;
    EXPECT_FALSE(std::isnan(m.server_ms)) << where;
    if (!m.probe) {
      EXPECT_TRUE(std::isnan(m.top1)) << where;
      continue;
    }
    ++probes[m.strategy];
    EXPECT_EQ(m.top1, 1.0) << where << ": " << m.greedy_text;
    EXPECT_EQ(m.greedy_match, 1.0) << where << ": " << m.greedy_text;
    EXPECT_FALSE(m.greedy_text.empty()) << where;
  }
  for (const std::string& s : results->options.strategies) EXPECT_EQ(probes[s], 2) << s;
  EXPECT_EQ(SessionsLeft("simtest-cover"), 0u) << "the run must delete its sessions";
}

TEST_F(SimServerTest, SmallWindowBudgetEvictsDownToTheBudget) {
  const Scenario scenario = SmallScenario();
  SimOptions options;
  options.strategies = {"window"};
  options.budgets = {8};
  absl::StatusOr<SimResults> results = RunServerSimulation(
      *client_, server_->address(), scenario, options, {.session_prefix = "simtest-window"});
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->options.strategies, (std::vector<std::string>{"full", "window"}));
  const int heads = results->num_layers * results->num_kv_heads;
  std::map<int, int64_t> evicted, total;  // window, by session
  double agree = 0, match = 0;
  int probes = 0;
  for (const TurnMetrics& m : results->turns) {
    const int64_t seen = m.first_position + m.turn_tokens;
    const std::string where = absl::StrCat(m.strategy, " session ", m.session, " turn ", m.turn);
    if (m.strategy == "full") {
      EXPECT_EQ(m.hot_per_head, static_cast<double>(seen)) << where;
      continue;
    }
    EXPECT_EQ(m.hot_per_head, static_cast<double>(std::min<int64_t>(seen, 8))) << where;
    EXPECT_EQ(m.hot_tokens, std::min<int64_t>(seen, 8) * heads) << where;
    evicted[m.session] += m.evicted;
    total[m.session] = seen;
    if (m.probe) {
      ++probes;
      agree += m.top1;
      match += m.greedy_match;
    }
  }
  for (const auto& [s, e] : evicted) {
    EXPECT_EQ(e, (total[s] - 8) * heads) << "session " << s << ": every entry beyond the budget";
  }
  ASSERT_EQ(probes, 2);
  // With 8 entries per head the planted names are long gone: the greedy continuations of the
  // probes no longer all follow full's.
  EXPECT_LT(std::min(agree, match), probes);
  EXPECT_EQ(SessionsLeft("simtest-window"), 0u);
}

TEST_F(SimServerTest, UnreachableServerIsAClearError) {
  const std::string address = absl::StrCat("127.0.0.1:", UnusedPort());
  AgentMemoryClient client({.address = address});
  absl::StatusOr<SimResults> results =
      RunServerSimulation(client, address, SmallScenario(), SimOptions{}, {});
  ASSERT_FALSE(results.ok());
  EXPECT_EQ(results.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(results.status().message().find("cannot reach kvmemd at " + address), std::string::npos)
      << results.status();

  std::string output;
  const int rc = RunCommand(absl::StrCat(KVMEM_BIN_DIR, "/kvmem-sim --server ", address,
                                         " --synthetic --sessions 1 --turns 2 --facts 1 "
                                         "--gnuplot '' --out ",
                                         ::testing::TempDir(), "/sim-unreachable"),
                            &output);
  EXPECT_EQ(rc, 1) << output;
  EXPECT_NE(output.find("UNAVAILABLE: cannot reach kvmemd at " + address), std::string::npos)
      << output;
}

TEST_F(SimServerTest, SnapKvBudgetWithinItsWindowFailsBeforeTheServerIsAsked) {
  const std::string address = absl::StrCat("127.0.0.1:", UnusedPort());
  AgentMemoryClient client({.address = address});
  SimOptions options;
  options.strategies = {"snapkv"};
  options.budgets = {8, 64};  // 8 is not above the default window of 8
  absl::StatusOr<SimResults> results =
      RunServerSimulation(client, address, SmallScenario(), options, {});
  ASSERT_FALSE(results.ok());
  EXPECT_EQ(results.status().code(), absl::StatusCode::kInvalidArgument) << results.status();
  EXPECT_NE(results.status().message().find("strategy snapkv at budget 8"), std::string::npos)
      << results.status();
}

TEST_F(SimServerTest, CommandLineWritesTheReportWithNaForLogitMetrics) {
  const std::string out = ::testing::TempDir() + "/sim-server-report";
  std::filesystem::remove_all(out);
  const bool have_gnuplot = std::system("command -v gnuplot > /dev/null 2>&1") == 0;
  std::string output;
  const int rc = RunCommand(
      absl::StrCat(KVMEM_BIN_DIR, "/kvmem-sim --server ", server_->address(),
                   " --synthetic --sessions 1 --turns 4 --facts 1 --strategies window,snapkv "
                   "--budgets 16,512 --session-prefix simtest-cli --gnuplot '",
                   have_gnuplot ? "gnuplot" : "", "' --out ", out),
      &output);
  ASSERT_EQ(rc, 0) << output;
  std::ifstream in(out + "/summary.md");
  std::stringstream summary;
  summary << in.rdbuf();
  EXPECT_NE(summary.str().find("kvmemd at " + server_->address()), std::string::npos);
  EXPECT_NE(summary.str().find("| n/a | n/a | n/a |"), std::string::npos) << summary.str();
  for (const char* file : {"turns.csv", "summary.csv", "probes.csv", "plots.gp"}) {
    EXPECT_TRUE(std::filesystem::exists(out + "/" + file)) << file;
  }
  if (have_gnuplot) {
    EXPECT_TRUE(std::filesystem::exists(out + "/sim_vs_budget.png"));
    EXPECT_TRUE(std::filesystem::exists(out + "/sim_vs_turn.png"));
  }
  EXPECT_EQ(SessionsLeft("simtest-cli"), 0u);
}

}  // namespace
}  // namespace kvmem::sim
