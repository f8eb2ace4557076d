// kvmemd's command line: one table of flags, each bound to a field of KvmemdOptions.
//
// Adding a server option (a tier budget, say) is one line in KvmemdFlags(): the flag's name,
// its value's name, its help, and the field it sets. --help is generated from the table with
// each field's current (default) value.
#ifndef KVMEM_SERVICE_SERVER_FLAGS_H_
#define KVMEM_SERVICE_SERVER_FLAGS_H_

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "service/session_manager.h"

namespace kvmem {

struct KvmemdOptions {
  // Default: "" ($KVMEM_MODEL, else ../shared/models/stories260K beside the project root).
  std::string model;
  // Default: "127.0.0.1:50051". Port 0 picks a free port (printed once listening).
  std::string listen = "127.0.0.1:50051";
  // Default: 0 (one per hardware thread). Worker threads running RPCs' engine work; also the
  // number of sessions that can compute at once.
  int threads = 0;
  // Default: 0 (one per hardware thread). Threads of the CPU backend inside one forward pass.
  int backend_threads = 0;
  // Default: "auto". Compute backend: "cpu", "cuda" or "auto" (CUDA when available, else CPU).
  std::string device = "auto";
  // Default: "bf16". Weights and KV type on the GPU: "bf16", "f16", or "f32" (matches the CPU).
  std::string device_dtype = "bf16";
  // Default: -1 (the warm budget plus a quarter, for blocks in flight). GPU only: host RAM the
  // session's KV blocks may take in pinned, device-mapped slabs, so that page-ins and recalls
  // read rows where they lie (CudaBackendOptions::pinned_block_bytes); 0 keeps every block in
  // pageable memory.
  int64_t pinned_bytes = -1;
  // Default: "" (no authentication: one anonymous tenant). File of "TOKEN TENANT" lines.
  std::string auth_tokens;
  // Default: 5000. On SIGTERM/SIGINT, how long in-flight calls may run before cancellation.
  int shutdown_grace_ms = 5000;
  // Storage, limits and every session's default memory policy.
  SessionManagerOptions sessions;
};

// One --name VALUE flag.
struct FlagSpec {
  std::string name;        // without the leading "--"
  std::string value_name;  // "N", "DIR", ... (for --help)
  std::string help;
  // Sets the bound field from the text; INVALID_ARGUMENT naming the flag when malformed.
  std::function<absl::Status(std::string_view value)> set;
  // The bound field's value, as text (for --help).
  std::function<std::string()> current;
};

// The table of kvmemd's flags, bound to the fields of `options`.
std::vector<FlagSpec> KvmemdFlags(KvmemdOptions* options);

// Parses argv[1..argc) ("--name VALUE" or "--name=VALUE"). INVALID_ARGUMENT for an unknown
// flag, a missing value, a positional argument or a malformed value.
absl::StatusOr<KvmemdOptions> ParseKvmemdFlags(int argc, const char* const* argv);

// The --help text: usage line plus one line per flag with its default.
std::string KvmemdUsage();

}  // namespace kvmem

#endif  // KVMEM_SERVICE_SERVER_FLAGS_H_
