// End-to-end tests of kvmemd: a real server process on loopback, driven through the C++
// client (AgentMemoryClient) with the real stories260K model.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "client/agent_memory_client.h"
#include "engine/cpu_backend.h"
#include "engine/session.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/kvmemd_process.h"
#include "tests/test_util.h"

namespace kvmem {
namespace {

using ::kvmem::testing::KvmemdProcess;
using ::kvmem::testing::TempDir;
using Clock = std::chrono::steady_clock;

std::unique_ptr<KvmemdProcess> StartServer(std::vector<std::string> args) {
  absl::StatusOr<std::unique_ptr<KvmemdProcess>> server = KvmemdProcess::Start(std::move(args));
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

ClientOptions At(const KvmemdProcess& server, const std::string& token = "") {
  return {.address = server.address(), .token = token};
}

v1::CreateSessionRequest NewSession(const std::string& id) {
  v1::CreateSessionRequest request;
  request.set_session_id(id);
  return request;
}

v1::GenerateRequest Greedy(const std::string& id, int max_tokens) {
  v1::GenerateRequest request;
  request.set_session_id(id);
  request.set_max_tokens(max_tokens);
  return request;
}

// A session with a small hot budget, so turn boundaries evict and memory policy matters.
v1::CreateSessionRequest SmallBudgetSession(const std::string& id) {
  v1::CreateSessionRequest request = NewSession(id);
  request.mutable_memory()->set_hot_budget(48);
  request.mutable_memory()->set_window(16);
  request.mutable_memory()->set_kernel(5);
  return request;
}

constexpr const char* kTurns[] = {
    "Once upon a time, there was a little dog named Max who loved to run in the park.",
    "One day, Max found a big red ball under a tree and wanted to play with it.",
    "Then the sun went down and Max went home to sleep.",
};

// --- One server shared by the tests that need no special flags ----------------------------

class ServiceE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = StartServer({"--threads", "2", "--backend-threads", "1"}).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    client_ = std::make_unique<AgentMemoryClient>(At(*server_));
  }
  static std::string UniqueId(const std::string& stem) {
    static std::atomic<int> counter{0};
    return absl::StrCat(stem, "-", counter++);
  }

