// Sessions on the real stories260K model: turn bookkeeping, SnapKV at turn boundaries,
// equivalence with the uncompressed cache, and what leaves hot staying retrievable.
#include "engine/session.h"

#include <algorithm>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <utility>
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

TEST_F(SessionTest, RawTemplateOpensWithOneBosAndStartsEveryTurnAsAWord) {
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

// The stories260K tokenizer plus the two chatml special pieces it lacks, at ids past its
// vocabulary; everything else is the real tokenizer.
class WithChatMlPieces : public Tokenizer {
 public:
  explicit WithChatMlPieces(const Tokenizer& base) : base_(base) {}
  bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const override {
    return base_.Encode(text, ids, error);
  }
  bool EncodeContinuation(std::string_view text, std::vector<int>* ids,
                          std::string* error) const override {
    return base_.EncodeContinuation(text, ids, error);
  }
  std::string Decode(const std::vector<int>& ids) const override { return base_.Decode(ids); }
  int vocab_size() const override { return base_.vocab_size() + 2; }
  int bos_id() const override { return base_.bos_id(); }
  int eos_id() const override { return base_.eos_id(); }
  int PieceToId(std::string_view piece) const override {
    if (piece == "<|im_start|>") return base_.vocab_size();
    if (piece == "<|im_end|>") return base_.vocab_size() + 1;
    return base_.PieceToId(piece);
  }
  const std::string& serialized_model() const override { return base_.serialized_model(); }

 private:
  const Tokenizer& base_;
};

// A formatted conversation: runs of text and special token ids.
struct Part {
  std::string text;
  int32_t token = -1;
};
Part Special(int32_t id) { return {"", id}; }

class ChatTemplateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = Model::Load(KVMEM_TEST_MODEL_DIR);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
  }
  static void TearDownTestSuite() { delete model_; }

  const Tokenizer& tok() const { return *model_->tokenizer(); }
  int32_t bos() const { return model_->config().bos_token_id; }
  int32_t eos() const { return model_->config().eos_token_ids[0]; }

  std::vector<int32_t> Encode(std::string_view text) const {
    std::vector<int> ids;
    std::string error;
    EXPECT_TRUE(tok().Encode(text, &ids, &error)) << error;
    return std::vector<int32_t>(ids.begin(), ids.end());
  }
  std::vector<int32_t> EncodeContinuation(std::string_view text) const {
    std::vector<int> ids;
    std::string error;
    EXPECT_TRUE(tok().EncodeContinuation(text, &ids, &error)) << error;
    return std::vector<int32_t>(ids.begin(), ids.end());
  }

  // The reference: the whole conversation string tokenized in one Encode call, with the
  // special tokens split out. Leading special tokens come first; the rest is encoded at once
  // with each special token written as "\x01", whose byte piece no other piece joins, and
  // that piece is then replaced by the special token's id.
  std::vector<int32_t> EncodeWhole(const std::vector<Part>& parts) const {
    const int32_t placeholder = tok().PieceToId("<0x01>");
    EXPECT_GE(placeholder, 0);
    std::vector<int32_t> out;
    size_t i = 0;
    for (; i < parts.size() && parts[i].token >= 0; ++i) out.push_back(parts[i].token);
    std::string text;
    std::vector<int32_t> specials;
    for (; i < parts.size(); ++i) {
      if (parts[i].token >= 0) {
        text += '\x01';
        specials.push_back(parts[i].token);
      } else {
        EXPECT_EQ(parts[i].text.find('\x01'), std::string::npos);
        text += parts[i].text;
      }
    }
    size_t next = 0;
    for (int32_t id : Encode(text)) {
      if (id == placeholder) {
        EXPECT_LT(next, specials.size());
        if (next < specials.size()) id = specials[next++];
      }
      out.push_back(id);
    }
    EXPECT_EQ(next, specials.size()) << "a special token's placeholder joined a piece";
    return out;
  }

  // The conversation every template test formats: a system turn, a user turn, an answer, a
  // user turn, then an (empty) generated answer opened by AssistantPrefix and closed by
  // AssistantSuffix.
  static std::vector<int32_t> EncodeConversation(const ChatTemplate& t) {
    std::vector<int32_t> out;
    auto add = [&](absl::StatusOr<std::vector<int32_t>> ids) {
      ASSERT_TRUE(ids.ok()) << ids.status();
      out.insert(out.end(), ids->begin(), ids->end());
    };
    add(t.EncodeTurn(Role::kSystem, kSystem, /*first=*/true));
    add(t.EncodeTurn(Role::kUser, kQuestion, false));
    add(t.EncodeTurn(Role::kAssistant, kAnswer, false));
    add(t.EncodeTurn(Role::kUser, kFollowUp, false));
    add(t.AssistantPrefix(false));
    add(t.AssistantSuffix());
    return out;
  }

  std::unique_ptr<ChatTemplate> MakeTemplate(std::string_view name, const Tokenizer& tokenizer) {
    auto t = ChatTemplate::Make(name, tokenizer, model_->config());
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? std::move(*t) : nullptr;
  }

  static constexpr const char* kSystem = "You are a kind storyteller.";
  static constexpr const char* kQuestion = "Tell me about a dog named Max.";
  static constexpr const char* kAnswer = "Max was a happy dog.\nHe loved to play.";
  static constexpr const char* kFollowUp = "What did he play with?";

  static Model* model_;
};
Model* ChatTemplateTest::model_ = nullptr;

