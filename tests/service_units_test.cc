// Unit tests of the gRPC service's pieces that need no server: token table, flag table,
// worker pool, status mapping and request translation.
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "service/auth_tokens.h"
#include "service/grpc_status.h"
#include "service/server_flags.h"
#include "service/session_proto.h"
#include "service/worker_pool.h"

namespace kvmem {
namespace {

TEST(TokenTableTest, MapsBearerTokensToTenants) {
  absl::StatusOr<TokenTable> table = TokenTable::Parse(
      "# comment line\n"
      "\n"
      "tok-a alice   # trailing comment\n"
      "tok-b\tbob read-only\n");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->size(), 2u);
  std::string_view header = "Bearer tok-a";
  absl::StatusOr<Caller> alice = table->Authenticate(&header);
  ASSERT_TRUE(alice.ok()) << alice.status();
  EXPECT_EQ(alice->tenant, "alice");
  EXPECT_FALSE(alice->read_only);
  header = "bearer tok-b";  // the scheme is case-insensitive
  absl::StatusOr<Caller> bob = table->Authenticate(&header);
  ASSERT_TRUE(bob.ok()) << bob.status();
  EXPECT_EQ(bob->tenant, "bob");
  EXPECT_TRUE(bob->read_only);
}

TEST(TokenTableTest, RejectsMissingMalformedAndUnknownTokens) {
  absl::StatusOr<TokenTable> table = TokenTable::Parse("tok-a alice\n");
  ASSERT_TRUE(table.ok());
  EXPECT_EQ(table->Authenticate(nullptr).status().code(), absl::StatusCode::kUnauthenticated);
  for (std::string_view header : {"tok-a", "Basic tok-a", "Bearer tok-b", "Bearer "}) {
    EXPECT_EQ(table->Authenticate(&header).status().code(), absl::StatusCode::kUnauthenticated)
        << header;
  }
}

TEST(TokenTableTest, MalformedFilesNameTheLine) {
  for (const char* text : {"only-a-token\n", "a b c d\n", "tok alice\ntok bob\n", "# none\n",
                           "tok al!ce\n", "tok alice writer\n"}) {
    absl::StatusOr<TokenTable> table = TokenTable::Parse(text);
    EXPECT_EQ(table.status().code(), absl::StatusCode::kInvalidArgument) << text;
  }
  EXPECT_NE(TokenTable::Parse("ok alice\nbad\n").status().message().find("line 2"),
            std::string::npos);
  EXPECT_EQ(TokenTable::Load("/nonexistent/tokens").status().code(), absl::StatusCode::kNotFound);
}

std::vector<const char*> Argv(std::vector<const char*> args) {
  args.insert(args.begin(), "kvmemd");
  return args;
}

TEST(KvmemdFlagsTest, EveryFlagSetsItsField) {
  std::vector<const char*> argv = Argv({"--model",
                                        "/m",
                                        "--data-dir=/d",
                                        "--listen",
                                        "0.0.0.0:1",
                                        "--threads",
                                        "3",
                                        "--backend-threads",
                                        "2",
                                        "--auth-tokens",
                                        "/t",
                                        "--shutdown-grace-ms",
                                        "10",
                                        "--sync",
                                        "false",
                                        "--warm-bytes",
                                        "1000",
                                        "--hot-bytes",
                                        "2000",
                                        "--max-content-bytes",
                                        "99",
                                        "--max-session-tokens",
                                        "512",
                                        "--max-turn-tokens",
                                        "128",
                                        "--block-size",
                                        "32",
                                        "--chat-template",
                                        "zephyr",
                                        "--policy",
                                        "window",
                                        "--hot-budget",
                                        "256",
                                        "--window",
                                        "8",
                                        "--kernel",
                                        "3",
                                        "--pooling",
                                        "avg",
                                        "--sink-tokens",
                                        "2",
                                        "--recall-blocks",
                                        "0"});
  absl::StatusOr<KvmemdOptions> o = ParseKvmemdFlags(static_cast<int>(argv.size()), argv.data());
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->model, "/m");
  EXPECT_EQ(o->sessions.data_dir, "/d");
  EXPECT_EQ(o->listen, "0.0.0.0:1");
  EXPECT_EQ(o->threads, 3);
  EXPECT_EQ(o->backend_threads, 2);
  EXPECT_EQ(o->auth_tokens, "/t");
  EXPECT_EQ(o->shutdown_grace_ms, 10);
  EXPECT_FALSE(o->sessions.sync);
  EXPECT_EQ(o->sessions.warm_bytes, 1000);
  EXPECT_EQ(o->sessions.hot_bytes, 2000);
  EXPECT_EQ(o->sessions.max_content_bytes, 99);
  EXPECT_EQ(o->sessions.max_session_tokens, 512);
  const SessionOptions& d = o->sessions.session_defaults;
  EXPECT_EQ(d.max_turn_tokens, 128);
  EXPECT_EQ(d.block_size, 32);
  EXPECT_EQ(d.chat_template, "zephyr");
  EXPECT_EQ(d.memory.policy, "window");
  EXPECT_EQ(d.memory.budget, 256);
  EXPECT_EQ(d.memory.window, 8);
  EXPECT_EQ(d.memory.kernel, 3);
  EXPECT_EQ(d.memory.pooling, Pooling::kAvg);
  EXPECT_EQ(d.memory.sink_tokens, 2);
  EXPECT_EQ(d.recall_blocks, 0);
  // Every flag in the table appears in --help with its default.
  const std::string usage = KvmemdUsage();
  KvmemdOptions defaults;
  for (const FlagSpec& f : KvmemdFlags(&defaults)) {
    EXPECT_NE(usage.find("--" + f.name + " "), std::string::npos) << f.name;
  }
  EXPECT_NE(usage.find("[127.0.0.1:50051]"), std::string::npos);
}

