// Load test of kvmemd: 32 concurrent clients, 10 rounds each (a user turn and a streamed
// reply), against one real server on loopback. No call may fail, no turn may be lost, every
// session's numbers must add up; prints p50/p99 latency per RPC.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "client/agent_memory_client.h"
#include "gtest/gtest.h"
#include "tests/kvmemd_process.h"
#include "tests/test_util.h"

namespace kvmem {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kClients = 32;
constexpr int kRounds = 10;
constexpr int kReplyTokens = 8;

// Latencies of every call, per RPC name.
class LatencyLog {
 public:
  void Add(const std::string& rpc, Clock::time_point start) {
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    std::lock_guard<std::mutex> lock(mu_);
    samples_[rpc].push_back(ms);
  }
  size_t count(const std::string& rpc) {
    std::lock_guard<std::mutex> lock(mu_);
    return samples_[rpc].size();
  }
  void Print() {
    std::lock_guard<std::mutex> lock(mu_);
    std::printf("%-14s %7s %9s %9s %9s\n", "rpc", "calls", "p50_ms", "p99_ms", "max_ms");
    for (auto& [rpc, ms] : samples_) {
      std::sort(ms.begin(), ms.end());
      auto at = [&](double q) { return ms[std::min(ms.size() - 1, size_t(q * ms.size()))]; };
      std::printf("%-14s %7zu %9.2f %9.2f %9.2f\n", rpc.c_str(), ms.size(), at(0.50), at(0.99),
                  ms.back());
    }
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::vector<double>> samples_;
};

// What one client saw of its own session.
struct ClientLedger {
  int64_t appended_tokens = 0;
  int64_t generated_tokens = 0;
  int64_t last_total_tokens = 0;
  int turns = 0;
  std::vector<std::string> errors;
};

void RunClient(const std::string& address, int index, LatencyLog* log, ClientLedger* ledger) {
  AgentMemoryClient client({.address = address, .timeout_ms = 120000});
  const std::string id = absl::StrCat("load-", index);
  auto fail = [&](const std::string& what, const absl::Status& s) {
    ledger->errors.push_back(absl::StrCat(id, " ", what, ": ", s.ToString()));
  };
  v1::CreateSessionRequest create;
  create.set_session_id(id);
  create.mutable_memory()->set_hot_budget(96);
  Clock::time_point start = Clock::now();
  if (absl::Status s = client.CreateSession(create).status(); !s.ok()) return fail("create", s);
  log->Add("CreateSession", start);
  for (int round = 0; round < kRounds; ++round) {
    start = Clock::now();
    absl::StatusOr<v1::AppendTurnResponse> a = client.AppendTurn(
        id, v1::ROLE_USER, absl::StrCat("Client ", index, " asks question number ", round, "."));
    if (!a.ok()) return fail("append", a.status());
    log->Add("AppendTurn", start);
    ledger->appended_tokens += a->turn_tokens();
    if (a->turn_index() != ledger->turns) {
      ledger->errors.push_back(
          absl::StrCat(id, " turn index ", a->turn_index(), " expected ", ledger->turns));
    }
    ++ledger->turns;

    v1::GenerateRequest g;
    g.set_session_id(id);
    g.set_max_tokens(kReplyTokens);
    g.set_temperature(0.8f);
    g.set_seed(index * 100 + round);
    g.set_ignore_eos(true);
    std::string streamed;
    start = Clock::now();
    absl::StatusOr<v1::GenerateUsage> u = client.Generate(g, [&](std::string_view d) {
      streamed += d;
      return true;
    });
    if (!u.ok()) return fail("generate", u.status());
    log->Add("Generate", start);
    if (streamed != u->text()) ledger->errors.push_back(id + " streamed text differs");
    ledger->generated_tokens += u->generated_tokens();
    ++ledger->turns;
  }
  start = Clock::now();
  absl::StatusOr<v1::Session> session = client.GetSession(id);
  if (!session.ok()) return fail("get", session.status());
  log->Add("GetSession", start);
  ledger->last_total_tokens = session->total_tokens();
  if (session->turns() != ledger->turns) {
    ledger->errors.push_back(
        absl::StrCat(id, " has ", session->turns(), " turns, the client made ", ledger->turns));
  }
}

TEST(ServiceLoadTest, ConcurrentClientsLoseNoTurnsAndTheirStatsAddUp) {
  // Durable, as in production: every turn is committed to RocksDB (fsync) before it returns.
  testing::TempDir data;
  absl::StatusOr<std::unique_ptr<testing::KvmemdProcess>> server =
      testing::KvmemdProcess::Start({"--backend-threads", "1", "--data-dir", data.path()});
  ASSERT_TRUE(server.ok()) << server.status();
  LatencyLog log;
  std::vector<ClientLedger> ledgers(kClients);
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back(RunClient, (*server)->address(), i, &log, &ledgers[i]);
  }
  for (std::thread& t : clients) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  int64_t turns = 0;
  for (const ClientLedger& l : ledgers) {
    for (const std::string& e : l.errors) ADD_FAILURE() << e;
    EXPECT_EQ(l.turns, 2 * kRounds);
    // With the raw template a session's tokens are exactly its turns' tokens.
    EXPECT_EQ(l.last_total_tokens, l.appended_tokens + l.generated_tokens);
    EXPECT_EQ(l.generated_tokens, kRounds * kReplyTokens);
    turns += l.turns;
  }
  EXPECT_EQ(log.count("AppendTurn"), size_t{kClients * kRounds});
  EXPECT_EQ(log.count("Generate"), size_t{kClients * kRounds});
  absl::StatusOr<std::vector<v1::Session>> all =
      AgentMemoryClient({.address = (*server)->address()}).ListAllSessions();
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), size_t{kClients});
  std::printf("%d clients x %d rounds: %lld turns in %.2f s (%.1f turns/s)\n", kClients, kRounds,
              static_cast<long long>(turns), seconds, turns / seconds);
  log.Print();
  EXPECT_EQ((*server)->Stop(SIGTERM), 0) << (*server)->StderrText();
}

}  // namespace
}  // namespace kvmem
