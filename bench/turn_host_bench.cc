// The host's share of a turn on a device backend, at Llama-3-8B (or 3.2-1B) shape, on any
// machine: the device's work is replaced by a stand-in that does only the host side of the
// CUDA backend's contract (positions and fresh rows in, recall scores and SnapKV picks out), so
// what is timed is the session's own work around the GPU: recall bookkeeping and block reads,
// block filling and digests, the policy's compaction of positions and the durable commit to a
// fsync'd RocksDB store. Printed per turn and as a share of the 15 ms turn target of a 256-token
// turn on 8B (issue 6); the GPU's own time comes on top.
//   build/bin/turn_host_bench [--shape 8b|1b] [--history 16384] [--turns 8] [--budget 4096]
//                             [--recall 8] [--data DIR] [--block-files 0|1] [--turn-tokens 256]
//                             [--block-dtype bf16|f32] [--warm-bytes 4294967296]
//                             [--pinned-bytes 0]
// --pinned-bytes N > 0 puts blocks in a pool of N bytes of plain memory standing in for the
// CUDA backend's pinned one (engine/block_memory.h), and times locating a page-in's rows there
// (what the host does when the device reads them by address).
// The history is built from turns of about 256 tokens; the measured turns have about
// --turn-tokens tokens (the sizes are 256 and 4096).
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/model_shapes.h"
#include "engine/backend.h"
#include "engine/block_memory.h"
#include "engine/malloc_arenas.h"
#include "engine/model.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"
#include "service/session_manager.h"
#include "tests/plain_pinner.h"  // plain memory standing in for pinned

namespace kvmem {
namespace {

// The host side of a device backend with the device's arithmetic left out. Rows are zeros
// (bf16-exact, as a bf16 device's are); recall scores and SnapKV picks are spread
// deterministically over the candidates so that recall reads blocks and eviction is scattered.
class StandInBackend : public Backend {
 public:
  StandInBackend(const ModelConfig& c, BlockDType blocks) : c_(c), blocks_(blocks) {}
  const char* name() const override { return "stand-in"; }
  bool KeepsHotRows() const override { return true; }
  // Its rows are bf16 values, as a bf16 device's are; sessions keep bf16 blocks (or f32 ones,
  // to compare: --block-dtype f32).
  BlockDType KvDType() const override { return blocks_; }
  int64_t HotEntryBytes(int head_dim) const override { return 4 * head_dim + 8; }