TEST_F(ChatTemplateTest, ContinuationEqualsTheTextFollowingOtherTextInOneEncode) {
  const std::pair<const char*, const char*> cases[] = {
      {"Once upon a time", " there was a dog"},
      {"Once upon a time", "  there was a dog"},  // spaces collapse as inside a string
      {"The dog sat down.", "\nThen he ran."},
      {"He was sad", "."},
      {"<|user", "|>\nhi"},
      {"Max said", "\xE2\x80\x9CHi!\xE2\x80\x9D"},
      {"Lily saw a", "\xEE\x80\x80 bird"},  // text opening with the first sentinel
  };
  for (const auto& [before, text] : cases) {
    SCOPED_TRACE(std::string(before) + "|" + text);
    const std::vector<int32_t> head = Encode(before);
    const std::vector<int32_t> whole = Encode(std::string(before) + text);
    // The split must fall on a piece boundary for "the ids of text" to be defined.
    ASSERT_GE(whole.size(), head.size());
    ASSERT_TRUE(std::equal(head.begin(), head.end(), whole.begin()));
    EXPECT_EQ(EncodeContinuation(text),
              std::vector<int32_t>(whole.begin() + head.size(), whole.end()));
  }
}

TEST_F(ChatTemplateTest, ContinuationHasNoDummyPrefixWhereAFreshStringHasOne) {
  const int32_t space = tok().PieceToId("\xE2\x96\x81");  // "▁"
  const int32_t newline = tok().PieceToId("<0x0A>");
  ASSERT_GE(space, 0);
  ASSERT_GE(newline, 0);
  EXPECT_EQ(Encode("\n"), (std::vector<int32_t>{space, newline}));
  EXPECT_EQ(EncodeContinuation("\n"), std::vector<int32_t>{newline});
  EXPECT_EQ(EncodeContinuation(" day"), Encode("day"));
  EXPECT_NE(EncodeContinuation("day"), Encode("day"));
  EXPECT_TRUE(EncodeContinuation("").empty());
}

TEST_F(ChatTemplateTest, RawConversationEqualsTheWholeStringEncodedAtOnce) {
  auto t = MakeTemplate("raw", tok());
  ASSERT_NE(t, nullptr);
  const std::string text = std::string(kSystem) + " " + kQuestion + " " + kAnswer + " " + kFollowUp;
  EXPECT_EQ(EncodeConversation(*t), EncodeWhole({Special(bos()), {text}}));
}

