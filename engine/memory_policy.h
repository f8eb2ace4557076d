// What stays hot after each turn: a small interface with one class per strategy.
//
//   full             never evicts.
//   window           StreamingLLM: the first `sink_tokens` entries and the most recent ones.
//   snapkv           SnapKV (see snapkv.h): the turn's last `window` queries vote, pooled.
//   h2o              H2O (Zhang et al., NeurIPS 2023): every query of every turn adds its attention
//                    weights to the entries it reads; each head keeps its most recent entries
//                    (recent_share of the budget) plus the entries with the largest accumulated
//                    score (heavy hitters). Scores live in the policy, keyed by absolute
//                    position, across turns.
//   snapkv-adaptive  SnapKV whose observation window is sized per KV head in proportion to the
//                    head's attention entropy over the turn's last `window` queries.
//   adakv            Ada-KV (Feng et al., 2024) over SnapKV scores: the budget is shared by the
//                    KV heads of a layer (num_kv_heads * budget in total); heads whose votes are
//                    concentrated give entries to heads whose votes are spread.
//
// A policy object belongs to one session: stateful policies (h2o) remember what earlier turns
// did, so one object must never serve two sessions.
#ifndef KVMEM_ENGINE_MEMORY_POLICY_H_
#define KVMEM_ENGINE_MEMORY_POLICY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/kv_cache.h"
#include "engine/snapkv.h"

namespace kvmem {

struct MemoryOptions {
  // Default: "snapkv". One of "full" (never evict), "snapkv", "window" (sinks + recent),
  // "h2o", "snapkv-adaptive", "adakv".
  std::string policy = "snapkv";
  // Default: 1024. Hot entries per (layer, KV head). "adakv" holds num_kv_heads * budget per
  // layer, shared unevenly among the heads.
  int budget = 1024;
  // Default: 32. SnapKV observation window ("snapkv", "adakv"; the largest window of
  // "snapkv-adaptive"); recall scores blocks with the turn's last `window` queries.
  int window = 32;
  // Default: 7. SnapKV pooling kernel (odd).
  int kernel = 7;
  // Default: kMax. SnapKV pooling.
  Pooling pooling = Pooling::kMax;
  // Default: 4. "window" policy: the first entries always kept (attention sinks).
  int sink_tokens = 4;
  // Default: 0.2. "adakv": the share of `budget` every head keeps whatever the others score
  // (Ada-KV's safeguard), in [0, 1]; 1 makes it plain SnapKV.
  double min_head_share = 0.2;
  // Default: 0.5. "h2o": the share of `budget` kept for the most recent entries, in [0, 1);
  // the rest holds heavy hitters. H2O's paper splits the budget evenly.
  double recent_share = 0.5;
};

// What a policy sees at a turn boundary.
struct TurnView {
  // Every head ends with the turn's new entries. Holds host rows unless the policy says it
  // does not read them (MemoryPolicy::reads_hot_rows) and the rows live with the backend.
  const KvCache* kv = nullptr;
  int64_t new_tokens = 0;       // length of the turn just appended
  // Per layer, (num_heads, observed, head_dim): queries of the turn's last `observed` tokens.
  // Query row i belongs to the entry at index size() - observed + i of every head.
  const std::vector<std::vector<float>>* observed_queries = nullptr;
  int observed = 0;
  int num_heads = 0;
  int sliding_window = 0;
  // Default: null. The session's backend: SnapKV selects there when it can (same entries).
  Backend* backend = nullptr;
  // Default: 0. ForwardResult::observed_queries_on_backend when *observed_queries are exactly
  // that pass's queries (Backend::SelectSnapKv reads the backend's copy then).
  uint64_t observed_queries_on_backend = 0;
};

class MemoryPolicy {
 public:
  // observe_window() of a policy that reads the queries of every token of the turn.
  static constexpr int kWholeTurn = 1 << 30;

  virtual ~MemoryPolicy() = default;
  virtual const char* name() const = 0;
  // Trailing turn tokens whose queries Select needs (0: none; kWholeTurn: all of them).
  virtual int observe_window() const { return 0; }
  // For every (layer, KV head) in layer-major order, the ascending indices of the entries
  // that stay hot. Called once per committed turn, in order: stateful policies update what
  // they remember of the session here.
  // An error (the backend's selection failed) leaves the policy's memory unchanged.
  virtual absl::StatusOr<std::vector<std::vector<int64_t>>> Select(const TurnView& turn) = 0;
  // Whether Select reads the keys and values of the hot entries (attention rows). A session
  // whose rows live with the backend hands such a policy a copy with host rows, read back
  // from its blocks; policies that answer false see positions only there.
  virtual bool reads_hot_rows() const { return true; }
  // A policy with the same settings and the same memory of the session, for a forked session.
  virtual std::unique_ptr<MemoryPolicy> Clone() const = 0;
  // What a stateful policy remembers of the session, as one score per hot entry of every
  // (layer, KV head) (layer-major), saved with each commit; empty for stateless policies.
  virtual std::vector<std::vector<double>> SaveState() const { return {}; }
  // Restores SaveState()'s output for the given hot positions (same layout).
  virtual void LoadState(const std::vector<std::vector<int64_t>>& hot_positions,
                         const std::vector<std::vector<double>>& scores) {}
};

// INVALID_ARGUMENT for an unknown policy name or invalid settings, naming the setting.
absl::StatusOr<std::unique_ptr<MemoryPolicy>> MakeMemoryPolicy(const MemoryOptions& options);
absl::Status ValidateMemoryOptions(const MemoryOptions& options);

// Building blocks of the policies above, exposed for tests and analysis tools.

// Mean normalised attention entropy of one KV head over the observed queries: for each query
// row of each query head of the group, H(row) / log(entries the row attends), averaged; in
// [0, 1] (0: every row attends one entry; rows that attend a single entry count as 0).
// queries: (num_heads, w, head_dim); the window's own entries are the head's last w entries.
double NormalizedAttentionEntropy(const float* queries, int num_heads, int w,
                                  const std::vector<const HeadKv*>& heads, int kv_head,
                                  int sliding_window = 0);

// "snapkv-adaptive" windows: head g gets max(1, round(w * entropy[g] / max(entropy))), so the
// most diffuse head of the layer gets the whole window w; all w when every entropy is 0.
std::vector<int> EntropyAdaptiveWindows(const std::vector<double>& entropy, int w);

// Ada-KV allocation over one layer. scores[g] holds the pooled votes of head g's candidates
// (its entries before the window of w). Every head keeps its w window entries plus its top
// floor - w candidates, floor = min(entries, max(w, ceil(min_head_share * budget))); the rest
// of num_kv_heads * budget goes to the best remaining candidates of any head (ties: lower head,
// then lower index). Returns ascending entry indices per head; in total exactly
// min(num_kv_heads * budget, sum of entries).
std::vector<std::vector<int64_t>> AllocateAdaKv(const std::vector<std::vector<double>>& scores,
                                                int64_t w, int64_t budget, double min_head_share);

}  // namespace kvmem

#endif  // KVMEM_ENGINE_MEMORY_POLICY_H_
