// kvmemd serving on the CUDA backend, end to end: sessions appended to and generated from on
// several connections at once, a fork, and a restart, each giving the same greedy text as a
// CPU server in f32. Built twice: against kvmemd itself (skips without a GPU), and against
// kvmemd_emu, the same server on the CUDA emulator (kernels/emu), which runs everywhere.
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "client/agent_memory_client.h"
#include "engine/cuda_backend.h"
#include "gtest/gtest.h"
#include "tests/kvmemd_process.h"
#include "tests/test_util.h"

#ifndef KVMEM_GPU_SERVER
#define KVMEM_GPU_SERVER "kvmemd"
#endif

namespace kvmem {
namespace {

using testing::KvmemdProcess;
using testing::TempDir;

constexpr int kSessions = 3;
constexpr const char* kTurns[] = {
    "Once upon a time, there was a little dog named Max who loved to run in the park.",
    "One day, Max found a big red ball under a tree and wanted to play with it.",
};

v1::GenerateRequest Greedy(const std::string& id, int max_tokens) {
  v1::GenerateRequest request;
  request.set_session_id(id);
  request.set_max_tokens(max_tokens);
  return request;
}

// Every text a client saw, per session, in order.
using Transcript = std::map<std::string, std::vector<std::string>>;

// Appends both turns to `kSessions` sessions, one connection each at the same time, with a
// greedy reply after each; the sessions' hot budget is small, so SnapKV evicts and recall reads
// blocks back. Adds "error: ..." to a session's texts when a call fails.
Transcript Converse(const std::string& address, const std::string& prefix) {
  Transcript out;
  std::vector<std::string> ids;
  for (int i = 0; i < kSessions; ++i) ids.push_back(absl::StrCat(prefix, i));
  for (const std::string& id : ids) out[id];
  std::vector<std::thread> threads;
  for (const std::string& id : ids) {
    threads.emplace_back([&, id] {
      std::vector<std::string>& texts = out[id];
      AgentMemoryClient client({.address = address, .timeout_ms = 600000});
      v1::CreateSessionRequest create;
      create.set_session_id(id);
      create.mutable_memory()->set_hot_budget(40);
      create.mutable_memory()->set_window(8);
      create.mutable_memory()->set_kernel(3);
      if (auto s = client.CreateSession(create); !s.ok()) {
        return texts.push_back(absl::StrCat("error: ", s.status().ToString()));
      }
      for (const char* turn : kTurns) {
        auto a = client.AppendTurn(id, v1::ROLE_USER, absl::StrCat(id, ": ", turn));
        if (!a.ok()) return texts.push_back(absl::StrCat("error: ", a.status().ToString()));
        std::string reply;
        auto g = client.Generate(Greedy(id, 10), [&](std::string_view d) {
          reply.append(d);
          return true;
        });
        if (!g.ok()) return texts.push_back(absl::StrCat("error: ", g.status().ToString()));
        texts.push_back(reply);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  return out;
}

// One more greedy reply of each session in `ids`, and of a fork of the first.
Transcript Continue(const std::string& address, const std::vector<std::string>& ids) {
  Transcript out;
  AgentMemoryClient client({.address = address, .timeout_ms = 600000});
  std::vector<std::string> all = ids;
  if (auto fork = client.ForkSession(ids[0], ids[0] + "-fork"); fork.ok()) {
    all.push_back(ids[0] + "-fork");
  } else {
    out["fork"].push_back(absl::StrCat("error: ", fork.status().ToString()));
  }
  for (const std::string& id : all) {
    std::string reply;
    auto g = client.Generate(Greedy(id, 8), [&](std::string_view d) {
      reply.append(d);
      return true;
    });
    out[id].push_back(g.ok() ? reply : absl::StrCat("error: ", g.status().ToString()));
  }
  return out;
}

TEST(ServiceGpuTest, CudaServerGivesTheCpuServersTextsThroughConcurrencyForksAndRestarts) {
  std::string why;
  if (!CudaBackendAvailable(0, &why)) GTEST_SKIP() << "no GPU: " << why;
  TempDir cpu_dir, gpu_dir;
  auto cpu = KvmemdProcess::Start({"--device", "cpu", "--data-dir", cpu_dir.path()});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const std::vector<std::string> gpu_args = {
      "--device",   "cuda",         "--device-dtype", "f32",
      "--data-dir", gpu_dir.path(), "--pinned-bytes", "1048576"};
  auto gpu = KvmemdProcess::Start(gpu_args, KVMEM_GPU_SERVER);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_NE((*gpu)->StderrText().find("CUDA backend, f32 weights and KV"), std::string::npos)
      << (*gpu)->StderrText();

  const Transcript want = Converse((*cpu)->address(), "s");
  for (const auto& [id, texts] : want) {
    ASSERT_EQ(texts.size(), 2u) << id << ": " << (texts.empty() ? "" : texts.back());
    EXPECT_FALSE(texts[0].empty()) << id;
  }
  EXPECT_EQ(Converse((*gpu)->address(), "s"), want);

  // After a restart the GPU server restores the sessions from its store (a page-in to the
  // device, reading pinned blocks by address where they fit) and goes on like the CPU one.
  ASSERT_EQ((*gpu)->Stop(), 0) << (*gpu)->StderrText();
  gpu = KvmemdProcess::Start(gpu_args, KVMEM_GPU_SERVER);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  std::vector<std::string> ids;
  for (const auto& [id, texts] : want) ids.push_back(id);
  const Transcript more = Continue((*cpu)->address(), ids);
  ASSERT_EQ(more.size(), ids.size() + 1);
  EXPECT_EQ(Continue((*gpu)->address(), ids), more);
}

}  // namespace
}  // namespace kvmem