  static KvmemdProcess* server_;
  std::unique_ptr<AgentMemoryClient> client_;
};
KvmemdProcess* ServiceE2eTest::server_ = nullptr;

TEST_F(ServiceE2eTest, SessionLifecycleCreateAppendStreamShowListForkDelete) {
  v1::CreateSessionRequest create = NewSession(UniqueId("life"));
  (*create.mutable_labels())["agent"] = "lifecycle";
  create.mutable_memory()->set_hot_budget(64);
  create.mutable_memory()->set_pooling(v1::POOLING_AVG);
  absl::StatusOr<v1::Session> created = client_->CreateSession(create);
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string id = created->session_id();
  EXPECT_EQ(created->memory().hot_budget(), 64);
  EXPECT_EQ(created->memory().pooling(), v1::POOLING_AVG);
  EXPECT_EQ(created->memory().policy(), "snapkv");  // the server's default
  EXPECT_EQ(created->turns(), 0);

  absl::StatusOr<v1::AppendTurnResponse> appended =
      client_->AppendTurn(id, v1::ROLE_USER, "Once upon a time");
  ASSERT_TRUE(appended.ok()) << appended.status();
  EXPECT_EQ(appended->turn_index(), 0);
  EXPECT_GT(appended->turn_tokens(), 0);
  EXPECT_EQ(appended->total_tokens(), appended->turn_tokens());

  std::vector<std::string> deltas;
  absl::StatusOr<v1::GenerateUsage> usage =
      client_->Generate(Greedy(id, 30), [&](std::string_view d) {
        deltas.emplace_back(d);
        return true;
      });
  ASSERT_TRUE(usage.ok()) << usage.status();
  EXPECT_GT(deltas.size(), 1u) << "the reply should arrive as a stream of deltas";
  std::string streamed;
  for (const std::string& d : deltas) streamed += d;
  EXPECT_EQ(streamed, usage->text());
  EXPECT_EQ(usage->text().rfind(", there was a little girl named Lily.", 0), 0u) << usage->text();
  EXPECT_EQ(usage->generated_tokens(), 30);
  EXPECT_EQ(usage->finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(usage->turn_index(), 1);

  absl::StatusOr<v1::Session> shown = client_->GetSession(id);
  ASSERT_TRUE(shown.ok()) << shown.status();
  EXPECT_EQ(shown->turns(), 2);
  EXPECT_EQ(shown->total_tokens(), appended->total_tokens() + usage->generated_tokens());
  EXPECT_EQ(shown->hot_tokens_per_head_size(), shown->num_layers() * shown->num_kv_heads());
  EXPECT_EQ(shown->num_layers(), 5);
  EXPECT_EQ(shown->num_kv_heads(), 4);
  int64_t hot = 0;
  for (int64_t h : shown->hot_tokens_per_head()) hot += h;
  EXPECT_EQ(hot, shown->hot_tokens());
  EXPECT_EQ(shown->labels().at("agent"), "lifecycle");

  absl::StatusOr<std::vector<v1::Session>> listed =
      client_->ListAllSessions({{"agent", "lifecycle"}});
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].session_id(), id);
  listed = client_->ListAllSessions({{"agent", "someone-else"}});
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty());

  absl::StatusOr<v1::Session> fork = client_->ForkSession(id, id + "-fork");
  ASSERT_TRUE(fork.ok()) << fork.status();
  EXPECT_EQ(fork->turns(), 2);
  EXPECT_EQ(fork->total_tokens(), shown->total_tokens());
  ASSERT_TRUE(client_->AppendTurn(fork->session_id(), v1::ROLE_USER, "The end.").ok());
  EXPECT_EQ(client_->GetSession(fork->session_id())->turns(), 3);
  EXPECT_EQ(client_->GetSession(id)->turns(), 2) << "the fork diverged from its parent";

  ASSERT_TRUE(client_->DeleteSession(id).ok());
  EXPECT_EQ(client_->GetSession(id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(client_->GetSession(fork->session_id()).ok()) << "deleting a parent kept its fork";
}

TEST_F(ServiceE2eTest, GreedyRepliesMatchAnInProcessSessionTokenForToken) {
  const std::string id = UniqueId("parity");
  ASSERT_TRUE(client_->CreateSession(SmallBudgetSession(id)).ok());

  auto model = Model::Load(KVMEM_TEST_MODEL_DIR);
  ASSERT_TRUE(model.ok()) << model.status();
  CpuBackend backend(**model, {.threads = 1});
  SessionOptions options;
  options.memory.budget = 48;
  options.memory.window = 16;
  options.memory.kernel = 5;
  auto local = Session::Create(**model, backend, options);
  ASSERT_TRUE(local.ok()) << local.status();

  int64_t recalled = 0;
  for (const char* turn : kTurns) {
    absl::StatusOr<v1::AppendTurnResponse> remote = client_->AppendTurn(id, v1::ROLE_USER, turn);
    ASSERT_TRUE(remote.ok()) << remote.status();
    absl::StatusOr<AppendResult> expected = (*local)->AppendTurn(Role::kUser, turn);
    ASSERT_TRUE(expected.ok());
    EXPECT_EQ(remote->total_tokens(), expected->total_tokens);
    EXPECT_EQ(remote->hot_tokens(), expected->hot_tokens);
    EXPECT_EQ(remote->evicted(), expected->evicted);
    EXPECT_EQ(remote->recalled_blocks(), expected->recalled_blocks);
    recalled += remote->recalled_blocks();

    absl::StatusOr<v1::GenerateUsage> reply = client_->Generate(Greedy(id, 24));
    ASSERT_TRUE(reply.ok()) << reply.status();
    GenerateOptions generate;
    generate.sampling.max_tokens = 24;
    absl::StatusOr<GenerateResult> want = (*local)->Generate(generate, nullptr);
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(reply->text(), want->generation.text);
  }
  EXPECT_GT(recalled, 0) << "later turns should recall blocks evicted from the small hot set";
  absl::StatusOr<v1::Session> shown = client_->GetSession(id);
  ASSERT_TRUE(shown.ok());
  const SessionStats stats = (*local)->Stats();
  EXPECT_EQ(shown->total_tokens(), stats.total_tokens);
  EXPECT_EQ(std::vector<int64_t>(shown->hot_tokens_per_head().begin(),
                                 shown->hot_tokens_per_head().end()),
            stats.hot_tokens_per_head);
}

TEST_F(ServiceE2eTest, RetriedRequestWithTheSameIdIsAppliedOnce) {
  const std::string id = UniqueId("retry");
  ASSERT_TRUE(client_->CreateSession(NewSession(id)).ok());
  v1::AppendTurnRequest append;
  append.set_session_id(id);
  append.set_role(v1::ROLE_USER);
  append.set_content("Once upon a time");
  append.set_request_id("append-1");
  absl::StatusOr<v1::AppendTurnResponse> first = client_->AppendTurn(append);
  absl::StatusOr<v1::AppendTurnResponse> retry = client_->AppendTurn(append);
  ASSERT_TRUE(first.ok() && retry.ok()) << first.status() << retry.status();
  EXPECT_EQ(retry->turn_index(), first->turn_index());
  EXPECT_EQ(retry->total_tokens(), first->total_tokens());
  EXPECT_EQ(client_->GetSession(id)->turns(), 1);

  v1::GenerateRequest generate = Greedy(id, 12);
  generate.set_request_id("generate-1");
  std::string streamed_retry;
  absl::StatusOr<v1::GenerateUsage> g1 = client_->Generate(generate);
  absl::StatusOr<v1::GenerateUsage> g2 = client_->Generate(generate, [&](std::string_view d) {
    streamed_retry += d;
    return true;
  });
  ASSERT_TRUE(g1.ok() && g2.ok()) << g1.status() << g2.status();
  EXPECT_EQ(g2->text(), g1->text());
  EXPECT_EQ(streamed_retry, g1->text()) << "a retry streams the remembered reply";
  EXPECT_EQ(g2->turn_index(), g1->turn_index());
  EXPECT_EQ(client_->GetSession(id)->turns(), 2);

  append.set_request_id("append-2");
  absl::StatusOr<v1::AppendTurnResponse> next = client_->AppendTurn(append);
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->turn_index(), 2);
}

