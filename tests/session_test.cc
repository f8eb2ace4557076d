// Sessions on the real stories260K model: turn bookkeeping, SnapKV at turn boundaries,
// equivalence with the uncompressed cache, and what leaves hot staying retrievable.
#include "engine/session.h"

#include <algorithm>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "engine/cpu_backend.h"
#include "gtest/gtest.h"

namespace kvmem {
namespace {

const char* const kTurns[] = {
    "Once upon a time, there was a little dog named Max. Max loved to run in the big green "
    "park near his house. Every day he played with a red ball and a small cat named Tom.",
    "One day, Max lost his ball under a tree. He looked and looked, but he could not find it. "
    "He felt very sad and sat down.",
    "Then Tom the cat came by and said, Do not be sad, Max. I will help you find your ball.",
};

class SessionTest : public ::testing::Test {
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

  std::unique_ptr<Session> NewSession(MemoryOptions memory, int block_size = 16) {
    auto s = Session::Create(*model_, *backend_, {.memory = memory, .block_size = block_size});
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  // Three turns, each followed by a kept greedy generation; returns every generated token.
  std::vector<int32_t> RunConversation(Session* s) {
    std::vector<int32_t> out;
    for (const char* turn : kTurns) {
      auto a = s->AppendTurn(Role::kUser, turn);
      EXPECT_TRUE(a.ok()) << a.status();
      auto g = s->Generate({.sampling = {.max_tokens = 24}}, nullptr);
      EXPECT_TRUE(g.ok()) << g.status();
      if (g.ok()) out.insert(out.end(), g->generation.tokens.begin(), g->generation.tokens.end());
    }
    return out;
  }

  static Model* model_;
  static CpuBackend* backend_;
};
Model* SessionTest::model_ = nullptr;
CpuBackend* SessionTest::backend_ = nullptr;

TEST_F(SessionTest, SnapKvWithBudgetCoveringEverythingEqualsFullCache) {
  auto full = NewSession({.policy = "full"});
  auto snap = NewSession({.policy = "snapkv", .budget = 4096, .window = 32});
  std::vector<int32_t> a = RunConversation(full.get());
  std::vector<int32_t> b = RunConversation(snap.get());
  ASSERT_EQ(a.size(), 72u);
  EXPECT_EQ(a, b);
  EXPECT_EQ(full->Stats().hot_tokens, snap->Stats().hot_tokens);
}

TEST_F(SessionTest, SmallBudgetChangesTheOutput) {
  auto full = NewSession({.policy = "full"});
  auto snap = NewSession({.policy = "snapkv", .budget = 24, .window = 8, .kernel = 3});
  EXPECT_NE(RunConversation(full.get()), RunConversation(snap.get()));
}

TEST_F(SessionTest, EveryHeadHoldsExactlyTheBudgetWithWindowAndIncreasingPositions) {
  const int budget = 40, window = 8;
  auto s = NewSession({.policy = "snapkv", .budget = budget, .window = window, .kernel = 5});
  const ModelConfig& c = model_->config();
  int64_t expected_position = 0;
  for (const char* turn : kTurns) {
    auto r = s->AppendTurn(Role::kUser, turn);
    ASSERT_TRUE(r.ok()) << r.status();
    const TurnRecord& record = s->turns().back();
    // New tokens continue at the absolute position, never at the compressed length.
    EXPECT_EQ(record.first_position, expected_position);
    expected_position += static_cast<int64_t>(record.tokens.size());
    EXPECT_EQ(s->position(), expected_position);
    EXPECT_EQ(r->total_tokens, expected_position);
    EXPECT_GT(expected_position, budget);
    std::set<std::vector<int64_t>> distinct;
    for (int l = 0; l < c.num_layers; ++l) {
      for (int g = 0; g < c.num_kv_heads; ++g) {
        const HeadKv& h = s->hot().head(l, g);
        EXPECT_EQ(h.size(), budget) << "layer " << l << " head " << g;
        EXPECT_TRUE(std::is_sorted(h.positions.begin(), h.positions.end()));
        EXPECT_EQ(std::adjacent_find(h.positions.begin(), h.positions.end()), h.positions.end());
        // The observation window (the turn's last tokens) is always kept.
        for (int i = 0; i < window; ++i) {
          EXPECT_EQ(h.positions[budget - window + i], expected_position - window + i);
        }
        distinct.insert(h.positions);
      }
    }
    EXPECT_GT(distinct.size(), 1u) << "heads should keep different positions (ragged)";
  }
  SessionStats stats = s->Stats();
  EXPECT_EQ(stats.total_tokens, expected_position);
  EXPECT_EQ(stats.turns, 3);
  EXPECT_EQ(stats.hot_tokens_per_head.size(), static_cast<size_t>(c.num_layers * c.num_kv_heads));
  EXPECT_EQ(stats.hot_tokens, budget * c.num_layers * c.num_kv_heads);
  EXPECT_EQ(stats.hot_bytes, stats.hot_tokens * 2 * c.head_dim * 4);
}

TEST_F(SessionTest, EvictedPositionsStayRetrievableInBlocks) {
  const int block = 16;
  auto full = NewSession({.policy = "full"}, block);
  auto snap = NewSession({.policy = "snapkv", .budget = 24, .window = 8}, block);
  RunConversation(full.get());
  RunConversation(snap.get());
  ASSERT_EQ(full->position(), snap->position());
  const ModelConfig& c = model_->config();
  const int64_t positions = snap->position();
  EXPECT_EQ(snap->Stats().blocks, c.num_layers * ((positions + block - 1) / block));
  // Every position of the compressed session, evicted or not, reads back the K/V that the
  // uncompressed session holds hot, in the first turn where both computed the same values.
  const int64_t shared = full->turns()[0].tokens.size();
  std::vector<float> k(c.head_dim), v(c.head_dim);
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) {
      const HeadKv& ref = full->hot().head(l, g);
      for (int64_t p = 0; p < shared; ++p) {
        ASSERT_TRUE(snap->ReadPosition(l, p, g, k.data(), v.data()).ok());
        EXPECT_TRUE(std::equal(k.begin(), k.end(), &ref.keys[p * c.head_dim]));
        EXPECT_TRUE(std::equal(v.begin(), v.end(), &ref.values[p * c.head_dim]));
      }
      // And hot entries equal their block copies bit for bit.
      const HeadKv& hot = snap->hot().head(l, g);
      for (int64_t i = 0; i < hot.size(); ++i) {
        ASSERT_TRUE(snap->ReadPosition(l, hot.positions[i], g, k.data(), v.data()).ok());
        EXPECT_TRUE(std::equal(k.begin(), k.end(), &hot.keys[i * c.head_dim]));
        EXPECT_TRUE(std::equal(v.begin(), v.end(), &hot.values[i * c.head_dim]));
      }
    }
  }
  EXPECT_FALSE(snap->ReadPosition(0, positions, 0, k.data(), v.data()).ok());
}

TEST_F(SessionTest, DiscardedGenerationLeavesTheSessionUnchanged) {
  auto s = NewSession({.policy = "snapkv", .budget = 40, .window = 8});
  ASSERT_TRUE(s->AppendTurn(Role::kUser, kTurns[0]).ok());
  const int64_t position = s->position();
  const SessionStats before = s->Stats();
  auto g1 = s->Generate({.sampling = {.max_tokens = 16}, .keep = false}, nullptr);
  ASSERT_TRUE(g1.ok());
  EXPECT_EQ(g1->turn_index, -1);
  EXPECT_EQ(s->position(), position);
  EXPECT_EQ(s->turns().size(), 1u);
  EXPECT_EQ(s->Stats().hot_tokens_per_head, before.hot_tokens_per_head);
  EXPECT_EQ(s->Stats().blocks, before.blocks);
  // Generating again gives the same tokens: nothing of the first attempt remains.
  auto g2 = s->Generate({.sampling = {.max_tokens = 16}}, nullptr);
  ASSERT_TRUE(g2.ok());
  EXPECT_EQ(g1->generation.tokens, g2->generation.tokens);
  EXPECT_EQ(g2->turn_index, 1);
  EXPECT_EQ(s->turns()[1].role, Role::kAssistant);
  EXPECT_EQ(s->turns()[1].tokens, g2->generation.tokens);  // kept exactly as generated
  EXPECT_EQ(s->position(), position + 16);
}

TEST_F(SessionTest, CancelledGenerationIsNotKept) {
  auto s = NewSession({.policy = "full"});
  ASSERT_TRUE(s->AppendTurn(Role::kUser, kTurns[0]).ok());
  const int64_t position = s->position();
  int calls = 0;
  auto g = s->Generate({.sampling = {.max_tokens = 50}},
                       [&](std::string_view) { return ++calls < 2; });
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->generation.finish, FinishReason::kCancelled);
  EXPECT_EQ(s->position(), position);
  EXPECT_EQ(s->turns().size(), 1u);
}