TEST(KvmemdFlagsTest, BadCommandLinesAreInvalidArgumentNamingTheFlag) {
  for (std::vector<const char*> args :
       {Argv({"--threads", "many"}), Argv({"--nope", "1"}), Argv({"--model"}), Argv({"positional"}),
        Argv({"--pooling", "median"}), Argv({"--sync", "maybe"})}) {
    absl::StatusOr<KvmemdOptions> o = ParseKvmemdFlags(static_cast<int>(args.size()), args.data());
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument) << args[1];
  }
  std::vector<const char*> argv = Argv({"--threads", "many"});
  EXPECT_NE(ParseKvmemdFlags(3, argv.data()).status().message().find("--threads"),
            std::string::npos);
}

TEST(WorkerPoolTest, RunsEveryQueuedTaskBeforeStopReturns) {
  std::atomic<int> ran{0};
  WorkerPool pool(2);
  EXPECT_EQ(pool.size(), 2);
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(pool.Submit([&] { ++ran; }).ok());
  }
  pool.Stop();
  EXPECT_EQ(ran.load(), 100);
  EXPECT_EQ(pool.Submit([] {}).code(), absl::StatusCode::kUnavailable);
}

TEST(WorkerPoolTest, OneWorkerRunsTasksInSubmissionOrder) {
  std::vector<int> order;
  std::mutex mu;
  {
    WorkerPool pool(1);
    for (int i = 0; i < 20; ++i) {
      ASSERT_TRUE(pool.Submit([&, i] {
                        std::lock_guard<std::mutex> lock(mu);
                        order.push_back(i);
                      })
                      .ok());
    }
  }
  ASSERT_EQ(order.size(), 20u);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(order[i], i);
}

TEST(GrpcStatusTest, KeepsCodeAndMessage) {
  grpc::Status s = ToGrpcStatus(absl::FailedPreconditionError("re-read and retry"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(s.error_message(), "re-read and retry");
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_EQ(ToGrpcStatus(absl::ResourceExhaustedError("x")).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
}

TEST(SessionProtoTest, UnsetFieldsKeepServerDefaultsAndSetOnesOverride) {
  v1::CreateSessionRequest proto;
  proto.mutable_memory()->set_window(8);
  proto.mutable_memory()->set_pooling(v1::POOLING_AVG);
  absl::StatusOr<CreateSessionRequest> r = CreateSessionFromProto(proto, {.tenant = "t"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tenant, "t");
  EXPECT_EQ(r->overrides.window, 8);
  EXPECT_EQ(r->overrides.pooling, Pooling::kAvg);
  EXPECT_FALSE(r->overrides.policy.has_value());
  EXPECT_FALSE(r->overrides.budget.has_value());
  EXPECT_FALSE(r->overrides.chat_template.has_value());

  v1::GenerateRequest g;
  g.set_session_id("s");
  absl::StatusOr<GenerateRequest> generate = GenerateFromProto(g, {});
  ASSERT_TRUE(generate.ok()) << generate.status();
  EXPECT_EQ(generate->options.sampling.max_tokens, 256);
  EXPECT_EQ(generate->options.sampling.top_p, 1.0f);
  EXPECT_TRUE(generate->options.keep);
  EXPECT_FALSE(generate->expected_turns.has_value());
  g.set_discard(true);
  g.set_expected_turns(0);
  generate = GenerateFromProto(g, {});
  ASSERT_TRUE(generate.ok());
  EXPECT_FALSE(generate->options.keep);
  EXPECT_EQ(generate->expected_turns, 0);
}

TEST(SessionProtoTest, RejectsTooManyLabelsAndStopStrings) {
  v1::CreateSessionRequest create;
  for (int i = 0; i < 65; ++i) (*create.mutable_labels())[absl::StrCat("k", i)] = "v";
  EXPECT_EQ(CreateSessionFromProto(create, {}).status().code(), absl::StatusCode::kInvalidArgument);
  v1::GenerateRequest g;
  g.set_session_id("s");
  for (int i = 0; i < 17; ++i) g.add_stop("x");
  EXPECT_EQ(GenerateFromProto(g, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem
