// SessionManager behaviour that needs no restart: call ordering and cancellation.
#include "service/session_manager.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/cpu_backend.h"
#include "gtest/gtest.h"

namespace kvmem {
namespace {

class SessionManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = Model::Load(KVMEM_TEST_MODEL_DIR);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    backend_ = std::make_unique<CpuBackend>(*model_, CpuBackendOptions{.threads = 1});
    SessionManagerOptions options;  // in memory
    options.session_defaults.memory = {.policy = "snapkv", .budget = 64, .window = 8};
    auto m = SessionManager::Open(*model_, *backend_, options);
    ASSERT_TRUE(m.ok()) << m.status();
    manager_ = std::move(*m);
    ASSERT_TRUE(manager_->CreateSession({.session_id = "s"}).ok());
    ASSERT_TRUE(manager_->AppendTurn({.session_id = "s", .content = "Once upon a time"}).ok());
  }

  std::unique_ptr<Model> model_;
  std::unique_ptr<CpuBackend> backend_;
  std::unique_ptr<SessionManager> manager_;
};

// A generation (not kept) on session "s" that holds the session from its first text delta
// until Release().
class SessionHolder {
 public:
  explicit SessionHolder(SessionManager& manager) {
    thread_ = std::thread([this, &manager] {
      GenerateRequest g{.session_id = "s"};
      g.options.sampling = {.max_tokens = 4, .ignore_eos = true};
      g.options.keep = false;
      auto r = manager.Generate(g, [this](std::string_view) {
        std::unique_lock<std::mutex> lock(mu_);
        holding_ = true;
        cv_.notify_all();
        cv_.wait(lock, [this] { return released_; });
        return true;
      });
      EXPECT_TRUE(r.ok()) << r.status();
    });
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return holding_; });
  }
  ~SessionHolder() { Release(); }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      released_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool holding_ = false, released_ = false;
  std::thread thread_;
};

TEST_F(SessionManagerTest, CallsOnABusySessionApplyInArrivalOrder) {
  SessionHolder holder(*manager_);
  const std::vector<std::string> texts = {"one", "two", "three", "four", "five", "six"};
  std::vector<std::thread> writers;
  std::vector<int64_t> turn_of(texts.size(), -1);
  for (size_t i = 0; i < texts.size(); ++i) {
    writers.emplace_back([&, i] {
      auto r = manager_->AppendTurn({.session_id = "s", .content = texts[i]});
      EXPECT_TRUE(r.ok()) << r.status();
      if (r.ok()) turn_of[i] = r->turn_index;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(40));  // arrive one after another
  }
  holder.Release();
  for (auto& t : writers) t.join();
  // The turns were applied in the order the calls arrived: turn 0 was appended in SetUp.
  for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(turn_of[i], static_cast<int64_t>(1 + i));
  auto info = manager_->GetSession("", "s");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->stats.turns, 1 + static_cast<int64_t>(texts.size()));
}

TEST_F(SessionManagerTest, ListingDoesNotWaitForABusySession) {
  SessionHolder holder(*manager_);
  auto listing = std::async(std::launch::async, [&] { return manager_->ListSessions({}); });
  const bool answered = listing.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  holder.Release();
  ASSERT_TRUE(answered) << "ListSessions waited for the generation to end";
  auto listed = listing.get();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->sessions.size(), 1u);
  EXPECT_EQ(listed->sessions[0].stats.turns, 1);  // the last commit, before the generation
}

