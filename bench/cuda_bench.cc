// CUDA backend benchmarks on random-weight models of Llama-3.2-1B and Llama-3-8B shape,
// printed as ratios against bandwidths measured in the same run:
//   decode     ms/token at hot lengths 1K/4K/16K/32K (batch 1) against the floor
//              (weights + hot KV bytes read per token) / device-to-device copy bandwidth;
//   append     a turn of 256 and 4096 tokens onto a 16K-token hot set: prefill, then SnapKV
//              selection on the device (budget 4096 per head), then compaction (the host
//              compacts positions, the device gathers its rows on the next pass);
//   page-in    a paged-out 16K-token hot set to the device, from blocks in host memory (warm)
//              and from the cold tier (RocksDB blocks read back, then uploaded), in GB/s of
//              device KV written against the pinned host->device copy bandwidth.
// Hot sets are held as sessions on the GPU hold them: positions on the host, rows on the
// device, read back from blocks of 16 positions in the device's KV type when the device needs
// them again.
// Usage: cuda_bench [--shapes 1b,8b] [--lengths 1024,4096,16384,32768] [--steps N]
//                   [--dtype bf16|f16|f32] [--graphs 1|0] [--profile 0|1] [--pinned-bytes N]
//                   [--base 16384] [--turns 256,4096] [--probe-bytes 1073741824]
// --base is the hot set's length for append and page-in (SnapKV budget: a quarter of it),
// --probe-bytes the size of the copies that measure the bandwidths. The "tiny" shape with
// small sizes is the smoke run of the CUDA emulator's tests (kernels/emu/CMakeLists.txt).
// Page-in is measured from pageable blocks (packed through the staging slots) and from blocks
// in the pinned pool (CudaBackendOptions::pinned_block_bytes, default here 8 GiB), which the
// device reads by address.
// --profile 1 adds, after each measurement, where its device time went op by op
// (CudaBackendOptions::profile_ops; with --graphs 0 a decode step is split by op too).
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
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/model_shapes.h"
#include "engine/block_memory.h"
#include "engine/cuda_backend.h"
#include "engine/kv_blocks.h"
#include "engine/kv_store.h"
#include "engine/malloc_arenas.h"
#include "engine/model_config.h"
#include "tiers/cold_store.h"

namespace kvmem {
namespace {

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
double DeviceCopyGbps(size_t bytes) {
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
double PinnedUploadGbps(size_t bytes) {
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

constexpr int kBlock = 16;

// Op times summed over the passes of one measurement (TakeCudaOpProfile after each timed call).
class OpTable {
 public:
  void Add(Backend& b) {
    for (CudaOpTime& t : TakeCudaOpProfile(b)) {
      auto it = std::find_if(rows_.begin(), rows_.end(),
                             [&](const CudaOpTime& r) { return r.op == t.op; });
      if (it == rows_.end()) {
        rows_.push_back(std::move(t));
      } else {
        it->ms += t.ms;
        it->count += t.count;
      }
    }
  }
  // ms per measured call of each op, and its share of the device time between first and last
  // event of the calls (the host-wall row excluded).
  void Print(const char* what, int calls) const {
    if (rows_.empty()) return;
    double device = 0;
    for (const CudaOpTime& r : rows_) {
      if (r.op[0] != '(') device += r.ms;
    }
    std::printf("\n%s, op by op (ms per call, %d calls; device timeline %.3f ms per call):\n\n",
                what, calls, device / calls);
    std::printf("| op | ms | share | launches per call |\n| --- | ---: | ---: | ---: |\n");
    for (const CudaOpTime& r : rows_) {
      std::printf("| %s | %.3f | %.3f | %.0f |\n", r.op.c_str(), r.ms / calls,
                  r.op[0] == '(' || device <= 0 ? 0.0 : r.ms / device,
                  static_cast<double>(r.count) / calls);
    }
    std::printf("\n");
  }

 private:
  std::vector<CudaOpTime> rows_;
};

// (layer) -> (block index) -> block of kBlock positions, all KV heads.
using LayerBlocks = std::vector<std::vector<std::shared_ptr<const KvBlock>>>;

// Blocks of positions 0..length-1 with random values in [-1, 1) (values scaled by 0.1), in the
// type sessions on the backend keep them (Backend::KvDType), filled by all hardware threads.
LayerBlocks RandomBlocks(const ModelConfig& c, int64_t length, BlockDType dtype) {
  const int64_t per_layer = (length + kBlock - 1) / kBlock;
  LayerBlocks blocks(c.num_layers, std::vector<std::shared_ptr<const KvBlock>>(per_layer));
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int64_t i = t; i < c.num_layers * per_layer; i += threads) {
        const int64_t b = i % per_layer;
        auto block =
            std::make_shared<KvBlock>(MakeEmptyBlock(b, kBlock, c.num_kv_heads, c.head_dim, dtype));
        block->filled = static_cast<int>(std::min<int64_t>(kBlock, length - b * kBlock));
        uint64_t x = 0x9e3779b97f4a7c15ull * (i + 1);
        auto next = [&x] {
          x ^= x << 13;
          x ^= x >> 7;
          x ^= x << 17;
          return static_cast<float>(x >> 40) * (2.f / 16777216.f) - 1.f;
        };
        std::vector<float> k(block->size()), v(block->size());
        for (float& x : k) x = next();
        for (float& x : v) x = next() * 0.1f;
        block->WriteKeys(0, k.data(), k.size());
        block->WriteValues(0, v.data(), v.size());
        blocks[i / per_layer][b] = std::move(block);
      }
    });
  }
  for (std::thread& t : pool) t.join();
  return blocks;
}

