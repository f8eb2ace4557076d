// kvmem-sim's server mode: replays a scenario's sessions against a running kvmemd over gRPC,
// each (strategy, budget, session) in a session of its own created with that strategy's
// memory policy (CreateSession overrides), and measures what the API exposes.
//
// The API returns no logits, queries or hot positions, so the metrics differ from the
// in-process run (simulator.h):
//   top1          at probe turns, whether a greedy Generate of 1 token (discard) after the
//                 probe prompt equals full's (1 or 0); NaN at other turns.
//   greedy_match  whether the first ServerSimOptions::greedy_tokens greedy tokens equal full's.
//   answer_hit    whether that greedy continuation starts with the planted answer.
//   hot_tokens, hot_per_head, hot_bytes, warm/cold blocks and bytes  from GetSession after
//                 the turn; block_bytes is the cold tier's bytes (every block of the session).
//   evicted, blocks_recalled, warm_hits, cold_reads, prefill_ms, select_ms, server_ms,
//   queue_ms, commit_ms  from the AppendTurn answer; turn_ms is the client's wall clock.
//   kl, fact_logprob, fact_prob, fact_hot, coverage  NaN (they need logits or hot positions).
//
// A probe is measured on a fork of the session taken before the probe turn: the fork gets the
// probe's prompt as a turn (so the memory policy runs at its boundary, as for any turn) and is
// asked for its greedy continuation, then deleted; the session itself appends
// "<prompt> <answer>" like the in-process run, so every strategy sees the same turns.
//
// Settings the API cannot carry (window sink tokens, h2o recent share, adakv minimum head
// share, block size) are the server's (kvmemd flags); SimResults::options.block_size reports
// the server's block size. A strategy whose policy name the server rejects as unknown is
// skipped with a line in SimResults::notes (and told to SimOptions::progress).
#ifndef KVMEM_EXAMPLES_SIM_SERVER_H_
#define KVMEM_EXAMPLES_SIM_SERVER_H_

#include <string>

#include "absl/status/statusor.h"
#include "client/agent_memory_client.h"
#include "examples/sim_scenario.h"
#include "examples/simulator.h"

namespace kvmem::sim {

struct ServerSimOptions {
  // Default: 8. Greedy tokens generated at each probe for greedy_match and answer_hit.
  int greedy_tokens = 8;
  // Default: "" (a fresh "kvmem-sim-<random hex>"). Prefix of every session id the run
  // creates; each session also carries the label kvmem-sim-run=<prefix>.
  std::string session_prefix;
};

// Runs every (strategy, budget) over every session of `scenario` on the server behind
// `client`, and deletes every session it created before returning (on failure too).
// UNAVAILABLE naming `address` when the server does not answer its health check;
// INVALID_ARGUMENT for an unknown strategy, no budgets, a SnapKV budget the engine rejects
// (checked before any call), greedy_tokens < 1 or a bad prefix;
// errors from the server pass through with the strategy, budget, session and turn named.
absl::StatusOr<SimResults> RunServerSimulation(AgentMemoryClient& client,
                                               const std::string& address, const Scenario& scenario,
                                               const SimOptions& options,
                                               const ServerSimOptions& server_options);

}  // namespace kvmem::sim

#endif  // KVMEM_EXAMPLES_SIM_SERVER_H_
