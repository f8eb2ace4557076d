// kvmem-sim's engine: replays a scenario's sessions under several memory strategies and hot
// budgets, in process, and measures each turn against the uncompressed (`full`) run.
//
// Every strategy sees exactly the same tokens (turns are teacher-forced, nothing is sampled),
// so differences in the logits come only from what each strategy kept hot.
//
// Strategies (labels as reported):
//   full             MemoryOptions::policy "full": the reference every metric compares with.
//   window           "window": sink_tokens first entries + the most recent ones.
//   h2o              "h2o": accumulated attention; recent_share of the budget for recent entries.
//   snapkv           "snapkv" with recall_blocks = 0: what leaves hot is gone for attention.
//   snapkv+recall    "snapkv" with SessionOptions::recall_blocks = SimOptions::recall_blocks:
//                    each turn's prefill also attends the blocks the engine recalls by digest
//                    score, and SnapKV then decides whether they stay hot.
//   snapkv-adaptive  "snapkv-adaptive": per-head observation windows sized by entropy.
//   adakv            "adakv": per-head budgets sharing num_kv_heads * budget per layer.
// Every strategy but snapkv+recall runs with recall_blocks = 0.
#ifndef KVMEM_EXAMPLES_SIMULATOR_H_
#define KVMEM_EXAMPLES_SIMULATOR_H_

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/memory_policy.h"
#include "engine/model.h"
#include "examples/sim_scenario.h"

namespace kvmem::sim {

// Every strategy label, in report order.
const std::vector<std::string>& AllStrategies();

struct SimOptions {
  // Default: AllStrategies(). Strategies to compare; "full" runs whether listed or not.
  std::vector<std::string> strategies = AllStrategies();
  // Default: {64}. Hot budgets to sweep, in entries per (layer, KV head) (per layer and head
  // on average for adakv).
  std::vector<int> budgets = {64};
  // Default: 8. SnapKV observation window (largest window of snapkv-adaptive; recall scoring).
  // Short because stories260K turns are short.
  int window = 8;
  // Default: 5. SnapKV pooling kernel (odd).
  int kernel = 5;
  // Default: kMax. SnapKV pooling.
  Pooling pooling = Pooling::kMax;
  // Default: 4. "window": attention-sink entries always kept.
  int sink_tokens = 4;
  // Default: 0.2. "adakv": share of the budget every head is guaranteed.
  double min_head_share = 0.2;
  // Default: 0.5. "h2o": share of the budget kept for the most recent entries.
  double recent_share = 0.5;
  // Default: 8. snapkv+recall: SessionOptions::recall_blocks.
  int recall_blocks = 8;
  // Default: 16. SessionOptions::block_size.
  int block_size = 16;
  // Default: 0. Index of the session whose per-head retention is recorded for every strategy
  // and budget; -1 records none.
  int retention_session = 0;
  // Default: none. Told one line per finished (strategy, budget) run, for progress output.
  std::function<void(const std::string&)> progress;
};

// The memory settings a strategy label runs with at `budget`; INVALID_ARGUMENT for an unknown
// label. recall_blocks receives the SessionOptions::recall_blocks to use.
absl::StatusOr<MemoryOptions> StrategyMemory(const std::string& strategy, int budget,
                                             const SimOptions& options, int* recall_blocks);

// One turn of one session under one (strategy, budget).
struct TurnMetrics {
  std::string strategy;
  int budget = 0;
  int session = 0;
  int turn = 0;
  Role role = Role::kUser;
  bool probe = false;
  int64_t turn_tokens = 0;
  int64_t first_position = 0;
  // Against full over every token of the turn: mean next-token KL(full || strategy) in nats,
  // and the share of tokens whose top-1 next token equals full's.
  double kl = 0;
  double top1 = 1;
  // Probe turns only (NaN otherwise): log P(answer tokens | everything before them), its exp,
  // and the share of (layer, KV head, fact position) entries hot when the probe turn begins.
  double fact_logprob = 0;
  double fact_prob = 0;
  double fact_hot = 0;
  // Per (layer, KV head), the share of full's attention from this turn's queries to earlier
  // context that falls on entries hot when the turn begins (NaN for the first turn). Blocks
  // that recall brings in for the turn are not counted: they are attended, not hot.
  std::vector<double> coverage;
  double coverage_mean = 0;
  double coverage_min = 0;
  // After the turn (Session::Stats): hot entries over all heads, mean per head, bytes.
  int64_t hot_tokens = 0;
  double hot_per_head = 0;
  int64_t hot_bytes = 0;
  int64_t block_bytes = 0;  // full-fidelity blocks (the warm/cold tiers' content)
  int64_t evicted = 0;
  // Recall during this turn (AppendResult): (layer, KV head, block) recalls, and block reads
  // served from memory / from the cold tier.
  int64_t blocks_recalled = 0;
  int64_t warm_hits = 0;
  int64_t cold_reads = 0;
  double turn_ms = 0;  // AppendTurn, wall clock (client-measured in server mode)
  double prefill_ms = 0;
  double select_ms = 0;