  absl::Status Forward(absl::Span<const int32_t> tokens, int64_t start_pos, KvCache* kv,
                       const ForwardOptions& options, ForwardResult* result) override {
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int64_t qd = c_.q_dim(), kvd = c_.kv_dim();
    if (kv->host_rows()) return absl::FailedPreconditionError("stand-in needs kBackend caches");
    // Its "device copy": present from the first pass on, as the CUDA backend's is. A restored
    // or paged-in session's copy is built from its blocks: the host's share of that is reading
    // every hot row back in the device's type, as the CUDA backend's upload does.
    if (kv->attachment() == nullptr) {
      if (absl::Status s = ReadBackHotSet(*kv); !s.ok()) return s;
      kv->set_attachment(std::make_shared<int>(0));
    }
    const int observed = static_cast<int>(std::min<int64_t>(options.observe_last, n));
    result->observed_queries.assign(observed > 0 ? c_.num_layers : 0, {});
    // New rows come back in the device's type: bf16 bits (or f32, for --block-dtype f32).
    const size_t row_bytes = blocks_ == BlockDType::kF32 ? sizeof(float) : sizeof(uint16_t);
    std::vector<char> rows(n * kvd * row_bytes, 0);
    std::vector<float> q;
    for (int l = 0; l < c_.num_layers; ++l) {
      if (options.before_attention) {
        // The CUDA backend downloads the layer's queries the hook asks for here.
        const int64_t rows =
            options.hook_query_rows > 0 ? std::min<int64_t>(options.hook_query_rows, n) : n;
        q.assign(rows * qd, 0.01f);
        if (absl::Status s = options.before_attention(l, q.data(), rows, kv); !s.ok()) return s;
      }
      kv->AppendFresh(l, start_pos, n, blocks_, rows.data(), rows.data());
      for (int g = 0; g < c_.num_kv_heads; ++g) {
        std::vector<int64_t>& p = kv->head(l, g).positions;
        for (int64_t t = 0; t < n; ++t) p.push_back(start_pos + t);
      }
      if (observed > 0)
        result->observed_queries[l].assign(c_.num_heads * observed * c_.head_dim, 0.f);
    }
    result->logits.assign(c_.vocab_size, 0.f);
    result->logits[1 + (start_pos % (c_.vocab_size - 1))] = 1.f;
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<float>> ScoreRecallBlocks(
      const KvCache& kv, int layer, const float* q, int64_t n, int w,
      const std::vector<std::vector<float>>& digests) override {
    const int64_t blocks = static_cast<int64_t>(digests.size());
    std::vector<float> scores(c_.num_kv_heads * blocks);
    for (size_t i = 0; i < scores.size(); ++i) {
      scores[i] = static_cast<float>((i * 2654435761u + layer * 97u) % 1000003u);
    }
    return scores;
  }

  // The last read-back of a whole hot set (a page-in's host work): median ms by layer (rows
  // ordered by position, as the CUDA backend reads them) and head by head, and the rows.
  double readback_ms(bool by_layer) const { return readback_ms_[by_layer ? 1 : 0]; }
  // The same rows located in their blocks instead (KvCache::LocateLayerRows): the host's work
  // of a page-in whose blocks are in the pinned pool, which the device reads by address.
  double locate_ms() const { return readback_ms_[2]; }
  int64_t readback_rows() const { return readback_rows_; }

  // Keeps the window and `budget - w` candidates spread evenly over the head.
  absl::StatusOr<std::vector<std::vector<int64_t>>> SelectSnapKv(
      const KvCache& kv, const SnapKvOptions& options,
      const std::vector<std::vector<float>>& queries, int w, uint64_t) override {
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      for (int g = 0; g < kv.num_kv_heads(); ++g) {
        const int64_t n = kv.head(l, g).size(), candidates = n - w;
        const int64_t take = std::min<int64_t>(options.budget, n) - w;
        std::vector<int64_t>& k = keep.emplace_back();
        k.reserve(take + w);
        for (int64_t j = 0; j < take; ++j) k.push_back(j * candidates / std::max<int64_t>(take, 1));
        for (int64_t i = candidates; i < n; ++i) k.push_back(i);
      }
    }
    return keep;
  }

 private:
  // Every hot row of every head read back as bf16 bits (f32 for f32 blocks) on the shared
  // thread pool: the CUDA backend's upload packing, without the copy to the device. Done 5
  // times each way, alternated: by layer (the backend's way), head by head (its former way),
  // and located by layer (where the device reads pinned blocks by address).
  // The rows each unit reads are listed before the timing (the backend merges its heads'
  // sorted positions as it goes; sorting them here would be the bench's own cost).
  absl::Status ReadBackHotSet(const KvCache& kv) {
    const int kvh = kv.num_kv_heads();
    std::vector<std::vector<KvRowRef>> unit_refs[2];  // head by head, by layer
    for (int by_layer = 0; by_layer < 2; ++by_layer) {
      const int units = by_layer ? kv.num_layers() : kv.num_layers() * kvh;
      for (int u = 0; u < units; ++u) {
        const int layer = by_layer ? u : u / kvh;
        std::vector<KvRowRef>& refs = unit_refs[by_layer].emplace_back();
        for (int g = by_layer ? 0 : u % kvh; g < (by_layer ? kvh : u % kvh + 1); ++g) {
          for (int64_t p : kv.head(layer, g).positions) refs.push_back({p, g});
        }
        if (by_layer) {
          std::sort(refs.begin(), refs.end(), [](const KvRowRef& x, const KvRowRef& y) {
            return x.position != y.position ? x.position < y.position : x.head < y.head;
          });
        }
      }
    }
    std::vector<double> times[3];
    const int modes = PinnedBlockPoolInstalled() ? 3 : 2;
    for (int rep = 0; rep < 5 * modes; ++rep) {
      const int mode = rep % modes;  // 0 head by head, 1 by layer, 2 located by layer
      const auto start = std::chrono::steady_clock::now();
      KVMEM_RETURN_IF_ERROR(ReadBackOnce(kv, unit_refs[mode >= 1 ? 1 : 0], mode >= 1, mode == 2));
      times[mode].push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count());
    }
    for (int i = 0; i < modes; ++i) {
      std::sort(times[i].begin(), times[i].end());
      readback_ms_[i] = times[i][times[i].size() / 2];
    }
    return absl::OkStatus();
  }

