// kvmem-sim's outputs: CSV files, a Markdown summary and gnuplot plots of a SimResults.
//
// Files written into the output directory:
//   turns.csv         one row per (strategy, budget, session, turn): every TurnMetrics field
//                     but greedy_text
//   probes.csv        server mode only: one row per probe turn with its greedy continuation
//   heads.csv         one row per (strategy, budget, session, turn > 0, layer, KV head): the
//                     attention coverage of that head
//   summary.csv       one row per (strategy, budget): the Aggregate below
//   summary.md        the tables of summary.csv at the reference budget and across budgets
//   plots.gp + *.dat  gnuplot script and its data; rendered (when gnuplot runs) to
//     sim_vs_budget.png    probe KL, top-1, P(answer), attention coverage vs hot budget
//                          (server mode: top-1, greedy match, answer hit, hot per head)
//     sim_vs_turn.png      KL, top-1, coverage, hot entries per head vs turn (reference budget)
//                          (server mode: hot per head, client and server ms, blocks recalled)
//     sim_retention.png    per-head retention heat maps of one session (reference budget;
//                          not in server mode)
//     sim_head_coverage.png  attention coverage at probes per strategy and head (not in
//                          server mode)
// In server mode (SimResults::server set) the metrics that need logits or hot positions are
// written "nan" in CSV and "n/a" in the Markdown.
#ifndef KVMEM_EXAMPLES_SIM_REPORT_H_
#define KVMEM_EXAMPLES_SIM_REPORT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "examples/simulator.h"

namespace kvmem::sim {

// One (strategy, budget) over all sessions. "Probe" means the scenario's probe turns; means
// are over those turns unless the name says otherwise.
struct Aggregate {
  std::string strategy;
  int budget = 0;
  int probes = 0;
  double probe_kl = 0;
  double probe_top1 = 0;
  double fact_prob = 0;         // mean P(answer)
  double fact_logprob_gap = 0;  // mean of log P(answer) - full's log P(answer) (<= 0 is worse)
  double fact_hot = 0;
  double probe_coverage = 0;      // mean over probes and heads
  double probe_coverage_min = 0;  // mean over probes of the worst head
  double kl = 0;                  // every turn
  double top1 = 0;                // every turn
  double final_hot_per_head = 0;  // after each session's last turn, mean over sessions
  double final_hot_bytes = 0;
  double final_block_bytes = 0;
  double blocks_recalled = 0;  // per session: summed over its turns, mean over sessions
  double turn_ms = 0;          // mean AppendTurn wall time
  // Server mode (NaN in process): means at probes of TurnMetrics::greedy_match and
  // answer_hit, tier bytes after each session's last turn, and the mean server-side time of
  // AppendTurn.
  double greedy_match = 0;
  double answer_hit = 0;
  double final_warm_bytes = 0;
  double final_cold_bytes = 0;
  double server_ms = 0;
};

// Aggregates in the order of the results' strategies, then budgets.
std::vector<Aggregate> Aggregates(const SimResults& results);

struct ReportOptions {
  // Required. Directory for every output; created when missing.
  std::string out_dir;
  // Default: 0, meaning the median of the budgets run. Budget of the main table, the per-turn
  // plot, the heat maps and the per-head plot; must be one of the budgets run.
  int reference_budget = 0;
  // Default: "gnuplot". The program that renders plots.gp; empty writes the script and data
  // without rendering.
  std::string gnuplot = "gnuplot";
  // Default: "". The command that produced the run, quoted in the summary.
  std::string command_line;
  // Default: "". The model's name, quoted in the summary.
  std::string model_name;
};

// The Markdown summary (what summary.md holds).
std::string SummaryMarkdown(const SimResults& results, const std::vector<Aggregate>& aggregates,
                            const ReportOptions& options);

// Writes every file listed at the top and renders the plots. INVALID_ARGUMENT for a reference
// budget that was not run; INTERNAL when a file cannot be written or gnuplot fails (the CSV
// and Markdown files are written first, so they survive a plotting failure).
absl::Status WriteReport(const SimResults& results, const ReportOptions& options);

}  // namespace kvmem::sim

#endif  // KVMEM_EXAMPLES_SIM_REPORT_H_
