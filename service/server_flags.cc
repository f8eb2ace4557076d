#include "service/server_flags.h"

#include <limits>
#include <type_traits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kvmem {
namespace {

FlagSpec StringFlag(std::string name, std::string value_name, std::string help,
                    std::string* field) {
  return {std::move(name), std::move(value_name), std::move(help),
          [field](std::string_view value) {
            *field = std::string(value);
            return absl::OkStatus();
          },
          [field] { return field->empty() ? std::string("\"\"") : *field; }};
}

template <typename Int>
FlagSpec IntFlag(std::string name, std::string value_name, std::string help, Int* field) {
  static_assert(std::is_integral_v<Int>);
  return {name, std::move(value_name), std::move(help),
          [name, field](std::string_view value) {
            Int parsed;
            if (!absl::SimpleAtoi(absl::string_view(value.data(), value.size()), &parsed)) {
              return absl::InvalidArgumentError(absl::StrCat(
                  "--", name, " must be an integer, got \"", std::string(value), "\""));
            }
            *field = parsed;
            return absl::OkStatus();
          },
          [field] { return absl::StrCat(*field); }};
}

FlagSpec BoolFlag(std::string name, std::string help, bool* field) {
  return {name, "true|false", std::move(help),
          [name, field](std::string_view value) {
            if (value == "true" || value == "1") {
              *field = true;
            } else if (value == "false" || value == "0") {
              *field = false;
            } else {
              return absl::InvalidArgumentError(absl::StrCat(
                  "--", name, " must be true or false, got \"", std::string(value), "\""));
            }
            return absl::OkStatus();
          },
          [field] { return std::string(*field ? "true" : "false"); }};
}

FlagSpec PoolingFlag(std::string name, std::string help, Pooling* field) {
  return {name, "max|avg", std::move(help),
          [name, field](std::string_view value) {
            if (value == "max") {
              *field = Pooling::kMax;
            } else if (value == "avg") {
              *field = Pooling::kAvg;
            } else {
              return absl::InvalidArgumentError(absl::StrCat(
                  "--", name, " must be max or avg, got \"", std::string(value), "\""));
            }
            return absl::OkStatus();
          },
          [field] { return std::string(*field == Pooling::kAvg ? "avg" : "max"); }};
}

}  // namespace

std::vector<FlagSpec> KvmemdFlags(KvmemdOptions* o) {
  SessionManagerOptions& s = o->sessions;
  SessionOptions& d = s.session_defaults;
  return {
      // Server.
      StringFlag("model", "DIR", "model directory (Hugging Face layout)", &o->model),
      StringFlag("listen", "HOST:PORT", "address to serve on; port 0 picks a free port",
                 &o->listen),
      IntFlag("threads", "N", "worker threads for engine work (0 = one per core)", &o->threads),
      IntFlag("backend-threads", "N", "CPU backend threads per forward pass (0 = one per core)",
              &o->backend_threads),
      StringFlag("device", "cpu|cuda|auto", "compute backend (auto: CUDA when available, else CPU)",
                 &o->device),
      StringFlag("device-dtype", "bf16|f16|f32", "weights and KV type on the GPU",
                 &o->device_dtype),
      IntFlag("pinned-bytes", "N",
              "GPU: pinned host RAM for KV blocks, read in place by page-ins and recalls "
              "(-1 = warm-bytes + 25%, 0 = off)",
              &o->pinned_bytes),
      StringFlag("auth-tokens", "FILE",
                 "lines \"TOKEN TENANT [read-only]\"; calls then need "
                 "\"authorization: Bearer TOKEN\"",
                 &o->auth_tokens),
      IntFlag("shutdown-grace-ms", "MS",
              "on SIGTERM/SIGINT, time in-flight calls get before they are cancelled",
              &o->shutdown_grace_ms),
      // Storage and limits.
      StringFlag("data-dir", "DIR", "session store directory (\"\" = in memory only)", &s.data_dir),
      BoolFlag("sync", "fsync every commit before the call returns", &s.sync),
      IntFlag("warm-bytes", "N", "host RAM for warm KV blocks (LRU beyond)", &s.warm_bytes),
      IntFlag("hot-bytes", "N",
              "bytes of all resident hot sets; idle sessions page out beyond (0 = unlimited)",
              &s.hot_bytes),
      IntFlag("max-content-bytes", "N", "longest turn content accepted, in bytes",
              &s.max_content_bytes),
      IntFlag("max-session-tokens", "N", "tokens a session may reach (0 = unlimited)",
              &s.max_session_tokens),
      IntFlag("max-turn-tokens", "N", "tokens one turn may hold", &d.max_turn_tokens),
      IntFlag("block-size", "N", "positions per KV block", &d.block_size),
      // Session defaults; each session may override them.
      StringFlag("chat-template", "NAME", "raw, llama2, zephyr or chatml", &d.chat_template),
      StringFlag("policy", "NAME",
                 "memory policy: snapkv, window, full, h2o, snapkv-adaptive or adakv",
                 &d.memory.policy),
      IntFlag("hot-budget", "N", "hot tokens per (layer, KV head)", &d.memory.budget),
      IntFlag("window", "N", "SnapKV observation window", &d.memory.window),
      IntFlag("kernel", "N", "SnapKV pooling kernel (odd)", &d.memory.kernel),
      PoolingFlag("pooling", "SnapKV pooling of votes", &d.memory.pooling),
      IntFlag("sink-tokens", "N", "window policy: first tokens always kept", &d.memory.sink_tokens),
      IntFlag("recall-blocks", "N", "blocks per (layer, KV head) a turn may recall (0 = off)",
              &d.recall_blocks),
  };
}

absl::StatusOr<KvmemdOptions> ParseKvmemdFlags(int argc, const char* const* argv) {
  KvmemdOptions options;
  std::vector<FlagSpec> flags = KvmemdFlags(&options);
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg.substr(0, 2) != "--") {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument \"", std::string(arg), "\"; flags are --name VALUE"));
    }
    std::string_view name = arg.substr(2), value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string_view::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const FlagSpec* spec = nullptr;
    for (const FlagSpec& f : flags) {
      if (f.name == name) spec = &f;
    }
    if (spec == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", std::string(name), " (see kvmemd --help)"));
    }
    if (!has_value) {
      if (i + 1 == argc) {
        return absl::InvalidArgumentError(
            absl::StrCat("flag --", spec->name, " needs a value (", spec->value_name, ")"));
      }
      value = argv[++i];
    }
    if (absl::Status s = spec->set(value); !s.ok()) return s;
  }
  return options;
}

std::string KvmemdUsage() {
  KvmemdOptions defaults;
  std::string usage =
      "usage: kvmemd [--model DIR] [--data-dir DIR] [--listen HOST:PORT] [flags]\n"
      "Serves kvmem.v1.AgentMemory (plus gRPC health and reflection). SIGTERM or SIGINT\n"
      "stops it gracefully. Flags (default in brackets):\n";
  for (const FlagSpec& f : KvmemdFlags(&defaults)) {
    std::string left = absl::StrCat("  --", f.name, " ", f.value_name);
    if (left.size() < 30) left.resize(30, ' ');
    absl::StrAppend(&usage, left, " ", f.help, " [", f.current(), "]\n");
  }
  return usage;
}

}  // namespace kvmem