// Reads rows back from blocks the way Session::ReadRows does.
class BlockRows : public KvRowSource {
 public:
  BlockRows(const ModelConfig& c, const LayerBlocks* blocks) : c_(c), blocks_(blocks) {}
  absl::Status ReadRows(int layer, int kv_head, absl::Span<const int64_t> positions, float* keys,
                        float* values) override {
    const int hd = c_.head_dim;
    return ForEachRow(layer, kv_head, positions, [&](const KvBlock& block, size_t off, size_t i) {
      block.ReadKeys(off, hd, keys + i * hd);
      block.ReadValues(off, hd, values + i * hd);
      return absl::OkStatus();
    });
  }
  // Rows of several heads of a layer, as a session reads them for an upload (ordered by
  // position, every head of a position side by side in its block).
  absl::Status ReadLayerRowsBf16(int layer, absl::Span<const KvRowRef> rows, uint16_t* keys,
                                 uint16_t* values) override {
    const int hd = c_.head_dim;
    for (size_t i = 0; i < rows.size(); ++i) {
      const int64_t p = rows[i].position;
      if (p < 0 || p / kBlock >= static_cast<int64_t>((*blocks_)[layer].size())) {
        return absl::OutOfRangeError(absl::StrCat("no block holds position ", p));
      }
      const KvBlock& block = *(*blocks_)[layer][p / kBlock];
      if (block.dtype != BlockDType::kBF16) {
        return absl::FailedPreconditionError("bf16 rows asked of blocks of another type");
      }
      const size_t off = ((p % kBlock) * c_.num_kv_heads + rows[i].head) * hd;
      std::memcpy(keys + i * hd, &block.keys16[off], hd * sizeof(uint16_t));
      std::memcpy(values + i * hd, &block.values16[off], hd * sizeof(uint16_t));
    }
    return absl::OkStatus();
  }
  // Where rows lie, as Session::LocateLayerRows says it (only once locate is set: a device
  // then reads the rows of blocks in the pinned pool by address).
  void set_locate(bool locate) { locate_ = locate; }
  absl::Status LocateLayerRows(int layer, absl::Span<const KvRowRef> rows, BlockDType dtype,
                               const void** keys, const void** values,
                               std::vector<std::shared_ptr<const KvBlock>>* holds) override {
    const int hd = c_.head_dim;
    for (size_t i = 0; i < rows.size(); ++i) {
      keys[i] = values[i] = nullptr;
      const int64_t p = rows[i].position;
      if (!locate_) continue;
      if (p < 0 || p / kBlock >= static_cast<int64_t>((*blocks_)[layer].size())) {
        return absl::OutOfRangeError(absl::StrCat("no block holds position ", p));
      }
      const std::shared_ptr<const KvBlock>& block = (*blocks_)[layer][p / kBlock];
      if (block->dtype != dtype || !BlockIsPinned(*block)) continue;
      if (holds->empty() || holds->back() != block) holds->push_back(block);
      const size_t off = ((p % kBlock) * c_.num_kv_heads + rows[i].head) * hd;
      keys[i] = block->KeysAt(off);
      values[i] = block->ValuesAt(off);
    }
    return absl::OkStatus();
  }
  absl::Status ReadRowsBf16(int layer, int kv_head, absl::Span<const int64_t> positions,
                            uint16_t* keys, uint16_t* values) override {
    const int hd = c_.head_dim;
    return ForEachRow(layer, kv_head, positions, [&](const KvBlock& block, size_t off, size_t i) {
      if (block.dtype != BlockDType::kBF16) {
        return absl::FailedPreconditionError("bf16 rows asked of blocks of another type");
      }
      std::memcpy(keys + i * hd, &block.keys16[off], hd * sizeof(uint16_t));
      std::memcpy(values + i * hd, &block.values16[off], hd * sizeof(uint16_t));
      return absl::OkStatus();
    });
  }

