// Warm and cold tier bandwidth for KV blocks of the Llama-3-8B shape (8 KV heads, head_dim
// 128, 16 positions per block, f32: 128 KiB per block), against memcpy measured in the same
// run. Also compares block files (the default) with blocks inside RocksDB. ROWS bf16 makes bf16
// blocks, as sessions on a bf16 GPU keep them: 2 bytes per value in memory and on disk (GB/s
// still counts f32 block bytes, so the two runs compare directly).
//   build/bin/tier_bench [DIR] [BLOCKS] [ROWS: f32|bf16]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "engine/kv_store.h"
#include "tiers/cold_store.h"
#include "tiers/warm_store.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kHeads = 8, kHeadDim = 128, kBlock = 16;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  const std::string root = argc > 1 ? argv[1] : (fs::temp_directory_path() / "kvmem-tier-bench").string();
  const int blocks = argc > 2 ? std::atoi(argv[2]) : 512;
  const std::string rows = argc > 3 ? argv[3] : "f32";
  if (rows != "f32" && rows != "bf16") {
    std::fprintf(stderr, "ROWS must be f32 or bf16\n");
    return 2;
  }
  const int64_t block_bytes = 2LL * kBlock * kHeads * kHeadDim * sizeof(float);
  const double total_gb = static_cast<double>(block_bytes) * blocks / 1e9;

  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<std::shared_ptr<const kvmem::KvBlock>> data;
  const kvmem::BlockDType dtype =
      rows == "bf16" ? kvmem::BlockDType::kBF16 : kvmem::BlockDType::kF32;
  for (int i = 0; i < blocks; ++i) {
    auto b =
        std::make_shared<kvmem::KvBlock>(kvmem::MakeEmptyBlock(i, kBlock, kHeads, kHeadDim, dtype));
    b->filled = kBlock;
    std::vector<float> k(b->size()), v(b->size());
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
    b->WriteKeys(0, k.data(), k.size());  // bf16 blocks round, as a bf16 device's rows are
    b->WriteValues(0, v.data(), v.size());
    data.push_back(b);
  }
  std::vector<int> order(blocks);
  for (int i = 0; i < blocks; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);

  // Baseline: copying the same number of f32 block bytes in memory.
  std::vector<float> sink(data[0]->size());
  std::vector<std::vector<float>> f32(blocks, std::vector<float>(data[0]->size(), 1.f));
  auto start = Clock::now();
  for (int i : order) {
    std::memcpy(sink.data(), f32[i].data(), block_bytes / 2);
    std::memcpy(sink.data(), f32[i].data(), block_bytes / 2);
  }
  const double memcpy_gbs = total_gb / Seconds(start);

  std::printf("blocks: %d x %lld KiB (Llama-3-8B KV shape as f32, %s blocks) = %.1f MB\n", blocks,
              static_cast<long long>(block_bytes >> 10), rows.c_str(), total_gb * 1e3);
  std::printf("%-34s %10s %12s\n", "path", "GB/s", "vs memcpy");
  std::printf("%-34s %10.2f %12.3f\n", "memcpy (baseline)", memcpy_gbs, 1.0);

  // Warm: LRU inserts and lookups (the copy is a shared pointer; the cost is bookkeeping).
  kvmem::WarmStore warm(block_bytes * blocks);
  start = Clock::now();
  for (int i = 0; i < blocks; ++i) warm.Put({1, 0, i}, data[i], block_bytes);
  const double warm_put = total_gb / Seconds(start);
  start = Clock::now();
  for (int i : order) {
    auto b = warm.Get({1, 0, i});
    b->ReadKeys(0, b->size(), sink.data());  // bf16 blocks widen as they copy out
    b->ReadValues(0, b->size(), sink.data());
  }
  const double warm_get = total_gb / Seconds(start);
  std::printf("%-34s %10.2f %12.3f\n", "warm write", warm_put, warm_put / memcpy_gbs);
  std::printf("%-34s %10.2f %12.3f\n", "warm read (+copy out)", warm_get, warm_get / memcpy_gbs);

  for (bool files : {true, false}) {
    for (bool sync : {true, false}) {
      const std::string dir = root + (files ? "-files" : "-sst") + (sync ? "-sync" : "-nosync");
      fs::remove_all(dir);
      double write_gbs = 0, read_gbs = 0;
      {
        auto cold = kvmem::ColdStore::Open({.path = dir, .sync = sync, .block_files = files});
        if (!cold.ok()) {
          std::fprintf(stderr, "%s\n", std::string(cold.status().message()).c_str());
          return 1;
        }
        kvmem::SessionRecord record;
        record.session_id = "bench";
        if (!(*cold)->CreateSession(&record).ok()) return 1;
        // One commit per 32 blocks: a 512-token turn of one layer's worth, written durably.
        std::vector<float> logits(8);
        std::vector<std::pair<int64_t, uint64_t>> owners = record.owners;
        start = Clock::now();
        for (int first = 0; first < blocks; first += 32) {
          kvmem::TurnCommit commit;
          commit.owners = &owners;
          commit.last_logits = &logits;
          for (int i = first; i < std::min(blocks, first + 32); ++i) {
            commit.blocks.push_back({{record.uid, 0, i}, data[i], std::vector<float>(2 * kHeads * kHeadDim)});
          }
          if (!(*cold)->CommitTurn(record, commit, "", kHeads, kHeadDim).ok()) return 1;
        }
        write_gbs = total_gb / Seconds(start);
      }
      auto cold = kvmem::ColdStore::Open({.path = dir, .sync = sync, .block_files = files});
      if (!cold.ok()) return 1;
      start = Clock::now();
      for (int i : order) {
        auto b = (*cold)->ReadBlock({1, 0, i}, kBlock, kHeads, kHeadDim);
        if (!b.ok()) {
          std::fprintf(stderr, "%s\n", std::string(b.status().message()).c_str());
          return 1;
        }
      }
      read_gbs = total_gb / Seconds(start);
      const std::string label = std::string("cold ") + (files ? "block files" : "sst values") +
                                (sync ? ", fsync" : ", no fsync");
      std::printf("%-34s %10.2f %12.3f\n", (label + " write").c_str(), write_gbs,
                  write_gbs / memcpy_gbs);
      std::printf("%-34s %10.2f %12.3f\n", (label + " read").c_str(), read_gbs,
                  read_gbs / memcpy_gbs);
      fs::remove_all(dir);
    }
  }
  return 0;
}
