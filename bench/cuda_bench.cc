// CUDA backend benchmarks on random-weight models of Llama-3.2-1B and Llama-3-8B shape,
// printed as ratios against bandwidths measured in the same run:
//   decode     ms/token at hot lengths 1K/4K/16K/32K (batch 1) against the floor
//              (weights + hot KV bytes read per token) / device-to-device copy bandwidth;
//   append     a turn of 256 and 4096 tokens onto a 16K-token hot set: prefill, then SnapKV
//              selection on the device (budget 4096 per head), then the host's compaction;
//   page-in    a paged-out 16K-token hot set to the device, from host memory (warm) and from
//              the cold tier (RocksDB blocks read back, the host cache rebuilt, then uploaded),
//              in GB/s of device KV written against the pinned host->device copy bandwidth.
// Usage: cuda_bench [--shapes 1b,8b] [--lengths 1024,4096,16384,32768] [--steps N]
//                   [--dtype bf16|f16|f32]
// Exits 0 with a message when no usable GPU is present.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "engine/cuda_backend.h"
#include "engine/kv_blocks.h"
#include "engine/kv_store.h"
#include "engine/model_config.h"
#include "tiers/cold_store.h"

namespace kvmem {
namespace {

struct Shape {
  std::string name;
  ModelConfig config;
};

ModelConfig LlamaShape(int hidden, int inter, int layers, int heads, int kv_heads, int vocab,
                       bool tied) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.vocab_size = vocab;
  c.max_position_embeddings = 131072;
  c.rope_theta = 500000.0;
  c.tie_word_embeddings = tied;
  return c;
}

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "cuda_bench: %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

// Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.
double DeviceCopyGbps() {
  const size_t bytes = size_t{1} << 30;
  void *a, *b;
  Check(cudaMalloc(&a, bytes), "cudaMalloc");
  Check(cudaMalloc(&b, bytes), "cudaMalloc");
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  Check(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "warm-up copy");
  const int reps = 10;
  cudaEventRecord(start);
  for (int i = 0; i < reps; ++i) cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(stop);
  Check(cudaEventSynchronize(stop), "copy");
  float ms = 0;
  cudaEventElapsedTime(&ms, start, stop);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes * reps / (ms * 1e-3) / 1e9;
}

// Pinned host -> device copy bandwidth in GB/s.
double PinnedUploadGbps() {
  const size_t bytes = size_t{1} << 30;
  void *host, *dev;
  Check(cudaMallocHost(&host, bytes), "cudaMallocHost");
  Check(cudaMalloc(&dev, bytes), "cudaMalloc");
  std::memset(host, 1, bytes);
  Check(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice), "warm-up upload");
  const auto start = std::chrono::steady_clock::now();
  const int reps = 4;
  for (int i = 0; i < reps; ++i) Check(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice), "up");
  const double s = Seconds(start);
  cudaFreeHost(host);
  cudaFree(dev);
  return static_cast<double>(bytes) * reps / s / 1e9;
}

// A hot set of `length` entries per head at positions 0..length-1, random values in [-1, 1),
// filled by all hardware threads.
KvCache RandomHotSet(const ModelConfig& c, int64_t length) {
  KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim);
  const int heads = c.num_layers * c.num_kv_heads;
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = static_cast<int>(t); i < heads; i += static_cast<int>(threads)) {
        HeadKv& h = kv.head(i / c.num_kv_heads, i % c.num_kv_heads);
        h.positions.resize(length);
        h.keys.resize(length * c.head_dim);
        h.values.resize(length * c.head_dim);
        uint64_t x = 0x9e3779b97f4a7c15ull * (i + 1);
        for (int64_t p = 0; p < length; ++p) h.positions[p] = p;
        auto next = [&x] {
          x ^= x << 13;
          x ^= x >> 7;
          x ^= x << 17;
          return static_cast<float>(x >> 40) * (2.f / 16777216.f) - 1.f;
        };
        for (float& v : h.keys) v = next();
        for (float& v : h.values) v = next() * 0.1f;
      }
    });
  }
  for (std::thread& t : pool) t.join();
  return kv;
}

// Bytes of device weights one decode step reads: every layer matrix and the LM head.
double WeightBytesPerToken(const ModelConfig& c, size_t elem) {
  const double h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate_size;
  const double layer = h * (qd + 2 * kvd) + qd * h + 2 * inter * h + inter * h;
  return (c.num_layers * layer + static_cast<double>(c.vocab_size) * h) * elem;
}