TEST_F(ServiceE2eTest, ExpectedTurnsConflictIsFailedPreconditionAndChangesNothing) {
  const std::string id = UniqueId("occ");
  ASSERT_TRUE(client_->CreateSession(NewSession(id)).ok());
  ASSERT_TRUE(client_->AppendTurn(id, v1::ROLE_SYSTEM, "You tell stories.").ok());
  // Two writers read the session at one turn; both append expecting one turn.
  v1::AppendTurnRequest a;
  a.set_session_id(id);
  a.set_role(v1::ROLE_USER);
  a.set_content("Tell me about a cat.");
  a.set_expected_turns(1);
  v1::AppendTurnRequest b = a;
  b.set_content("Tell me about a dog.");
  ASSERT_TRUE(client_->AppendTurn(a).ok());
  absl::StatusOr<v1::AppendTurnResponse> loser = client_->AppendTurn(b);
  EXPECT_EQ(loser.status().code(), absl::StatusCode::kFailedPrecondition) << loser.status();
  EXPECT_NE(loser.status().message().find("2 turns"), std::string::npos) << loser.status();
  const int64_t tokens = client_->GetSession(id)->total_tokens();
  v1::GenerateRequest stale = Greedy(id, 5);
  stale.set_expected_turns(1);
  EXPECT_EQ(client_->Generate(stale).status().code(), absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<v1::Session> after = client_->GetSession(id);
  EXPECT_EQ(after->turns(), 2);
  EXPECT_EQ(after->total_tokens(), tokens);
}

TEST_F(ServiceE2eTest, ConcurrentAppendsOnOneSessionWaitTheirTurn) {
  const std::string id = UniqueId("busy");
  ASSERT_TRUE(client_->CreateSession(NewSession(id)).ok());
  constexpr int kWriters = 8;
  std::vector<int64_t> indices(kWriters, -1);
  std::vector<std::thread> writers;
  for (int i = 0; i < kWriters; ++i) {
    writers.emplace_back([&, i] {
      AgentMemoryClient client(At(*server_));
      absl::StatusOr<v1::AppendTurnResponse> r =
          client.AppendTurn(id, v1::ROLE_USER, absl::StrCat("Writer ", i, " says hello."));
      EXPECT_TRUE(r.ok()) << r.status();
      if (r.ok()) indices[i] = r->turn_index();
    });
  }
  for (std::thread& t : writers) t.join();
  std::sort(indices.begin(), indices.end());
  for (int i = 0; i < kWriters; ++i) EXPECT_EQ(indices[i], i);
  EXPECT_EQ(client_->GetSession(id)->turns(), kWriters);
}

// A generation long enough (ignore_eos, 100k tokens: minutes of decoding) that only a prompt
// stop lets the next call on the session through within its 20 s deadline.
v1::GenerateRequest EndlessGeneration(const std::string& id) {
  v1::GenerateRequest request = Greedy(id, 100000);
  request.set_ignore_eos(true);
  return request;
}

TEST_F(ServiceE2eTest, CancelledGenerationStopsPromptlyAndKeepsNothing) {
  const std::string id = UniqueId("cancel");
  ASSERT_TRUE(client_->CreateSession(NewSession(id)).ok());
  ASSERT_TRUE(client_->AppendTurn(id, v1::ROLE_USER, "Once upon a time").ok());
  v1::GenerateRequest control = Greedy(id, 20);
  control.set_discard(true);
  absl::StatusOr<v1::GenerateUsage> before = client_->Generate(control);
  ASSERT_TRUE(before.ok());
  const v1::Session session_before = *client_->GetSession(id);

  int deltas = 0;
  absl::StatusOr<v1::GenerateUsage> cancelled =
      client_->Generate(EndlessGeneration(id), [&](std::string_view) { return ++deltas < 3; });
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled) << cancelled.status();

  // GetSession waits for the session's current call: it returns only once decoding stopped.
  AgentMemoryClient bounded({.address = server_->address(), .timeout_ms = 20000});
  const Clock::time_point start = Clock::now();
  absl::StatusOr<v1::Session> after = bounded.GetSession(id);
  ASSERT_TRUE(after.ok()) << after.status() << " (decoding did not stop after the cancel)";
  std::printf("GetSession after cancel answered in %.1f ms\n",
              std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  EXPECT_EQ(after->turns(), session_before.turns());
  EXPECT_EQ(after->total_tokens(), session_before.total_tokens());
  EXPECT_EQ(after->hot_tokens(), session_before.hot_tokens());
  absl::StatusOr<v1::GenerateUsage> again = client_->Generate(control);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->text(), before->text()) << "the cancelled generation left state behind";
}