TEST_F(SessionTest, StopStringKeepsOnlyTokensThatEnteredTheCache) {
  auto s = NewSession({.policy = "snapkv", .budget = 40, .window = 8});
  ASSERT_TRUE(s->AppendTurn(Role::kUser, "Once upon a time").ok());
  const int64_t position = s->position();
  // The very first token (",") completes the stop string: nothing was fed, nothing is kept.
  SamplingParams first{.max_tokens = 20};
  first.stop = {","};
  auto none = s->Generate({.sampling = first}, nullptr);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->generation.finish, FinishReason::kStop);
  EXPECT_EQ(none->turn_index, -1);
  EXPECT_EQ(s->position(), position);
  EXPECT_EQ(s->turns().size(), 1u);
  // A later stop: the kept turn holds exactly the tokens that advanced the position.
  SamplingParams later{.max_tokens = 40};
  later.stop = {"She"};
  auto some = s->Generate({.sampling = later}, nullptr);
  ASSERT_TRUE(some.ok()) << some.status();
  EXPECT_EQ(some->generation.finish, FinishReason::kStop);
  ASSERT_EQ(s->turns().size(), 2u);
  EXPECT_EQ(static_cast<int64_t>(s->turns()[1].tokens.size()), s->position() - position);
  EXPECT_EQ(s->turns()[1].tokens, some->generation.tokens);
  EXPECT_TRUE(s->AppendTurn(Role::kUser, "The end.").ok());
}

