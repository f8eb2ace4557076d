// Where the time of a turn goes on the CPU backend: prefill, SnapKV selection, recall and the
// durable commit, as shares of the turn measured in one run, for several hot budgets.
//   build/bin/session_bench [MODEL_DIR] [TURNS]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "engine/cpu_backend.h"
#include "engine/model.h"
#include "service/session_manager.h"

int main(int argc, char** argv) {
  auto dir = kvmem::ResolveModelDir(argc > 1 ? argv[1] : "");
  if (!dir.ok()) {
    std::fprintf(stderr, "%s\n", std::string(dir.status().message()).c_str());
    return 1;
  }
  const int turns = argc > 2 ? std::atoi(argv[2]) : 60;
  auto model = kvmem::Model::Load(*dir);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  kvmem::CpuBackend backend(**model, {.threads = 1});
  const char* text =
      "One day, the little dog ran to the park with his red ball. He played with his friend "
      "the cat until the sun went down, and then they went home to sleep.";
  std::printf("model %s, %d turns of ~40 tokens, one thread, fsync'd RocksDB store\n",
              dir->c_str(), turns);
  std::printf("%-22s %9s %9s %9s %9s %9s %10s\n", "policy", "ms/turn", "prefill", "select",
              "commit", "other", "recalled");
  struct Row { const char* name; const char* policy; int budget; int recall; };
  const Row rows[] = {{"full", "full", 64, 0},
                      {"snapkv b=64", "snapkv", 64, 0},
                      {"snapkv b=64 recall=8", "snapkv", 64, 8},
                      {"snapkv b=256", "snapkv", 256, 0},
                      {"snapkv b=256 recall=8", "snapkv", 256, 8}};
  for (const Row& row : rows) {
    const std::string data =
        (std::filesystem::temp_directory_path() / "kvmem-session-bench").string();
    std::filesystem::remove_all(data);
    kvmem::SessionManagerOptions options;
    options.data_dir = data;
    options.session_defaults.memory = {.policy = row.policy, .budget = row.budget, .window = 16};
    options.session_defaults.recall_blocks = row.recall;
    auto manager = kvmem::SessionManager::Open(**model, backend, options);
    if (!manager.ok() || !(*manager)->CreateSession({.session_id = "b"}).ok()) return 1;
    double total = 0, prefill = 0, select = 0, commit = 0;
    int64_t recalled = 0;
    for (int t = 0; t < turns; ++t) {
      const auto start = std::chrono::steady_clock::now();
      auto r = (*manager)->AppendTurn({.session_id = "b", .content = text});
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", std::string(r.status().message()).c_str());
        return 1;
      }
      total += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                   .count();
      prefill += r->prefill_ms;
      select += r->select_ms;
      commit += r->commit_ms;
      recalled += r->recalled_blocks;
    }
    std::printf("%-22s %9.2f %8.1f%% %8.1f%% %8.1f%% %8.1f%% %10.1f\n", row.name, total / turns,
                100 * prefill / total, 100 * select / total, 100 * commit / total,
                100 * (total - prefill - select - commit) / total,
                static_cast<double>(recalled) / turns);
    manager->reset();
    std::filesystem::remove_all(data);
  }
  return 0;
}