  // By layer: all heads' rows ordered by position, in runs of up to 4096 rows; head by head:
  // runs of up to 512 rows of one head.
  absl::Status ReadBackOnce(const KvCache& kv, const std::vector<std::vector<KvRowRef>>& unit_refs,
                            bool by_layer, bool locate) {
    const int kvh = kv.num_kv_heads();
    const int64_t hd = kv.head_dim();
    const int64_t run = by_layer ? 4096 : 512;
    std::mutex mu;
    absl::Status error;
    int64_t rows = 0;
    const int units = by_layer ? kv.num_layers() : kv.num_layers() * kvh;
    SharedThreadPool().ParallelFor(units, [&](int64_t begin, int64_t end) {
      std::vector<uint16_t> k16(run * hd), v16(run * hd);
      std::vector<float> k32(run * hd), v32(run * hd);
      std::vector<const void*> kp(run), vp(run);
      std::vector<std::shared_ptr<const KvBlock>> holds;
      int64_t done = 0;
      absl::Status s;
      for (int64_t u = begin; u < end && s.ok(); ++u) {
        const int layer = static_cast<int>(by_layer ? u : u / kvh);
        const std::vector<KvRowRef>& refs = unit_refs[u];
        std::vector<int64_t> positions;
        for (size_t at = 0; at < refs.size() && s.ok(); at += run) {
          const auto part = absl::MakeConstSpan(refs).subspan(at, run);
          if (locate) {
            holds.clear();
            s = kv.LocateLayerRows(layer, part, blocks_, kp.data(), vp.data(), &holds);
            for (size_t i = 0; s.ok() && i < part.size(); ++i) {
              if (kp[i] == nullptr) s = absl::InternalError("a hot row is in no block");
            }
          } else if (by_layer) {
            s = blocks_ == BlockDType::kF32
                    ? kv.ReadLayerRows(layer, part, k32.data(), v32.data())
                    : kv.ReadLayerRowsBf16(layer, part, k16.data(), v16.data());
          } else {
            positions.clear();
            for (const KvRowRef& r : part) positions.push_back(r.position);
            const int head = part[0].head;
            s = blocks_ == BlockDType::kF32
                    ? kv.ReadRows(layer, head, positions, k32.data(), v32.data())
                    : kv.ReadRowsBf16(layer, head, positions, k16.data(), v16.data());
          }
          done += static_cast<int64_t>(part.size());
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      rows += done;
      if (!s.ok()) error = s;
    });
    readback_rows_ = rows;
    return error;
  }

  ModelConfig c_;
  BlockDType blocks_;
  double readback_ms_[3] = {0, 0, 0};
  int64_t readback_rows_ = 0;
};

int64_t MinorFaults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

double Ms(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// The bytes under a store: its RocksDB log files, its RocksDB tables and its block files, in MB.
std::string StoreSizes(const std::string& dir) {
  double log = 0, table = 0, blocks = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir, ec)) {
    if (!e.is_regular_file(ec)) continue;
    const uintmax_t bytes = e.file_size(ec);
    if (ec) continue;
    const double mb = static_cast<double>(bytes) / (1 << 20);
    const std::string name = e.path().filename().string();
    if (e.path().parent_path().filename() == "kvblocks") {
      blocks += mb;
    } else if (name.ends_with(".log")) {
      log += mb;
    } else if (name.ends_with(".sst")) {
      table += mb;
    }
  }
  return absl::StrFormat("%.0f MB of log, %.0f MB of tables, %.0f MB of block files", log, table,
                         blocks);
}

int Run(int argc, char** argv) {
  std::string shape = "8b", data;
  int64_t history = 16384;
  int turns = 8, budget = 4096, recall = 8, turn_tokens = 256;
  bool block_files = true;
  BlockDType block_dtype = BlockDType::kBF16;
  int64_t warm_bytes = int64_t{4} << 30;
  int64_t pinned_bytes = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    bool ok = true;
    if (flag == "--shape") {
      shape = value;
    } else if (flag == "--history") {
      ok = absl::SimpleAtoi(value, &history);
    } else if (flag == "--turns") {
      ok = absl::SimpleAtoi(value, &turns);
    } else if (flag == "--budget") {
      ok = absl::SimpleAtoi(value, &budget);
    } else if (flag == "--turn-tokens") {
      ok = absl::SimpleAtoi(value, &turn_tokens) && turn_tokens > 0 && turn_tokens <= 8000;
    } else if (flag == "--recall") {
      ok = absl::SimpleAtoi(value, &recall);
    } else if (flag == "--data") {
      data = value;
    } else if (flag == "--warm-bytes") {
      ok = absl::SimpleAtoi(value, &warm_bytes) && warm_bytes >= 0;
    } else if (flag == "--pinned-bytes") {
      ok = absl::SimpleAtoi(value, &pinned_bytes) && pinned_bytes >= 0;
    } else if (flag == "--block-dtype") {
      ok = value == "bf16" || value == "f32";
      block_dtype = value == "f32" ? BlockDType::kF32 : BlockDType::kBF16;
    } else if (flag == "--block-files") {
      block_files = value == "1" || value == "true";
    } else {
      ok = false;
    }
    if (!ok) return std::fprintf(stderr, "bad flag %s %s\n", flag.c_str(), value.c_str()), 2;
  }
  absl::StatusOr<ModelShape> named = NamedModelShape(shape);
  if (!named.ok())
    return std::fprintf(stderr, "%s\n", std::string(named.status().message()).c_str()), 2;
  const ModelConfig c = named->config;
  // Any sentencepiece model tokenizes the text; its ids are valid in the 128256-entry vocab.
  auto dir = ResolveModelDir("");
  if (!dir.ok())
    return std::fprintf(stderr, "%s\n", std::string(dir.status().message()).c_str()), 1;
  std::string error;
  auto tokenizer = Tokenizer::LoadSentencePiece(*dir + "/tokenizer.model", &error);
  if (tokenizer == nullptr) return std::fprintf(stderr, "tokenizer: %s\n", error.c_str()), 1;
  std::unique_ptr<Model> model = Model::Shaped(c, std::move(tokenizer));
  if (pinned_bytes > 0) {
    absl::Status s =
        InstallPinnedBlockPool(std::make_unique<PlainPinner>(), {.max_bytes = pinned_bytes});
    if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 2;
  }
  StandInBackend backend(c, block_dtype);

