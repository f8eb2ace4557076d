// What stays hot after each turn: a small interface with one class per strategy.
#ifndef KVMEM_ENGINE_MEMORY_POLICY_H_
#define KVMEM_ENGINE_MEMORY_POLICY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/kv_cache.h"
#include "engine/snapkv.h"

namespace kvmem {

struct MemoryOptions {
  // Default: "snapkv". One of "full" (never evict), "snapkv", "window" (sinks + recent).
  std::string policy = "snapkv";
  // Default: 1024. Hot entries per (layer, KV head) for snapkv and window.
  int budget = 1024;
  // Default: 32. SnapKV observation window.
  int window = 32;
  // Default: 7. SnapKV pooling kernel (odd).
  int kernel = 7;
  // Default: kMax. SnapKV pooling.
  Pooling pooling = Pooling::kMax;
  // Default: 4. "window" policy: the first entries always kept (attention sinks).
  int sink_tokens = 4;
};

// What a policy sees at a turn boundary.
struct TurnView {
  const KvCache* kv = nullptr;  // every head ends with the turn's new entries
  int64_t new_tokens = 0;       // length of the turn just appended
  // Per layer, (num_heads, observed, head_dim): queries of the turn's last `observed` tokens.
  const std::vector<std::vector<float>>* observed_queries = nullptr;
  int observed = 0;
  int num_heads = 0;
  int sliding_window = 0;
};

class MemoryPolicy {
 public:
  virtual ~MemoryPolicy() = default;
  virtual const char* name() const = 0;
  // Trailing turn tokens whose queries Select needs (0: none).
  virtual int observe_window() const { return 0; }
  // For every (layer, KV head) in layer-major order, the ascending indices of the entries
  // that stay hot.
  virtual std::vector<std::vector<int64_t>> Select(const TurnView& turn) const = 0;
};

// INVALID_ARGUMENT for an unknown policy name or invalid settings, naming the setting.
absl::StatusOr<std::unique_ptr<MemoryPolicy>> MakeMemoryPolicy(const MemoryOptions& options);
absl::Status ValidateMemoryOptions(const MemoryOptions& options);

}  // namespace kvmem

#endif  // KVMEM_ENGINE_MEMORY_POLICY_H_