// A store whose commits fail on demand.
class FailingStore : public MemoryBlockStore {
 public:
  absl::Status Commit(const TurnCommit& commit) override {
    if (fail) return absl::UnavailableError("disk on fire");
    return MemoryBlockStore::Commit(commit);
  }
  bool fail = false;
};

TEST_F(SessionTest, FailedCommitBreaksTheSessionUntilRestored) {
  auto store = std::make_shared<FailingStore>();
  auto s = Session::Create(*model_, *backend_, {.memory = {.policy = "full"}}, {1, store, store});
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->AppendTurn(Role::kUser, kTurns[0]).ok());
  const SessionSnapshot committed = (*s)->Snapshot();
  store->fail = true;
  EXPECT_EQ((*s)->AppendTurn(Role::kUser, kTurns[1]).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_TRUE((*s)->broken());
  store->fail = false;
  EXPECT_EQ((*s)->AppendTurn(Role::kUser, kTurns[1]).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*s)->Generate({}, nullptr).status().code(), absl::StatusCode::kFailedPrecondition);
  // Restored from the last commit, it works again from there.
  auto restored = Session::Restore(*model_, *backend_, {.memory = {.policy = "full"}},
                                   {1, store, store}, committed);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ((*restored)->turns().size(), 1u);
  EXPECT_TRUE((*restored)->AppendTurn(Role::kUser, kTurns[1]).ok());
}

TEST_F(SessionTest, RawTemplateEncodesEachTurnOnItsOwnAfterOneBos) {
  auto s = NewSession({.policy = "full"});
  ASSERT_TRUE(s->AppendTurn(Role::kUser, "Once upon a time").ok());
  ASSERT_TRUE(s->AppendTurn(Role::kUser, "there was a dog").ok());
  std::vector<int> a, b;
  std::string error;
  ASSERT_TRUE(model_->tokenizer()->Encode("Once upon a time", &a, &error));
  ASSERT_TRUE(model_->tokenizer()->Encode("there was a dog", &b, &error));
  a.insert(a.begin(), model_->config().bos_token_id);
  EXPECT_EQ(s->turns()[0].tokens, std::vector<int32_t>(a.begin(), a.end()));
  EXPECT_EQ(s->turns()[1].tokens, std::vector<int32_t>(b.begin(), b.end()));
  EXPECT_EQ(s->turns()[1].first_position, static_cast<int64_t>(a.size()));
}