double HotKvBytes(const ModelConfig& c, int64_t length, size_t elem) {
  return static_cast<double>(c.num_layers) * c.num_kv_heads * length * c.head_dim * 2 * elem;
}

// Writes `hot` (positions 0..length-1 in every head) to a fresh cold store under `dir` as the
// session's blocks, then times reading every block back and rebuilding the host cache from
// them, as a page-in from cold does. Returns the rebuilt cache; *read_s is the time taken.
absl::StatusOr<KvCache> ColdRoundTrip(const ModelConfig& c, const KvCache& hot, int64_t length,
                                      const std::string& dir, double* read_s) {
  constexpr int kBlock = 16;
  const int kvh = c.num_kv_heads, hd = c.head_dim;
  std::filesystem::remove_all(dir);
  uint64_t uid = 0;
  {
    auto cold = ColdStore::Open({.path = dir, .sync = false});
    if (!cold.ok()) return cold.status();
    SessionRecord record;
    record.session_id = "page-in";
    if (absl::Status s = (*cold)->CreateSession(&record); !s.ok()) return s;
    uid = record.uid;
    std::vector<float> logits(8);
    std::vector<std::pair<int64_t, uint64_t>> owners = record.owners;
    for (int l = 0; l < c.num_layers; ++l) {
      TurnCommit commit;
      commit.owners = &owners;
      commit.last_logits = &logits;
      for (int64_t b = 0; b * kBlock < length; ++b) {
        auto block = std::make_shared<KvBlock>(MakeEmptyBlock(b, kBlock, kvh, hd));
        block->filled = static_cast<int>(std::min<int64_t>(kBlock, length - b * kBlock));
        for (int64_t p = b * kBlock; p < b * kBlock + block->filled; ++p) {
          for (int g = 0; g < kvh; ++g) {
            const HeadKv& h = hot.head(l, g);
            const size_t off = ((p % kBlock) * kvh + g) * hd;
            std::memcpy(&block->keys[off], &h.keys[p * hd], hd * sizeof(float));
            std::memcpy(&block->values[off], &h.values[p * hd], hd * sizeof(float));
          }
        }
        commit.blocks.push_back({{uid, l, b}, block, ComputeDigest(*block, kvh, hd)});
        if (commit.blocks.size() == 64) {
          if (absl::Status s = (*cold)->CommitTurn(record, commit, "", kvh, hd); !s.ok()) return s;
          commit.blocks.clear();
        }
      }
      if (!commit.blocks.empty()) {
        if (absl::Status s = (*cold)->CommitTurn(record, commit, "", kvh, hd); !s.ok()) return s;
      }
    }
  }
  auto cold = ColdStore::Open({.path = dir, .sync = false});
  if (!cold.ok()) return cold.status();
  const auto start = std::chrono::steady_clock::now();
  KvCache rebuilt(c.num_layers, kvh, hd);
  for (int l = 0; l < c.num_layers; ++l) {
    for (int64_t b = 0; b * kBlock < length; ++b) {
      auto block = (*cold)->ReadBlock({uid, l, b}, kBlock, kvh, hd);
      if (!block.ok()) return block.status();
      for (int64_t p = b * kBlock; p < b * kBlock + (*block)->filled; ++p) {
        for (int g = 0; g < kvh; ++g) {
          const size_t off = ((p % kBlock) * kvh + g) * hd;
          rebuilt.head(l, g).Append(p, &(*block)->keys[off], &(*block)->values[off], hd);
        }
      }
    }
  }
  *read_s = Seconds(start);
  std::filesystem::remove_all(dir);
  return rebuilt;
}