 private:
  // row(block, offset of the head's row in it, i) for every positions[i].
  template <typename Row>
  absl::Status ForEachRow(int layer, int kv_head, absl::Span<const int64_t> positions,
                          const Row& row) {
    for (size_t i = 0; i < positions.size(); ++i) {
      if (positions[i] < 0 ||
          positions[i] / kBlock >= static_cast<int64_t>((*blocks_)[layer].size())) {
        return absl::OutOfRangeError(absl::StrCat("no block holds position ", positions[i]));
      }
      const KvBlock& block = *(*blocks_)[layer][positions[i] / kBlock];
      const size_t off = ((positions[i] % kBlock) * c_.num_kv_heads + kv_head) * c_.head_dim;
      if (absl::Status s = row(block, off, i); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  const ModelConfig& c_;
  const LayerBlocks* blocks_;
  bool locate_ = false;
};

// A hot set of positions 0..length-1 in every head whose rows live with the backend, read
// from `rows` when it uploads them.
KvCache HotSet(const ModelConfig& c, int64_t length, KvRowSource* rows) {
  KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim, KvCache::RowHome::kBackend);
  kv.set_row_source(rows);
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) {
      std::vector<int64_t>& p = kv.head(l, g).positions;
      p.resize(length);
      for (int64_t i = 0; i < length; ++i) p[i] = i;
    }
  }
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

// Writes `blocks` to a fresh cold store under `dir` as a session's blocks, then times reading
// every block back, as a page-in from cold does. Returns the blocks read; *read_s is the time
// taken.
absl::StatusOr<LayerBlocks> ColdRoundTrip(const ModelConfig& c, const LayerBlocks& blocks,
                                          const std::string& dir, double* read_s) {
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
      for (const std::shared_ptr<const KvBlock>& block : blocks[l]) {
        commit.blocks.push_back({{uid, l, block->index}, block, ComputeDigest(*block, kvh, hd)});
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
  LayerBlocks read(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    for (size_t b = 0; b < blocks[l].size(); ++b) {
      auto block = (*cold)->ReadBlock({uid, l, static_cast<int64_t>(b)}, kBlock, kvh, hd);
      if (!block.ok()) return block.status();
      read[l].push_back(*std::move(block));
    }
  }
  *read_s = Seconds(start);
  std::filesystem::remove_all(dir);
  return read;
}

int Run(int argc, char** argv) {
  std::vector<std::string> shapes = {"1b", "8b"};
  std::vector<int64_t> lengths = {1024, 4096, 16384, 32768};
  int steps = 20;
  DeviceDtype dtype = DeviceDtype::kBF16;
  bool graphs = true, profile = false;
  int64_t pinned_bytes = int64_t{8} << 30;
  int64_t base = 16384;
  std::vector<int64_t> turns = {256, 4096};
  int64_t probe_bytes = int64_t{1} << 30;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--pinned-bytes") {
      if (!absl::SimpleAtoi(value, &pinned_bytes) || pinned_bytes < 0)
        return std::fprintf(stderr, "bad --pinned-bytes\n"), 2;
    } else if (flag == "--shapes") {
      shapes = absl::StrSplit(value, ',');
    } else if (flag == "--lengths" || flag == "--turns") {
      std::vector<int64_t>& list = flag == "--lengths" ? lengths : turns;
      list.clear();
      for (const auto& part : absl::StrSplit(value, ',')) {
        int64_t v;
        if (!absl::SimpleAtoi(part, &v) || v <= 0)
          return std::fprintf(stderr, "bad %s\n", flag.c_str()), 2;
        list.push_back(v);
      }
    } else if (flag == "--base" || flag == "--probe-bytes") {
      int64_t& v = flag == "--base" ? base : probe_bytes;
      if (!absl::SimpleAtoi(value, &v) || v < (flag == "--base" ? 64 : 1 << 20))
        return std::fprintf(stderr, "bad %s (at least %d)\n", flag.c_str(),
                            flag == "--base" ? 64 : 1 << 20),
               2;
    } else if (flag == "--steps") {
      if (!absl::SimpleAtoi(value, &steps) || steps <= 0)
        return std::fprintf(stderr, "bad --steps\n"), 2;
    } else if (flag == "--graphs" || flag == "--profile") {
      if (value != "0" && value != "1")
        return std::fprintf(stderr, "%s takes 0 or 1\n", argv[i]), 2;
      (flag == "--graphs" ? graphs : profile) = value == "1";
    } else if (flag == "--dtype") {
      auto d = ParseDeviceDtype(value);
      if (!d.ok())
        return std::fprintf(stderr, "%s\n", std::string(d.status().message()).c_str()), 2;
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
  const double copy_gbps = DeviceCopyGbps(probe_bytes);
  const double pinned_gbps = PinnedUploadGbps(probe_bytes);
  const size_t elem = dtype == DeviceDtype::kF32 ? 4 : 2;  // bf16 and f16: 2 bytes
  std::printf("device: %s; dtype %s\n", prop.name, DeviceDtypeName(dtype));
  std::printf("device-to-device copy: %.0f GB/s (read + write); pinned host->device: %.1f GB/s\n\n",
              copy_gbps, pinned_gbps);

  for (const std::string& name : shapes) {
    absl::StatusOr<ModelShape> named = NamedModelShape(name);
    if (!named.ok()) {
      std::fprintf(stderr, "%s\n", std::string(named.status().message()).c_str());
      return 2;
    }
    const ModelShape& shape = *named;
    const ModelConfig& c = shape.config;
    auto backend = CreateCudaBackend(c, nullptr,
                                     {.dtype = dtype,
                                      .cuda_graphs = graphs,
                                      .random_weights_seed = 7,
                                      .pinned_block_bytes = pinned_bytes,
                                      .profile_ops = profile});
    if (!backend.ok()) {
      std::fprintf(stderr, "%s: %s\n", shape.name.c_str(), backend.status().ToString().c_str());
      return 1;
    }
    Backend& b = **backend;
    const double weight_bytes = WeightBytesPerToken(c, elem);
    std::printf("## %s (random weights, %.2f GB read per token)\n\n", shape.name.c_str(),
                weight_bytes / 1e9);
    std::vector<OpTable> decode_ops;  // per length
    std::printf("| hot tokens/head | ms/token | floor ms | roofline share |\n");
    std::printf("| ---: | ---: | ---: | ---: |\n");
    for (int64_t length : lengths) {
      const LayerBlocks blocks = RandomBlocks(c, length, b.KvDType());
      BlockRows rows(c, &blocks);
      KvCache kv = HotSet(c, length, &rows);
      ForwardResult r;
      int64_t pos = length;
      std::vector<int32_t> token = {1};
      for (int i = 0; i < 3; ++i) {  // the first step uploads the hot set
        absl::Status s = b.Forward(token, pos++, &kv, {}, &r);
        if (!s.ok()) return std::fprintf(stderr, "decode: %s\n", s.ToString().c_str()), 1;
      }
      TakeCudaOpProfile(b);
      OpTable ops;
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < steps; ++i) {
        token[0] = static_cast<int32_t>(r.logits.empty() ? 1 : (i * 7919) % c.vocab_size);
        absl::Status s = b.Forward(token, pos++, &kv, {}, &r);
        if (!s.ok()) return std::fprintf(stderr, "decode: %s\n", s.ToString().c_str()), 1;
      }
      const double ms = Seconds(start) * 1e3 / steps;
      ops.Add(b);
      decode_ops.push_back(std::move(ops));
      const double floor_ms =
          (weight_bytes + HotKvBytes(c, length + 3 + steps / 2, elem)) / (copy_gbps * 1e9) * 1e3;
      std::printf("| %lld | %.3f | %.3f | %.2f |\n", static_cast<long long>(length), ms, floor_ms,
                  floor_ms / ms);
    }

    for (size_t i = 0; i < decode_ops.size(); ++i) {
      decode_ops[i].Print(absl::StrCat("decode at ", lengths[i], " hot tokens/head").c_str(),
                          steps);
    }

    // Turn append onto a `base`-token (16K) hot set. Compaction is the host's (positions only, as a
    // session on the GPU does) plus the device's gather, which runs at the start of the next
    // pass: the next one-token pass minus a plain one.
    std::printf(
        "\n| turn onto %lld | prefill ms | SnapKV ms | compaction ms (host + gather) "
        "| turn ms | SnapKV share |\n",
        static_cast<long long>(base));
    std::printf("| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    const LayerBlocks warm = RandomBlocks(c, base, b.KvDType());
    BlockRows warm_rows(c, &warm);
    const int budget = static_cast<int>(base / 4);
    const SnapKvOptions snap{.window = std::min(32, budget / 2),
                             .kernel = 7,
                             .pooling = Pooling::kMax,
                             .budget = budget};
    std::vector<int32_t> one = {1};
    for (int64_t turn : turns) {
      if (turn < snap.window) {
        return std::fprintf(stderr, "each --turns value must be at least the SnapKV window (%d)\n",
                            snap.window),
               2;
      }
      double prefill_ms = 0, select_ms = 0, host_ms = 0, gather_ms = 0;
      const int reps = 3;
      OpTable prefill_ops, select_ops, gather_ops;
      {  // Untimed: the first pass of a shape loads its cuBLAS kernels.
        KvCache kv = HotSet(c, base, &warm_rows);
        ForwardResult r;
        std::vector<int32_t> tokens(turn, 1);
        if (!b.Forward(one, base, &kv, {}, &r).ok() ||
            !b.Forward(tokens, base + 1, &kv, {.observe_last = snap.window}, &r).ok()) {
          return 1;
        }
      }
      for (int rep = 0; rep < reps; ++rep) {
        KvCache kv = HotSet(c, base, &warm_rows);
        ForwardResult r;
        if (!b.Forward(one, base, &kv, {}, &r).ok()) return 1;  // uploads the hot set
        std::vector<int32_t> tokens(turn);
        for (int64_t i = 0; i < turn; ++i)
          tokens[i] = static_cast<int32_t>((i * 31 + rep) % c.vocab_size);
        TakeCudaOpProfile(b);
        auto start = std::chrono::steady_clock::now();
        absl::Status s = b.Forward(tokens, base + 1, &kv, {.observe_last = snap.window}, &r);
        if (!s.ok()) return std::fprintf(stderr, "append: %s\n", s.ToString().c_str()), 1;
        prefill_ms += Seconds(start) * 1e3;
        prefill_ops.Add(b);
        kv.DropFreshBefore(base + 1 + turn);  // the session moves them into blocks
        start = std::chrono::steady_clock::now();
        auto keep = b.SelectSnapKv(kv, snap, r.observed_queries, snap.window,
                                   r.observed_queries_on_backend);
        if (!keep.ok())
          return std::fprintf(stderr, "snapkv: %s\n", keep.status().ToString().c_str()), 1;
        select_ms += Seconds(start) * 1e3;
        select_ops.Add(b);
        start = std::chrono::steady_clock::now();
        for (int l = 0; l < c.num_layers; ++l) {
          for (int g = 0; g < c.num_kv_heads; ++g) {
            HeadKv& h = kv.head(l, g);
            const std::vector<int64_t>& k = (*keep)[l * c.num_kv_heads + g];
            for (size_t i = 0; i < k.size(); ++i) h.positions[i] = h.positions[k[i]];
            h.positions.resize(k.size());
          }
        }
        host_ms += Seconds(start) * 1e3;
        int64_t pos = base + 1 + turn;
        start = std::chrono::steady_clock::now();
        TakeCudaOpProfile(b);
        if (!b.Forward(one, pos++, &kv, {}, &r).ok()) return 1;  // gathers, then one step
        gather_ops.Add(b);
        const double next_ms = Seconds(start) * 1e3;
        start = std::chrono::steady_clock::now();
        if (!b.Forward(one, pos++, &kv, {}, &r).ok()) return 1;
        gather_ms += std::max(0.0, next_ms - Seconds(start) * 1e3);
      }
      prefill_ms /= reps;
      select_ms /= reps;
      host_ms /= reps;
      gather_ms /= reps;
      const double compact_ms = host_ms + gather_ms;
      const double total = prefill_ms + select_ms + compact_ms;
      std::printf("| %lld | %.2f | %.2f | %.2f (%.2f + %.2f) | %.2f | %.3f |\n",
                  static_cast<long long>(turn), prefill_ms, select_ms, compact_ms, host_ms,
                  gather_ms, total, select_ms / total);
      prefill_ops.Print(absl::StrCat("prefill of ", turn, " tokens onto ", base).c_str(), reps);
      select_ops.Print(absl::StrCat("SnapKV selection after ", turn, " tokens").c_str(), reps);
      gather_ops.Print(
          absl::StrCat("the step after selection (gathers the kept rows), ", turn, " tokens")
              .c_str(),
          reps);
    }

    // Page-in of a paged-out 16K-token hot set from blocks in host memory: the first pass reads
    // its rows back and uploads them. Every block so far is pageable (no session registered
    // their size with the pinned pool): their rows are packed into the staging slots.
    // Timed as the first pass minus a plain step.
    std::printf(
        "\n| page-in of %lld tokens/head | source ms | upload ms | total ms | GB/s of device "
        "KV | share of pinned host->device | rows by address |\n",
        static_cast<long long>(base));
    std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    const double bytes = HotKvBytes(c, base, elem);
    auto page_in = [&](const char* what, BlockRows& rows, double source_s) -> bool {
      KvCache kv = HotSet(c, base, &rows);
      ForwardResult r;
      const int64_t by_address = GetCudaUploadStats(b).rows_by_address;
      auto start = std::chrono::steady_clock::now();
      if (!b.Forward(one, base, &kv, {}, &r).ok()) return false;
      const double first_s = Seconds(start);
      start = std::chrono::steady_clock::now();
      if (!b.Forward(one, base + 1, &kv, {}, &r).ok()) return false;
      const double upload_s = std::max(first_s - Seconds(start), 1e-9);
      const double total_s = source_s + upload_s;
      const double gbps = bytes / total_s / 1e9;
      std::printf("| %s | %.1f | %.1f | %.1f | %.1f | %.2f | %lld |\n", what, source_s * 1e3,
                  upload_s * 1e3, total_s * 1e3, gbps, gbps / pinned_gbps,
                  static_cast<long long>(GetCudaUploadStats(b).rows_by_address - by_address));
      return true;
    };
    if (!page_in("warm, pageable blocks (packed)", warm_rows, 0)) return 1;
    // The same hot set from blocks in the pinned pool, read by the device where they lie.
    const BlockDType block_dtype = b.KvDType();
    RegisterBlockBytes(static_cast<size_t>(kBlock) * c.num_kv_heads * c.head_dim *
                       BlockValueBytes(block_dtype));
    {
      const LayerBlocks pinned = RandomBlocks(c, base, block_dtype);
      BlockRows pinned_rows(c, &pinned);
      pinned_rows.set_locate(true);
      if (!page_in("warm, pinned blocks (by address)", pinned_rows, 0)) return 1;
    }
    // From cold: the blocks written to RocksDB and block files, read back (into the pinned
    // pool while it has room), then uploaded.
    double read_s = 0;
    const std::string dir =
        (std::filesystem::temp_directory_path() / "kvmem-cuda-bench-cold").string();
    absl::StatusOr<LayerBlocks> read = ColdRoundTrip(c, warm, dir, &read_s);
    if (!read.ok()) {
      std::fprintf(stderr, "cold: %s\n", read.status().ToString().c_str());
      return 1;
    }
    BlockRows cold_rows(c, &*read);
    cold_rows.set_locate(true);
    if (!page_in("cold (read, then uploaded)", cold_rows, read_s)) return 1;
    const PinnedBlockPoolStats pool = GetPinnedBlockPoolStats();
    std::printf(
        "\ncold read: %.2f GB/s of stored blocks; pinned pool: %.2f GB pinned, %lld blocks' "
        "K or V left on the heap\n\n",
        HotKvBytes(c, base, BlockValueBytes(block_dtype)) / read_s / 1e9, pool.pinned_bytes / 1e9,
        static_cast<long long>(pool.heap_fallbacks));
  }
  return 0;
}

}  // namespace
}  // namespace kvmem

int main(int argc, char** argv) {
  kvmem::ShareOneMallocArena();  // as kvmemd does
  return kvmem::Run(argc, argv);
}