TEST_F(SessionTest, GenerationContinuesTheStoryLikeOfflineCompletion) {
  auto s = NewSession({.policy = "snapkv", .budget = 1024});
  ASSERT_TRUE(s->AppendTurn(Role::kUser, "Once upon a time").ok());
  std::string streamed;
  auto g = s->Generate({.sampling = {.max_tokens = 20}}, [&](std::string_view d) {
    streamed.append(d);
    return true;
  });
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->generation.text.rfind(", there was a little girl named Lily.", 0), 0u)
      << g->generation.text;
  EXPECT_EQ(streamed, g->generation.text);
}

TEST_F(SessionTest, WindowPolicyKeepsSinksAndRecentTokens) {
  auto s = NewSession({.policy = "window", .budget = 20, .sink_tokens = 4});
  ASSERT_TRUE(s->AppendTurn(Role::kUser, kTurns[0]).ok());
  const int64_t n = s->position();
  const HeadKv& h = s->hot().head(2, 1);
  ASSERT_EQ(h.size(), 20);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(h.positions[i], i);
  for (int i = 4; i < 20; ++i) EXPECT_EQ(h.positions[i], n - 20 + i);
}

TEST_F(SessionTest, BadInputIsRejectedAndLosesNothing) {
  auto s = NewSession({.policy = "snapkv", .budget = 64, .window = 8});
  ASSERT_TRUE(s->AppendTurn(Role::kUser, kTurns[0]).ok());
  const int64_t position = s->position();
  EXPECT_EQ(s->AppendTurn(Role::kUser, "").status().code(), absl::StatusCode::kInvalidArgument);
  std::string huge(60000, 'a');
  for (size_t i = 0; i < huge.size(); i += 2) huge[i] = ' ';
  EXPECT_EQ(s->AppendTurn(Role::kUser, huge).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s->Generate({.sampling = {.top_p = -1}}, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s->position(), position);
  EXPECT_EQ(s->turns().size(), 1u);
  EXPECT_TRUE(s->AppendTurn(Role::kUser, kTurns[1]).ok());
}

TEST_F(SessionTest, InvalidOptionsAreClearErrors) {
  auto bad = [&](SessionOptions o) { return Session::Create(*model_, *backend_, o).status(); };
  EXPECT_EQ(bad({.memory = {.policy = "lru"}}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad({.memory = {.policy = "snapkv", .budget = 32, .window = 32}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad({.memory = {.policy = "snapkv", .budget = 64, .kernel = 6}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad({.chat_template = "alpaca"}).code(), absl::StatusCode::kInvalidArgument);
  absl::Status chatml = bad({.chat_template = "chatml"});
  EXPECT_EQ(chatml.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(chatml.message().find("<|im_start|>"), absl::string_view::npos);
  EXPECT_EQ(bad({.block_size = 0}).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SessionTest, ChatTemplatesFrameTurns) {
  auto llama2 = Session::Create(*model_, *backend_, {.chat_template = "llama2",
                                                     .memory = {.policy = "full"}});
  ASSERT_TRUE(llama2.ok());
  ASSERT_TRUE((*llama2)->AppendTurn(Role::kUser, "hi").ok());
  ASSERT_TRUE((*llama2)->AppendTurn(Role::kAssistant, "hello").ok());
  const auto& t = (*llama2)->turns();
  EXPECT_EQ(t[0].tokens.front(), model_->config().bos_token_id);
  EXPECT_EQ(t[1].tokens.back(), model_->config().eos_token_ids[0]);
  auto g = (*llama2)->Generate({.sampling = {.max_tokens = 4, .ignore_eos = true}}, nullptr);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ((*llama2)->turns().back().tokens.back(), model_->config().eos_token_ids[0]);
  EXPECT_EQ((*llama2)->turns().back().tokens.size(), 5u);
}

}  // namespace
}  // namespace kvmem
