// The `kvmem` command line against a real kvmemd: every server subcommand, its output, its
// errors and exit statuses.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "engine/cuda_backend.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/kvmemd_process.h"
#include "tests/test_util.h"

namespace kvmem {
namespace {

struct CliRun {
  int exit_status = -1;
  std::string out;
  std::string err;
};

class KvmemCliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = testing::KvmemdProcess::Start({"--backend-threads", "1"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  // Runs `kvmem --addr SERVER <args>` through the shell with `input` on stdin.
  CliRun Kvmem(const std::string& args, const std::string& input = "") {
    testing::WriteText(dir_.path() + "/in", input);
    const std::string cmd = std::string(KVMEM_BIN_DIR) + "/kvmem --addr " + server_->address() +
                            " " + args + " < " + dir_.path() + "/in > " + dir_.path() + "/out 2> " +
                            dir_.path() + "/err";
    CliRun r;
    const int status = std::system(cmd.c_str());
    r.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = testing::ReadText(dir_.path() + "/out");
    r.err = testing::ReadText(dir_.path() + "/err");
    return r;
  }

  static testing::KvmemdProcess* server_;
  testing::TempDir dir_;
};
testing::KvmemdProcess* KvmemCliTest::server_ = nullptr;

TEST_F(KvmemCliTest, CreateAppendGenerateShowRunASession) {
  CliRun create = Kvmem("create --id cli-story --hot-budget 64 --pooling avg --label team=docs");
  ASSERT_EQ(create.exit_status, 0) << create.err;
  EXPECT_EQ(create.out, "cli-story\n");

  CliRun append = Kvmem("append cli-story --role user --text 'Once upon a time'");
  ASSERT_EQ(append.exit_status, 0) << append.err;
  EXPECT_EQ(append.out.rfind("turn 0: ", 0), 0u) << append.out;

  CliRun generate = Kvmem("generate cli-story --max-tokens 20");
  ASSERT_EQ(generate.exit_status, 0) << generate.err;
  EXPECT_EQ(generate.out.rfind(", there was a little girl named Lily.", 0), 0u) << generate.out;

  CliRun show = Kvmem("show cli-story --json");
  ASSERT_EQ(show.exit_status, 0) << show.err;
  nlohmann::json s = nlohmann::json::parse(show.out);
  EXPECT_EQ(s["session_id"], "cli-story");
  EXPECT_EQ(s["turns"], 2);
  EXPECT_GT(s["total_tokens"].get<int>(), 20);
  ASSERT_EQ(s["hot_tokens_per_head"].size(), 5u);                // layers
  EXPECT_EQ(s["hot_tokens_per_head"][0].size(), 4u);             // KV heads
  EXPECT_EQ(s["hot_tokens_per_head"][0][0], s["total_tokens"]);  // under the budget of 64
  for (const char* key : {"warm_blocks", "warm_bytes", "cold_blocks", "cold_bytes"}) {
    EXPECT_TRUE(s.contains(key)) << key;
  }
  EXPECT_GT(s["warm_blocks"].get<int>() + s["cold_blocks"].get<int>(), 0);
  EXPECT_EQ(s["memory"]["hot_budget"], 64);
  EXPECT_EQ(s["memory"]["pooling"], "avg");
  EXPECT_EQ(s["labels"]["team"], "docs");

  CliRun human = Kvmem("show cli-story");
  ASSERT_EQ(human.exit_status, 0) << human.err;
  EXPECT_NE(human.out.find("turns        2"), std::string::npos) << human.out;
}

TEST_F(KvmemCliTest, TextFromStdinDiscardForkListAndRemove) {
  ASSERT_EQ(Kvmem("create --id cli-a --label kind=cli").exit_status, 0);
  CliRun append = Kvmem("append cli-a --role system --text -", "You tell short stories.\n");
  ASSERT_EQ(append.exit_status, 0) << append.err;
  ASSERT_EQ(Kvmem("append cli-a --text 'Tell me about a cat.'").exit_status, 0);
  CliRun discarded = Kvmem("generate cli-a --max-tokens 8 --discard --json");
  ASSERT_EQ(discarded.exit_status, 0) << discarded.err;
  EXPECT_EQ(nlohmann::json::parse(discarded.out)["turn_index"], -1);
  EXPECT_EQ(nlohmann::json::parse(Kvmem("show cli-a --json").out)["turns"], 2);

  CliRun fork = Kvmem("fork cli-a --id cli-b");
  ASSERT_EQ(fork.exit_status, 0) << fork.err;
  EXPECT_EQ(fork.out, "cli-b\n");
  CliRun list = Kvmem("ls --label kind=cli --json");
  ASSERT_EQ(list.exit_status, 0) << list.err;
  nlohmann::json sessions = nlohmann::json::parse(list.out);
  ASSERT_EQ(sessions.size(), 2u);
  EXPECT_EQ(sessions[0]["session_id"], "cli-a");
  EXPECT_EQ(sessions[1]["session_id"], "cli-b");
  EXPECT_NE(Kvmem("ls").out.find("cli-b"), std::string::npos);

  ASSERT_EQ(Kvmem("rm cli-b").exit_status, 0);
  CliRun gone = Kvmem("show cli-b");
  EXPECT_EQ(gone.exit_status, 1);
  EXPECT_NE(gone.err.find("NOT_FOUND"), std::string::npos) << gone.err;
}

TEST_F(KvmemCliTest, ChatAnswersEachInputLine) {
  ASSERT_EQ(Kvmem("create --id cli-chat").exit_status, 0);
  CliRun chat = Kvmem("chat cli-chat --max-tokens 6", "Once upon a time\nThe dog barked.\n");
  ASSERT_EQ(chat.exit_status, 0) << chat.err;
  EXPECT_EQ(std::count(chat.out.begin(), chat.out.end(), '\n'), 2) << chat.out;
  EXPECT_EQ(nlohmann::json::parse(Kvmem("show cli-chat --json").out)["turns"], 4);
}

TEST_F(KvmemCliTest, ErrorsPrintTheCodeNameAndExitNonZero) {
  ASSERT_EQ(Kvmem("create --id cli-err").exit_status, 0);
  CliRun stale = Kvmem("append cli-err --text hello --expected-turns 3");
  EXPECT_EQ(stale.exit_status, 1);
  EXPECT_NE(stale.err.find("FAILED_PRECONDITION"), std::string::npos) << stale.err;
  EXPECT_TRUE(stale.out.empty()) << stale.out;
  CliRun taken = Kvmem("create --id cli-err");
  EXPECT_EQ(taken.exit_status, 1);
  EXPECT_NE(taken.err.find("ALREADY_EXISTS"), std::string::npos) << taken.err;
  CliRun bad_value = Kvmem("generate cli-err --temperature hot");
  EXPECT_EQ(bad_value.exit_status, 2);
  EXPECT_NE(bad_value.err.find("--temperature"), std::string::npos) << bad_value.err;
  CliRun no_id = Kvmem("show");
  EXPECT_EQ(no_id.exit_status, 2);
  const std::string down =
      std::string(KVMEM_BIN_DIR) + "/kvmem --addr 127.0.0.1:1 --timeout-ms 2000 ls 2>&1 >/dev/null";
  FILE* pipe = popen(down.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string err;
  char buf[256];
  while (size_t n = fread(buf, 1, sizeof(buf), pipe)) err.append(buf, n);
  EXPECT_NE(pclose(pipe), 0);
  EXPECT_NE(err.find("UNAVAILABLE"), std::string::npos) << err;
}

// Runs `command` through the shell; returns its exit status and sets *err to stderr.
int RunForStderr(const std::string& command, std::string* err) {
  FILE* pipe = popen((command + " 2>&1 >/dev/null").c_str(), "r");
  if (pipe == nullptr) return -1;
  char buf[256];
  while (size_t n = fread(buf, 1, sizeof(buf), pipe)) err->append(buf, n);
  return pclose(pipe);
}

TEST(KvmemdDeviceTest, UnavailableOrUnknownDeviceIsAClearErrorBeforeServing) {
  const std::string kvmemd = std::string(KVMEM_BIN_DIR) + "/kvmemd --listen 127.0.0.1:0 ";
  std::string gpu, dtype;
  EXPECT_NE(RunForStderr(kvmemd + "--device gpu", &gpu), 0);
  EXPECT_NE(gpu.find("INVALID_ARGUMENT"), std::string::npos) << gpu;
  EXPECT_NE(RunForStderr(kvmemd + "--device-dtype f8", &dtype), 0);
  EXPECT_NE(dtype.find("bf16, f16 or f32"), std::string::npos) << dtype;
  std::string pinned;
  EXPECT_NE(RunForStderr(kvmemd + "--device cpu --pinned-bytes -2", &pinned), 0);
  EXPECT_NE(pinned.find("--pinned-bytes must be"), std::string::npos) << pinned;
  std::string why;
  if (CudaBackendAvailable(0, &why)) return;  // --device cuda would serve; not a failure here
  std::string cuda;
  EXPECT_NE(RunForStderr(kvmemd + "--device cuda", &cuda), 0);
  EXPECT_NE(cuda.find("UNAVAILABLE"), std::string::npos) << cuda;
  EXPECT_NE(cuda.find("--device cpu"), std::string::npos) << cuda;
}

}  // namespace
}  // namespace kvmem