TEST_F(ServiceE2eTest, ExpiredDeadlineStopsDecodingAndKeepsNothing) {
  const std::string id = UniqueId("deadline");
  ASSERT_TRUE(client_->CreateSession(NewSession(id)).ok());
  ASSERT_TRUE(client_->AppendTurn(id, v1::ROLE_USER, "Once upon a time").ok());
  const v1::Session session_before = *client_->GetSession(id);

  AgentMemoryClient hasty({.address = server_->address(), .timeout_ms = 300});
  absl::StatusOr<v1::GenerateUsage> r = hasty.Generate(EndlessGeneration(id));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();

  AgentMemoryClient bounded({.address = server_->address(), .timeout_ms = 20000});
  absl::StatusOr<v1::Session> after = bounded.GetSession(id);
  ASSERT_TRUE(after.ok()) << after.status() << " (decoding did not stop at the deadline)";
  EXPECT_EQ(after->turns(), session_before.turns());
  EXPECT_EQ(after->total_tokens(), session_before.total_tokens());
}

TEST_F(ServiceE2eTest, HealthAndReflectionAreServed) {
  EXPECT_TRUE(client_->CheckHealth().ok());

  auto reflection = grpc::reflection::v1alpha::ServerReflection::NewStub(client_->channel());
  grpc::ClientContext context;
  auto stream = reflection->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest list;
  list.set_list_services("");
  grpc::reflection::v1alpha::ServerReflectionRequest file;
  file.set_file_containing_symbol("kvmem.v1.AgentMemory");
  ASSERT_TRUE(stream->Write(list));
  ASSERT_TRUE(stream->Write(file));
  stream->WritesDone();
  std::set<std::string> services;
  int descriptors = 0;
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  while (stream->Read(&response)) {
    for (const auto& s : response.list_services_response().service()) services.insert(s.name());
    descriptors += response.file_descriptor_response().file_descriptor_proto_size();
  }
  ASSERT_TRUE(stream->Finish().ok());
  EXPECT_TRUE(services.count("kvmem.v1.AgentMemory")) << "services listed: " << services.size();
  EXPECT_TRUE(services.count("grpc.health.v1.Health"));
  EXPECT_GE(descriptors, 1) << "reflection should describe kvmem.v1.AgentMemory";
}

// --- Bad requests: each with the status code a client can act on --------------------------

TEST(ServiceErrorsTest, BadRequestsFailWithTheirStatusCodes) {
  std::unique_ptr<KvmemdProcess> server =
      StartServer({"--threads", "2", "--max-content-bytes", "2048", "--max-turn-tokens", "64",
                   "--max-session-tokens", "200"});
  ASSERT_NE(server, nullptr);
  AgentMemoryClient client(At(*server));
  ASSERT_TRUE(client.CreateSession(NewSession("taken")).ok());
  ASSERT_TRUE(client.AppendTurn("taken", v1::ROLE_USER, "Once upon a time").ok());
  ASSERT_TRUE(client.CreateSession(NewSession("empty")).ok());  // a fork source

  auto append = [&](std::string id, int role, std::string content) {
    v1::AppendTurnRequest r;
    r.set_session_id(id);
    r.set_role(static_cast<v1::Role>(role));
    r.set_content(content);
    return client.AppendTurn(r).status();
  };
  auto generate = [&](std::function<void(v1::GenerateRequest*)> edit) {
    v1::GenerateRequest r = Greedy("taken", 4);
    r.set_discard(true);
    edit(&r);
    return client.Generate(r).status();
  };
  auto create = [&](std::function<void(v1::CreateSessionRequest*)> edit) {
    v1::CreateSessionRequest r;
    edit(&r);
    return client.CreateSession(r).status();
  };
  std::string long_turn;
  while (long_turn.size() < 1500) long_turn += "the dog ran ";

  struct Case {
    const char* what;
    std::function<absl::Status()> call;
    absl::StatusCode code;
  };
  const std::vector<Case> cases = {
      {"get unknown session", [&] { return client.GetSession("nobody").status(); },
       absl::StatusCode::kNotFound},
      {"get without an id", [&] { return client.GetSession("").status(); },
       absl::StatusCode::kInvalidArgument},
      {"append to unknown session", [&] { return append("nobody", v1::ROLE_USER, "hi"); },
       absl::StatusCode::kNotFound},
      {"append empty content", [&] { return append("taken", v1::ROLE_USER, ""); },
       absl::StatusCode::kInvalidArgument},
      {"append oversized content",
       [&] { return append("taken", v1::ROLE_USER, std::string(3000, 'a')); },
       absl::StatusCode::kInvalidArgument},
      {"append unspecified role", [&] { return append("taken", v1::ROLE_UNSPECIFIED, "hi"); },
       absl::StatusCode::kInvalidArgument},
      {"append unknown role number", [&] { return append("taken", 42, "hi"); },
       absl::StatusCode::kInvalidArgument},
      {"append turn over max-turn-tokens",
       [&] { return append("taken", v1::ROLE_USER, long_turn); },
       absl::StatusCode::kResourceExhausted},
      {"generate negative temperature",
       [&] { return generate([](auto* r) { r->set_temperature(-1); }); },
       absl::StatusCode::kInvalidArgument},
      {"generate top_p above 1", [&] { return generate([](auto* r) { r->set_top_p(2); }); },
       absl::StatusCode::kInvalidArgument},
      {"generate negative top_k", [&] { return generate([](auto* r) { r->set_top_k(-1); }); },
       absl::StatusCode::kInvalidArgument},
      {"generate negative max_tokens",
       [&] { return generate([](auto* r) { r->set_max_tokens(-5); }); },
       absl::StatusCode::kInvalidArgument},
      {"generate empty stop string", [&] { return generate([](auto* r) { r->add_stop(""); }); },
       absl::StatusCode::kInvalidArgument},
      {"generate unknown session",
       [&] { return generate([](auto* r) { r->set_session_id("nobody"); }); },
       absl::StatusCode::kNotFound},
      {"generate with stale expected_turns",
       [&] { return generate([](auto* r) { r->set_expected_turns(0); }); },
       absl::StatusCode::kFailedPrecondition},
      {"append with stale expected_turns",
       [&] {
         v1::AppendTurnRequest r;
         r.set_session_id("taken");
         r.set_role(v1::ROLE_USER);
         r.set_content("hi");
         r.set_expected_turns(5);
         return client.AppendTurn(r).status();
       },
       absl::StatusCode::kFailedPrecondition},
      {"generate past max-session-tokens",
       [&] { return generate([](auto* r) { r->set_max_tokens(500); }); },
       absl::StatusCode::kResourceExhausted},
      {"create unknown policy",
       [&] { return create([](auto* r) { r->mutable_memory()->set_policy("lru"); }); },
       absl::StatusCode::kInvalidArgument},
      {"create even pooling kernel",
       [&] { return create([](auto* r) { r->mutable_memory()->set_kernel(4); }); },
       absl::StatusCode::kInvalidArgument},
      {"create budget not above window",
       [&] {
         return create([](auto* r) {
           r->mutable_memory()->set_hot_budget(8);
           r->mutable_memory()->set_window(16);
         });
       },
       absl::StatusCode::kInvalidArgument},
      {"create unknown pooling",
       [&] {
         return create(
             [](auto* r) { r->mutable_memory()->set_pooling(static_cast<v1::Pooling>(7)); });
       },
       absl::StatusCode::kInvalidArgument},
      {"create negative recall blocks",
       [&] { return create([](auto* r) { r->mutable_memory()->set_recall_blocks(-1); }); },
       absl::StatusCode::kInvalidArgument},
      {"create unknown chat template",
       [&] { return create([](auto* r) { r->set_chat_template("gpt9"); }); },
       absl::StatusCode::kInvalidArgument},
      {"create malformed id",
       [&] { return create([](auto* r) { r->set_session_id("has space"); }); },
       absl::StatusCode::kInvalidArgument},
      {"create taken id", [&] { return create([](auto* r) { r->set_session_id("taken"); }); },
       absl::StatusCode::kAlreadyExists},
      {"fork onto a taken id", [&] { return client.ForkSession("empty", "taken").status(); },
       absl::StatusCode::kAlreadyExists},
      {"fork unknown session", [&] { return client.ForkSession("nobody", "x").status(); },
       absl::StatusCode::kNotFound},
      {"delete unknown session", [&] { return client.DeleteSession("nobody"); },
       absl::StatusCode::kNotFound},
      {"list negative page size",
       [&] {
         v1::ListSessionsRequest r;
         r.set_page_size(-1);
         return client.ListSessions(r).status();
       },
       absl::StatusCode::kInvalidArgument},
  };
  for (const Case& c : cases) {
    absl::Status status = c.call();
    EXPECT_EQ(status.code(), c.code) << c.what << ": " << status;
    EXPECT_GE(status.message().size(), 10u) << c.what << ": the message should say what to fix";
  }
  // None of the failed calls changed the session they named.
  absl::StatusOr<v1::Session> taken = client.GetSession("taken");
  ASSERT_TRUE(taken.ok());
  EXPECT_EQ(taken->turns(), 1);
}