  // Server mode only (NaN or 0 in process; see sim_server.h). At probe turns: whether the
  // first `greedy_tokens` greedy tokens after the probe prompt equal full's (1 or 0; `top1`
  // holds the first token's agreement), and whether they start with the planted answer.
  double greedy_match = std::numeric_limits<double>::quiet_NaN();
  double answer_hit = std::numeric_limits<double>::quiet_NaN();
  std::string greedy_text;  // the greedy continuation itself
  // After the turn (GetSession): blocks and bytes in the warm tier (host RAM, a cache) and the
  // cold tier (every block of the session).
  int64_t warm_blocks = 0;
  int64_t warm_bytes = 0;
  int64_t cold_blocks = 0;
  int64_t cold_bytes = 0;
  // The server's timings of the AppendTurn call (Timings): arrival to answer, waiting for a
  // worker, and writing the turn to the tiers.
  double server_ms = std::numeric_limits<double>::quiet_NaN();
  double queue_ms = std::numeric_limits<double>::quiet_NaN();
  double commit_ms = std::numeric_limits<double>::quiet_NaN();
};

// Per-head retention of one session under one (strategy, budget): share[head * positions + p]
// is the share of turn boundaries, from the one that ended p's turn to the last, after which
// position p was hot in head (layer * num_kv_heads + kv_head).
struct RetentionMap {
  std::string strategy;
  int budget = 0;
  int session = 0;
  int heads = 0;
  int64_t positions = 0;
  std::vector<double> share;                       // (heads, positions)
  std::vector<std::pair<int64_t, int64_t>> facts;  // [begin, end) of each planted fact
  std::vector<int64_t> turn_starts;                // first position of every turn
};

struct SimResults {
  std::string scenario;
  int sessions = 0;
  int num_layers = 0;
  int num_kv_heads = 0;
  int context = 0;                      // the model's max_position_embeddings (0: unknown)
  std::vector<int64_t> session_tokens;  // total tokens of each session
  SimOptions options;                   // as run (strategies with full first)
  std::vector<TurnMetrics> turns;       // (strategy, budget, session, turn) in run order
  std::vector<RetentionMap> retention;

  // Server mode (sim_server.h): the kvmemd address ("" in process), the fingerprint of the
  // model it serves, the greedy tokens of TurnMetrics::greedy_match, and one line per
  // strategy the server could not run (skipped).
  std::string server;
  std::string model_fingerprint;
  int greedy_tokens = 0;
  std::vector<std::string> notes;
};

// Runs every (strategy, budget) over every session of `scenario`.
// INVALID_ARGUMENT: an unknown strategy, a budget a strategy cannot run with (naming both), a
// session longer than the model's context, or a probe whose answer does not tokenize as a
// continuation of its prompt. Errors from the engine pass through with the session and turn
// named.
absl::StatusOr<SimResults> RunSimulation(const Model& model, Backend& backend,
                                         const Scenario& scenario, const SimOptions& options);

}  // namespace kvmem::sim

#endif  // KVMEM_EXAMPLES_SIMULATOR_H_