int Run(int argc, char** argv) {
  std::vector<std::string> shapes = {"1b", "8b"};
  std::vector<int64_t> lengths = {1024, 4096, 16384, 32768};
  int steps = 20;
  DeviceDtype dtype = DeviceDtype::kBF16;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--shapes") {
      shapes = absl::StrSplit(value, ',');
    } else if (flag == "--lengths") {
      lengths.clear();
      for (const auto& part : absl::StrSplit(value, ',')) {
        int64_t v;
        if (!absl::SimpleAtoi(part, &v)) return std::fprintf(stderr, "bad --lengths\n"), 2;
        lengths.push_back(v);
      }
    } else if (flag == "--steps") {
      if (!absl::SimpleAtoi(value, &steps) || steps <= 0) return std::fprintf(stderr, "bad --steps\n"), 2;
    } else if (flag == "--dtype") {
      auto d = ParseDeviceDtype(value);
      if (!d.ok()) return std::fprintf(stderr, "%s\n", std::string(d.status().message()).c_str()), 2;
      dtype = *d;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  std::string why;
  if (!CudaBackendAvailable(0, &why)) {
    std::printf("cuda_bench: no usable GPU (%s); nothing measured\n", why.c_str());
    return 0;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  const double copy_gbps = DeviceCopyGbps();
  const double pinned_gbps = PinnedUploadGbps();
  const size_t elem = dtype == DeviceDtype::kF32 ? 4 : 2;  // bf16 and f16: 2 bytes
  std::printf("device: %s; dtype %s\n", prop.name, DeviceDtypeName(dtype));
  std::printf("device-to-device copy: %.0f GB/s (read + write); pinned host->device: %.1f GB/s\n\n",
              copy_gbps, pinned_gbps);

  for (const std::string& name : shapes) {
    Shape shape;
    if (name == "1b") {
      shape = {"Llama-3.2-1B", LlamaShape(2048, 8192, 16, 32, 8, 128256, true)};
    } else if (name == "8b") {
      shape = {"Llama-3-8B", LlamaShape(4096, 14336, 32, 32, 8, 128256, false)};
    } else {
      std::fprintf(stderr, "unknown shape %s (1b or 8b)\n", name.c_str());
      return 2;
    }
    const ModelConfig& c = shape.config;
    auto backend = CreateCudaBackend(c, nullptr, {.dtype = dtype, .random_weights_seed = 7});
    if (!backend.ok()) {
      std::fprintf(stderr, "%s: %s\n", shape.name.c_str(), backend.status().ToString().c_str());
      return 1;
    }
    Backend& b = **backend;
    const double weight_bytes = WeightBytesPerToken(c, elem);
    std::printf("## %s (random weights, %.2f GB read per token)\n\n", shape.name.c_str(),
                weight_bytes / 1e9);
    std::printf("| hot tokens/head | ms/token | floor ms | roofline share |\n");
    std::printf("| ---: | ---: | ---: | ---: |\n");
    for (int64_t length : lengths) {
      KvCache kv = RandomHotSet(c, length);
      ForwardResult r;
      int64_t pos = length;
      std::vector<int32_t> token = {1};
      for (int i = 0; i < 3; ++i) {  // the first step uploads the hot set
        absl::Status s = b.Forward(token, pos++, &kv, {}, &r);
        if (!s.ok()) return std::fprintf(stderr, "decode: %s\n", s.ToString().c_str()), 1;
      }
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < steps; ++i) {
        token[0] = static_cast<int32_t>(r.logits.empty() ? 1 : (i * 7919) % c.vocab_size);
        absl::Status s = b.Forward(token, pos++, &kv, {}, &r);
        if (!s.ok()) return std::fprintf(stderr, "decode: %s\n", s.ToString().c_str()), 1;
      }
      const double ms = Seconds(start) * 1e3 / steps;
      const double floor_ms =
          (weight_bytes + HotKvBytes(c, length + 3 + steps / 2, elem)) / (copy_gbps * 1e9) * 1e3;
      std::printf("| %lld | %.3f | %.3f | %.2f |\n", static_cast<long long>(length), ms, floor_ms,
                  floor_ms / ms);
    }

    // Turn append onto a 16K-token hot set.
    std::printf("\n| turn onto 16K | prefill ms | SnapKV ms | compaction ms | turn ms | SnapKV share |\n");
    std::printf("| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    const int64_t base = 16384;
    const SnapKvOptions snap{.window = 32, .kernel = 7, .pooling = Pooling::kMax, .budget = 4096};
    for (int64_t turn : {int64_t{256}, int64_t{4096}}) {
      double prefill_ms = 0, select_ms = 0, compact_ms = 0;
      const int reps = 3;
      for (int rep = 0; rep < reps; ++rep) {
        KvCache kv = RandomHotSet(c, base);
        ForwardResult r;
        std::vector<int32_t> one = {1};
        if (!b.Forward(one, base, &kv, {}, &r).ok()) return 1;  // uploads the hot set
        std::vector<int32_t> tokens(turn);
        for (int64_t i = 0; i < turn; ++i) tokens[i] = static_cast<int32_t>((i * 31 + rep) % c.vocab_size);
        auto start = std::chrono::steady_clock::now();
        absl::Status s = b.Forward(tokens, base + 1, &kv, {.observe_last = snap.window}, &r);
        if (!s.ok()) return std::fprintf(stderr, "append: %s\n", s.ToString().c_str()), 1;
        prefill_ms += Seconds(start) * 1e3;
        start = std::chrono::steady_clock::now();
        auto keep = b.SelectSnapKv(kv, snap, r.observed_queries, snap.window);
        if (!keep.ok()) return std::fprintf(stderr, "snapkv: %s\n", keep.status().ToString().c_str()), 1;
        select_ms += Seconds(start) * 1e3;
        start = std::chrono::steady_clock::now();
        for (int l = 0; l < c.num_layers; ++l) {
          for (int g = 0; g < c.num_kv_heads; ++g) {
            HeadKv& h = kv.head(l, g);
            const std::vector<int64_t>& k = (*keep)[l * c.num_kv_heads + g];
            for (size_t i = 0; i < k.size(); ++i) {
              h.positions[i] = h.positions[k[i]];
              std::memmove(&h.keys[i * c.head_dim], &h.keys[k[i] * c.head_dim], c.head_dim * 4);
              std::memmove(&h.values[i * c.head_dim], &h.values[k[i] * c.head_dim], c.head_dim * 4);
            }
            h.positions.resize(k.size());
            h.keys.resize(k.size() * c.head_dim);
            h.values.resize(k.size() * c.head_dim);
          }
        }
        compact_ms += Seconds(start) * 1e3;
      }
      prefill_ms /= reps;
      select_ms /= reps;
      compact_ms /= reps;
      const double total = prefill_ms + select_ms + compact_ms;
      std::printf("| %lld | %.2f | %.2f | %.2f | %.2f | %.3f |\n", static_cast<long long>(turn),
                  prefill_ms, select_ms, compact_ms, total, select_ms / total);
    }

    // Page-in of a paged-out 16K-token hot set from host memory: the first pass uploads it.
    {
      KvCache kv = RandomHotSet(c, base);
      ForwardResult r;
      std::vector<int32_t> one = {1};
      auto start = std::chrono::steady_clock::now();
      if (!b.Forward(one, base, &kv, {}, &r).ok()) return 1;
      const double first_s = Seconds(start);
      start = std::chrono::steady_clock::now();
      if (!b.Forward(one, base + 1, &kv, {}, &r).ok()) return 1;
      const double step_s = Seconds(start);
      const double bytes = HotKvBytes(c, base, elem);
      const double gbps = bytes / std::max(first_s - step_s, 1e-9) / 1e9;
      std::printf("\npage-in from warm (16K tokens/head, %.2f GB of device KV): %.1f ms, %.1f GB/s, "
                  "%.2f of pinned host->device\n",
                  bytes / 1e9, (first_s - step_s) * 1e3, gbps, gbps / pinned_gbps);

      // From cold: the same hot set written as blocks, read back, rebuilt, uploaded.
      double read_s = 0;
      const std::string dir =
          (std::filesystem::temp_directory_path() / "kvmem-cuda-bench-cold").string();
      absl::StatusOr<KvCache> rebuilt = ColdRoundTrip(c, kv, base, dir, &read_s);
      if (!rebuilt.ok()) {
        std::fprintf(stderr, "cold: %s\n", rebuilt.status().ToString().c_str());
        return 1;
      }
      start = std::chrono::steady_clock::now();
      if (!b.Forward(one, base, &*rebuilt, {}, &r).ok()) return 1;
      const double upload_s = Seconds(start) - step_s;
      const double f32_bytes = HotKvBytes(c, base, sizeof(float));
      const double total_s = read_s + upload_s;
      std::printf("page-in from cold: read + rebuild %.1f ms (%.2f GB/s of stored f32 blocks), "
                  "upload %.1f ms; total %.1f ms, %.1f GB/s of device KV, %.2f of pinned "
                  "host->device\n\n",
                  read_s * 1e3, f32_bytes / read_s / 1e9, upload_s * 1e3, total_s * 1e3,
                  bytes / total_s / 1e9, bytes / total_s / 1e9 / pinned_gbps);
    }
  }
  return 0;
}

}  // namespace
}  // namespace kvmem

int main(int argc, char** argv) { return kvmem::Run(argc, argv); }