TEST_F(ChatTemplateTest, Llama2ConversationEqualsTheWholeStringEncodedAtOnce) {
  auto t = MakeTemplate("llama2", tok());
  ASSERT_NE(t, nullptr);
  const std::vector<int32_t> ids = EncodeConversation(*t);
  EXPECT_EQ(ids, EncodeWhole({Special(bos()),
                              {std::string("[INST] <<SYS>>\n") + kSystem + "\n<</SYS>> [/INST]"},
                              Special(bos()),
                              {std::string(" [INST] ") + kQuestion + " [/INST] " + kAnswer},
                              Special(eos()),
                              Special(bos()),
                              {std::string(" [INST] ") + kFollowUp + " [/INST]"},
                              Special(eos())}));
  // Every instruction starts a word, as when each dialog round is encoded as a fresh string.
  const std::vector<int32_t> inst = Encode("[INST]");
  int instructions = 0;
  for (size_t i = 0; i + 1 + inst.size() <= ids.size(); ++i) {
    instructions += ids[i] == bos() && std::equal(inst.begin(), inst.end(), ids.begin() + i + 1);
  }
  EXPECT_EQ(instructions, 3);
  // A session that opens with an answer still opens with BOS.
  auto answer = t->EncodeTurn(Role::kAssistant, kAnswer, /*first=*/true);
  ASSERT_TRUE(answer.ok()) << answer.status();
  EXPECT_EQ(answer->front(), bos());
}

TEST_F(ChatTemplateTest, ZephyrConversationEqualsTheWholeStringEncodedAtOnce) {
  auto t = MakeTemplate("zephyr", tok());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(EncodeConversation(*t), EncodeWhole({Special(bos()),
                                                 {std::string("<|system|>\n") + kSystem},
                                                 Special(eos()),
                                                 {std::string("\n<|user|>\n") + kQuestion},
                                                 Special(eos()),
                                                 {std::string("\n<|assistant|>\n") + kAnswer},
                                                 Special(eos()),
                                                 {std::string("\n<|user|>\n") + kFollowUp},
                                                 Special(eos()),
                                                 {"\n<|assistant|>\n"},
                                                 Special(eos()),
                                                 {"\n"}}));
}

TEST_F(ChatTemplateTest, ChatMlConversationEqualsTheWholeStringEncodedAtOnce) {
  WithChatMlPieces tokenizer(tok());
  auto t = MakeTemplate("chatml", tokenizer);
  ASSERT_NE(t, nullptr);
  const Part start = Special(tokenizer.PieceToId("<|im_start|>"));
  const Part end = Special(tokenizer.PieceToId("<|im_end|>"));
  EXPECT_EQ(EncodeConversation(*t), EncodeWhole({start, {std::string("system\n") + kSystem},
                                                 end,   {"\n"},
                                                 start, {std::string("user\n") + kQuestion},
                                                 end,   {"\n"},
                                                 start, {std::string("assistant\n") + kAnswer},
                                                 end,   {"\n"},
                                                 start, {std::string("user\n") + kFollowUp},
                                                 end,   {"\n"},
                                                 start, {"assistant\n"},
                                                 end,   {"\n"}}));
}

TEST_F(ChatTemplateTest, SessionTurnsEqualTheWholeStringEncodedAtOnce) {
  CpuBackend backend(*model_, {.threads = 1});
  auto s =
      Session::Create(*model_, backend, {.chat_template = "zephyr", .memory = {.policy = "full"}});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->AppendTurn(Role::kUser, kQuestion).ok());
  ASSERT_TRUE((*s)->AppendTurn(Role::kUser, kFollowUp).ok());
  std::vector<int32_t> ids;
  for (const auto& turn : (*s)->turns()) {
    ids.insert(ids.end(), turn.tokens.begin(), turn.tokens.end());
  }
  EXPECT_EQ(ids, EncodeWhole({Special(bos()),
                              {std::string("<|user|>\n") + kQuestion},
                              Special(eos()),
                              {std::string("\n<|user|>\n") + kFollowUp},
                              Special(eos()),
                              {"\n"}}));
}

}  // namespace
}  // namespace kvmem