  if (data.empty())
    data = (std::filesystem::temp_directory_path() / "kvmem-turn-host-bench").string();
  std::filesystem::remove_all(data);
  SessionManagerOptions options;
  options.data_dir = data;
  options.cold_block_files = block_files;
  options.warm_bytes = warm_bytes;
  options.session_defaults.memory = {.policy = "snapkv", .budget = budget, .window = 32};
  options.session_defaults.recall_blocks = recall;
  options.session_defaults.max_turn_tokens = 8192;
  auto manager = SessionManager::Open(*model, backend, options);
  if (!manager.ok()) return std::fprintf(stderr, "%s\n", manager.status().ToString().c_str()), 1;
  if (!(*manager)->CreateSession({.session_id = "bench"}).ok()) return 1;

  // Text of about `tokens` tokens with the stories tokenizer (about 3.1 characters a token).
  auto text_of = [](int tokens) {
    std::string text;
    while (text.size() < static_cast<size_t>(tokens) * 3.5) {
      text += "The little dog ran to the park with his red ball and played with his friend. ";
    }
    return text;
  };
  const std::string history_text = text_of(256), turn_text = text_of(turn_tokens);
  const std::string* text = &history_text;
  auto append = [&](AppendResult* out) -> absl::Status {
    auto r = (*manager)->AppendTurn({.session_id = "bench", .content = *text});
    if (!r.ok()) return r.status();
    *out = *r;
    return absl::OkStatus();
  };
  AppendResult r;
  const auto build = std::chrono::steady_clock::now();
  while (r.total_tokens < history) {
    if (absl::Status s = append(&r); !s.ok())
      return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
  }
  std::printf(
      "shape %s (%d layers x %d KV heads x %d), snapkv budget %d, recall %d blocks, "
      "fsync'd RocksDB under %s; history of %lld tokens built in %.1f s\n",
      shape.c_str(), c.num_layers, c.num_kv_heads, c.head_dim, budget, recall, data.c_str(),
      static_cast<long long>(r.total_tokens), Ms(build) / 1e3);
  std::printf(
      "| turn tokens | host ms/turn | recall + stand-in | select | commit | other (fill, "
      "digests) | blocks recalled | MB faulted in | share of 15 ms |\n");
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  double total = 0, prefill = 0, select = 0, commit = 0;
  int64_t tokens = 0, recalled = 0;
  text = &turn_text;
  // Memory the turns touch for the first time (minor page faults): on most machines each fresh
  // page costs far more than reusing one, so this is a cost of its own.
  const int64_t faults = MinorFaults();
  for (int t = 0; t < turns; ++t) {
    const auto start = std::chrono::steady_clock::now();
    if (absl::Status s = append(&r); !s.ok())
      return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
    total += Ms(start);
    prefill += r.prefill_ms;
    select += r.select_ms;
    commit += r.commit_ms;
    tokens += r.turn_tokens;
    recalled += r.recalled_blocks;
  }
  const double per = total / turns;
  const double faulted_mb = static_cast<double>(MinorFaults() - faults) *
                            static_cast<double>(sysconf(_SC_PAGESIZE)) / (1 << 20) / turns;
  std::printf("| %lld | %.2f | %.2f | %.2f | %.2f | %.2f | %lld | %.1f | %.2f |\n",
              static_cast<long long>(tokens / turns), per, prefill / turns, select / turns,
              commit / turns, (total - prefill - select - commit) / turns,
              static_cast<long long>(recalled / turns), faulted_mb, per / 15.0);
  // A restart: the session is restored from the store alone (the hot set's blocks are read and
  // checked for the device's first upload), as after a crash or for a paged-out session whose
  // blocks have left warm.
  manager->reset();
  const std::string closed_sizes = StoreSizes(data);
  const auto reopen = std::chrono::steady_clock::now();
  manager = SessionManager::Open(*model, backend, options);
  if (!manager.ok()) return std::fprintf(stderr, "%s\n", manager.status().ToString().c_str()), 1;
  const double reopen_ms = Ms(reopen);
  std::printf("reopen of the store after a restart: %.1f ms; the closed store held %s\n", reopen_ms,
              closed_sizes.c_str());
  const auto restore = std::chrono::steady_clock::now();
  auto info = (*manager)->GetSession("", "bench");
  if (!info.ok()) return std::fprintf(stderr, "%s\n", info.status().ToString().c_str()), 1;
  const double restore_ms = Ms(restore);
  // The hot rows a device uploads after the restore, in bf16.
  const double hot_gb = info->stats.hot_tokens * 2.0 * c.head_dim * 2 / 1e9;
  std::printf(
      "restore after a restart (resident: %s): %.1f ms to read and check the blocks of %lld hot "
      "entries (%.2f GB of bf16 rows, %.2f GB/s)\n",
      info->resident ? "yes" : "no", restore_ms, static_cast<long long>(info->stats.hot_tokens),
      hot_gb, hot_gb / (restore_ms / 1e3));
  // The next turn builds the device copy from the blocks the restore read: the host's share of
  // a page-in (the copies to the device come on top, at pinned-copy bandwidth).
  text = &turn_text;
  if (absl::Status s = append(&r); !s.ok())
    return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
  const double readback_gb =
      backend.readback_rows() * 2.0 * c.head_dim * (block_dtype == BlockDType::kF32 ? 4 : 2) / 1e9;
  std::printf(
      "page-in read-back on the host (%d threads, %lld rows, %.2f GB of %s rows, median "
      "of 5):\n",
      SharedThreadPool().size(), static_cast<long long>(backend.readback_rows()), readback_gb,
      block_dtype == BlockDType::kF32 ? "f32" : "bf16");
  for (bool by_layer : {true, false}) {
    std::printf("  %s: %.1f ms, %.2f GB/s\n",
                by_layer ? "by layer, ordered by position" : "head by head",
                backend.readback_ms(by_layer), readback_gb / (backend.readback_ms(by_layer) / 1e3));
  }
  std::printf("  by layer / head by head: %.2fx\n",
              backend.readback_ms(false) / backend.readback_ms(true));
  if (pinned_bytes > 0) {
    const PinnedBlockPoolStats pool = GetPinnedBlockPoolStats();
    std::printf(
        "  located only (blocks in the pool, read by the device by address): %.1f ms, %.1fx less "
        "host time than reading by layer (pool: %.2f GB, %lld pieces on the heap)\n",
        backend.locate_ms(), backend.readback_ms(true) / backend.locate_ms(),
        pool.pinned_bytes / 1e9, static_cast<long long>(pool.heap_fallbacks));
  }
  manager->reset();
  std::filesystem::remove_all(data);
  return 0;
}

}  // namespace
}  // namespace kvmem

int main(int argc, char** argv) {
  kvmem::ShareOneMallocArena();  // as kvmemd does
  return kvmem::Run(argc, argv);
}