TEST_F(SessionManagerTest, CallCancelledWhileQueuedIsNotApplied) {
  SessionHolder holder(*manager_);
  std::atomic<bool> gone{false};
  auto queued = std::async(std::launch::async, [&] {
    AppendTurnRequest a{.session_id = "s", .content = "late"};
    a.cancelled = [&] { return gone.load(); };
    return manager_->AppendTurn(a);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  gone = true;  // the client's deadline passes while it waits
  holder.Release();
  EXPECT_EQ(queued.get().status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(manager_->GetSession("", "s")->stats.turns, 1);
}

TEST_F(SessionManagerTest, CancellationIsPolledEveryStepAndKeepsNothing) {
  std::atomic<int> polls{0};
  GenerateRequest g{.session_id = "s"};
  g.options.sampling = {.max_tokens = 50, .ignore_eos = true};
  g.options.cancelled = [&] { return ++polls > 3; };
  auto r = manager_->Generate(g, nullptr);  // no text callback at all
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generation.finish, FinishReason::kCancelled);
  // Poll 1 when the call's turn on the session comes, then one before each decode step.
  EXPECT_EQ(r->generation.tokens.size(), 2u);
  auto info = manager_->GetSession("", "s");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->stats.turns, 1);
  EXPECT_EQ(info->stats.total_tokens, r->start_position);
}

// A fork reads its parent's partial last block from cold; before it caches that copy in warm,
// the parent commits a fuller copy of the same block and another session's commit pushes the
// fuller copy out of warm. The parent must still read back every position it committed.
TEST_F(SessionManagerTest, ForkReadRacingParentCommitNeverLeavesTheParentAnOlderBlock) {
  const ModelConfig& c = model_->config();
  SessionManagerOptions options;  // in memory
  options.session_defaults.memory = {.policy = "snapkv", .budget = 64, .window = 8};
  const int64_t block_bytes = 2 * 16 * static_cast<int64_t>(c.kv_dim()) * sizeof(float);
  options.warm_bytes = c.num_layers * block_bytes;  // one commit's blocks push out the last's
  options.hot_bytes = 1;  // idle sessions are paged out: every call restores from the blocks
  SessionManager* manager = nullptr;
  bool armed = false;
  int fired = 0;
  BlockKey raced;
  absl::StatusOr<AppendResult> parent_turn = absl::UnknownError("not run");
  absl::StatusOr<AppendResult> other_turn = absl::UnknownError("not run");
  options.after_cold_block_read = [&](const BlockKey& key) {
    if (!armed) return;
    armed = false;
    ++fired;
    raced = key;
    // The fork holds the parent's older copy of `key`, not yet offered to warm.
    parent_turn = manager->AppendTurn({.session_id = "parent", .content = "He saw a cat."});
    other_turn = manager->AppendTurn({.session_id = "other", .content = "The sun was warm."});
  };
  auto opened = SessionManager::Open(*model_, *backend_, options);
  ASSERT_TRUE(opened.ok()) << opened.status();
  manager = opened->get();

  ASSERT_TRUE(manager->CreateSession({.session_id = "parent"}).ok());
  auto first = manager->AppendTurn({.session_id = "parent", .content = "Once upon a time"});
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_NE(first->total_tokens % 16, 0) << "the parent's last block must be partial";
  ASSERT_TRUE(manager->CreateSession({.session_id = "other"}).ok());
  ASSERT_TRUE(manager->AppendTurn({.session_id = "other", .content = "The sun was warm."}).ok());
  ASSERT_TRUE(manager->ForkSession("", "parent", "fork").ok());

  armed = true;  // the fork's restore reads the parent's last block of layer 0 from cold
  auto fork = manager->GetSession("", "fork");
  ASSERT_TRUE(fork.ok()) << fork.status();
  ASSERT_EQ(fired, 1);
  EXPECT_EQ(raced.layer, 0);
  EXPECT_EQ(raced.index, 0);
  ASSERT_TRUE(parent_turn.ok()) << parent_turn.status();
  ASSERT_TRUE(other_turn.ok()) << other_turn.status();
  ASSERT_LT(parent_turn->total_tokens, 16) << "the commit must rewrite the same partial block";

  auto parent = manager->GetSession("", "parent");  // restores from the blocks
  ASSERT_TRUE(parent.ok()) << parent.status();
  EXPECT_EQ(parent->stats.total_tokens, parent_turn->total_tokens);
  auto next = manager->AppendTurn({.session_id = "parent", .content = "The end."});
  EXPECT_TRUE(next.ok()) << next.status();
  auto fork_next = manager->AppendTurn({.session_id = "fork", .content = "A dog ran."});
  EXPECT_TRUE(fork_next.ok()) << fork_next.status();
}

}  // namespace
}  // namespace kvmem