// --- Authentication -----------------------------------------------------------------------

TEST(ServiceAuthTest, TenantsSeeOnlyTheirOwnSessions) {
  TempDir dir;
  const std::string tokens = dir.path() + "/tokens";
  testing::WriteText(tokens,
                     "# token tenant [read-only]\n"
                     "alice-secret alice\n"
                     "bob-secret bob\n"
                     "alice-viewer alice read-only\n");
  std::unique_ptr<KvmemdProcess> server = StartServer({"--auth-tokens", tokens});
  ASSERT_NE(server, nullptr);
  AgentMemoryClient anonymous(At(*server));
  AgentMemoryClient stranger(At(*server, "guess"));
  AgentMemoryClient alice(At(*server, "alice-secret"));
  AgentMemoryClient bob(At(*server, "bob-secret"));
  AgentMemoryClient viewer(At(*server, "alice-viewer"));

  EXPECT_EQ(anonymous.CreateSession(NewSession("x")).status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(stranger.ListSessions({}).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(anonymous.CheckHealth().ok()) << "health checks need no token";

  ASSERT_TRUE(alice.CreateSession(NewSession("diary")).ok());
  ASSERT_TRUE(alice.AppendTurn("diary", v1::ROLE_USER, "Once upon a time").ok());
  EXPECT_EQ(bob.GetSession("diary").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(bob.AppendTurn("diary", v1::ROLE_USER, "mine now").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(bob.DeleteSession("diary").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(bob.ForkSession("diary", "stolen").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(bob.ListAllSessions()->empty());
  // Ids are per tenant: bob may use the same name for his own session.
  ASSERT_TRUE(bob.CreateSession(NewSession("diary")).ok());
  EXPECT_EQ(bob.GetSession("diary")->turns(), 0);
  EXPECT_EQ(alice.GetSession("diary")->turns(), 1);

  // A read-only token reads its tenant's sessions and may generate without keeping.
  EXPECT_EQ(viewer.GetSession("diary")->turns(), 1);
  EXPECT_EQ(viewer.ListAllSessions()->size(), 1u);
  EXPECT_EQ(viewer.AppendTurn("diary", v1::ROLE_USER, "edit").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(viewer.Generate(Greedy("diary", 4)).status().code(),
            absl::StatusCode::kPermissionDenied);
  v1::GenerateRequest peek = Greedy("diary", 4);
  peek.set_discard(true);
  EXPECT_TRUE(viewer.Generate(peek).ok());
  EXPECT_EQ(alice.GetSession("diary")->turns(), 1);
}

// --- Shutdown and restart -----------------------------------------------------------------

TEST(ServiceShutdownTest, SigtermCancelsInFlightCallsAfterTheGraceAndExitsZero) {
  std::unique_ptr<KvmemdProcess> server = StartServer({"--shutdown-grace-ms", "300"});
  ASSERT_NE(server, nullptr);
  AgentMemoryClient client(At(*server));
  ASSERT_TRUE(client.CreateSession(NewSession("s")).ok());
  ASSERT_TRUE(client.AppendTurn("s", v1::ROLE_USER, "Once upon a time").ok());
  std::atomic<bool> streaming{false};
  absl::Status in_flight;
  std::thread generation([&] {
    in_flight = client
                    .Generate(EndlessGeneration("s"),
                              [&](std::string_view) {
                                streaming = true;
                                return true;
                              })
                    .status();
  });
  const Clock::time_point give_up = Clock::now() + std::chrono::seconds(20);
  while (!streaming && Clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (!streaming) {
    server->Stop(SIGKILL);
    generation.join();
    FAIL() << "the generation never started streaming: " << in_flight;
  }
  const Clock::time_point start = Clock::now();
  EXPECT_EQ(server->Stop(SIGTERM), 0) << server->StderrText();
  generation.join();
  const double stop_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  EXPECT_LT(stop_ms, 15000) << "shutdown waited for decoding instead of cancelling it";
  EXPECT_FALSE(in_flight.ok());
  EXPECT_TRUE(in_flight.code() == absl::StatusCode::kCancelled ||
              in_flight.code() == absl::StatusCode::kUnavailable)
      << in_flight;
  EXPECT_EQ(client.GetSession("s").status().code(), absl::StatusCode::kUnavailable);
}

TEST(ServiceShutdownTest, SigintWithNothingInFlightExitsZero) {
  std::unique_ptr<KvmemdProcess> server = StartServer({});
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(server->Stop(SIGINT), 0) << server->StderrText();
}

// The same conversation, with or without a restart of kvmemd after every step.
struct Transcript {
  std::vector<std::string> replies;
  int64_t total_tokens = 0;
  std::vector<int64_t> hot_tokens_per_head;
};

// Runs kTurns (each followed by a greedy reply) on session "story". `between_steps` runs after
// every turn and every reply and returns the server to talk to next.
Transcript RunConversation(
    std::unique_ptr<KvmemdProcess> server,
    const std::function<std::unique_ptr<KvmemdProcess>(std::unique_ptr<KvmemdProcess>)>&
        between_steps) {
  Transcript t;
  {
    AgentMemoryClient client(At(*server));
    absl::Status s = client.CreateSession(SmallBudgetSession("story")).status();
    EXPECT_TRUE(s.ok()) << s;
  }
  for (const char* turn : kTurns) {
    server = between_steps(std::move(server));
    if (server == nullptr) return t;
    AgentMemoryClient client(At(*server));
    absl::StatusOr<v1::AppendTurnResponse> a = client.AppendTurn("story", v1::ROLE_USER, turn);
    EXPECT_TRUE(a.ok()) << a.status();
    server = between_steps(std::move(server));
    if (server == nullptr) return t;
    AgentMemoryClient again(At(*server));
    absl::StatusOr<v1::GenerateUsage> reply = again.Generate(Greedy("story", 24));
    EXPECT_TRUE(reply.ok()) << reply.status();
    t.replies.push_back(reply.ok() ? reply->text() : "");
  }
  server = between_steps(std::move(server));
  if (server == nullptr) return t;
  absl::StatusOr<v1::Session> session = AgentMemoryClient(At(*server)).GetSession("story");
  EXPECT_TRUE(session.ok()) << session.status();
  if (session.ok()) {
    t.total_tokens = session->total_tokens();
    t.hot_tokens_per_head.assign(session->hot_tokens_per_head().begin(),
                                 session->hot_tokens_per_head().end());
  }
  return t;
}

void ExpectSessionSurvivesRestarts(int signal) {
  TempDir control_dir, restarted_dir;
  const Transcript control = RunConversation(StartServer({"--data-dir", control_dir.path()}),
                                             [](std::unique_ptr<KvmemdProcess> s) { return s; });
  int restarts = 0;
  const Transcript restarted =
      RunConversation(StartServer({"--data-dir", restarted_dir.path()}),
                      [&](std::unique_ptr<KvmemdProcess> s) -> std::unique_ptr<KvmemdProcess> {
                        const int status = s->Stop(signal);
                        EXPECT_EQ(status, signal == SIGKILL ? 128 + SIGKILL : 0) << s->StderrText();
                        ++restarts;
                        return StartServer({"--data-dir", restarted_dir.path()});
                      });
  EXPECT_EQ(restarts, 7);
  ASSERT_EQ(control.replies.size(), std::size(kTurns));
  EXPECT_EQ(restarted.replies, control.replies);
  EXPECT_EQ(restarted.total_tokens, control.total_tokens);
  EXPECT_EQ(restarted.hot_tokens_per_head, control.hot_tokens_per_head);
  // The budget (48 per head) was exceeded, so the restored hot sets were compressed ones.
  EXPECT_GT(control.total_tokens, 48);
}

TEST(ServiceRestartTest, SessionContinuesTokenForTokenAfterGracefulRestarts) {
  ExpectSessionSurvivesRestarts(SIGTERM);
}

TEST(ServiceRestartTest, SessionContinuesTokenForTokenAfterKill9) {
  ExpectSessionSurvivesRestarts(SIGKILL);
}

}  // namespace
}  // namespace kvmem
