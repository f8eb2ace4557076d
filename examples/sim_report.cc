#include "examples/sim_report.h"

#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"

namespace kvmem::sim {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Mean of the values that are numbers; NaN when there are none.
class Mean {
 public:
  void Add(double x) {
    if (std::isnan(x)) return;
    sum_ += x;
    ++n_;
  }
  double Get() const { return n_ == 0 ? kNaN : sum_ / n_; }

 private:
  double sum_ = 0;
  int64_t n_ = 0;
};

std::string Num(double x) { return std::isnan(x) ? "nan" : absl::StrFormat("%.6g", x); }

// Fixed decimals for tables; "–" for NaN.
std::string Fixed(double x, int decimals) {
  return std::isnan(x) ? "–" : absl::StrFormat("%.*f", decimals, x);
}

absl::Status WriteFile(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

// A CSV field, quoted when it holds a comma, quote or line break.
std::string CsvField(const std::string& text) {
  if (text.find_first_of(",\"\n\r") == std::string::npos) return text;
  std::string out = "\"";
  for (char c : text) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

int ReferenceBudget(const SimResults& results, const ReportOptions& options) {
  const std::vector<int>& budgets = results.options.budgets;
  if (options.reference_budget != 0) return options.reference_budget;
  return budgets.empty() ? 0 : budgets[(budgets.size() - 1) / 2];
}

std::string TurnsCsv(const SimResults& results) {
  std::string out =
      "strategy,budget,session,turn,role,probe,turn_tokens,first_position,kl,top1,fact_logprob,"
      "fact_prob,fact_hot,coverage_mean,coverage_min,hot_tokens,hot_per_head,hot_bytes,"
      "block_bytes,evicted,blocks_recalled,warm_hits,cold_reads,turn_ms,prefill_ms,select_ms,"
      "greedy_match,answer_hit,warm_blocks,warm_bytes,cold_blocks,cold_bytes,server_ms,queue_ms,"
      "commit_ms\n";
  for (const TurnMetrics& m : results.turns) {
    absl::StrAppend(&out, m.strategy, ",", m.budget, ",", m.session, ",", m.turn, ",",
                    RoleName(m.role), ",", m.probe ? 1 : 0, ",", m.turn_tokens, ",",
                    m.first_position, ",", Num(m.kl), ",", Num(m.top1), ",", Num(m.fact_logprob),
                    ",", Num(m.fact_prob), ",", Num(m.fact_hot), ",", Num(m.coverage_mean), ",",
                    Num(m.coverage_min), ",", m.hot_tokens, ",", Num(m.hot_per_head), ",",
                    m.hot_bytes, ",", m.block_bytes, ",", m.evicted, ",", m.blocks_recalled, ",",
                    m.warm_hits, ",", m.cold_reads, ",", Num(m.turn_ms), ",", Num(m.prefill_ms),
                    ",", Num(m.select_ms), ",", Num(m.greedy_match), ",", Num(m.answer_hit), ",",
                    m.warm_blocks, ",", m.warm_bytes, ",", m.cold_blocks, ",", m.cold_bytes, ",",
                    Num(m.server_ms), ",", Num(m.queue_ms), ",", Num(m.commit_ms), "\n");
  }
  return out;
}

// Server mode: the greedy continuation of every probe.
std::string ProbesCsv(const SimResults& results) {
  std::string out = "strategy,budget,session,turn,top1,greedy_match,answer_hit,greedy_text\n";
  for (const TurnMetrics& m : results.turns) {
    if (!m.probe) continue;
    absl::StrAppend(&out, m.strategy, ",", m.budget, ",", m.session, ",", m.turn, ",",
                    Num(m.top1), ",", Num(m.greedy_match), ",", Num(m.answer_hit), ",",
                    CsvField(m.greedy_text), "\n");
  }
  return out;
}

std::string HeadsCsv(const SimResults& results) {
  std::string out = "strategy,budget,session,turn,probe,layer,kv_head,coverage\n";
  for (const TurnMetrics& m : results.turns) {
    for (size_t h = 0; h < m.coverage.size(); ++h) {
      absl::StrAppend(&out, m.strategy, ",", m.budget, ",", m.session, ",", m.turn, ",",
                      m.probe ? 1 : 0, ",", h / results.num_kv_heads, ",", h % results.num_kv_heads,
                      ",", Num(m.coverage[h]), "\n");
    }
  }
  return out;
}

std::string SummaryCsv(const std::vector<Aggregate>& aggregates) {
  std::string out =
      "strategy,budget,probes,probe_kl,probe_top1,fact_prob,fact_logprob_gap,fact_hot,"
      "probe_coverage,probe_coverage_min,kl,top1,final_hot_per_head,final_hot_bytes,"
      "final_block_bytes,blocks_recalled,turn_ms,greedy_match,answer_hit,final_warm_bytes,"
      "final_cold_bytes,server_ms\n";
  for (const Aggregate& a : aggregates) {
    absl::StrAppend(&out, a.strategy, ",", a.budget, ",", a.probes, ",", Num(a.probe_kl), ",",
                    Num(a.probe_top1), ",", Num(a.fact_prob), ",", Num(a.fact_logprob_gap), ",",
                    Num(a.fact_hot), ",", Num(a.probe_coverage), ",", Num(a.probe_coverage_min),
                    ",", Num(a.kl), ",", Num(a.top1), ",", Num(a.final_hot_per_head), ",",
                    Num(a.final_hot_bytes), ",", Num(a.final_block_bytes), ",",
                    Num(a.blocks_recalled), ",", Num(a.turn_ms), ",", Num(a.greedy_match), ",",
                    Num(a.answer_hit), ",", Num(a.final_warm_bytes), ",", Num(a.final_cold_bytes),
                    ",", Num(a.server_ms), "\n");
  }
  return out;
}

const Aggregate* Find(const std::vector<Aggregate>& aggregates, const std::string& strategy,
                      int budget) {
  for (const Aggregate& a : aggregates) {
    if (a.strategy == strategy && a.budget == budget) return &a;
  }
  return nullptr;
}

// gnuplot's `word(names, i)` list of the strategies.
std::string Names(const std::vector<std::string>& strategies) {
  return absl::StrJoin(strategies, " ");
}

// Data and script of every plot. Files go to `dir`; the script refers to them by name.
absl::Status WritePlots(const SimResults& results, const std::vector<Aggregate>& aggregates,
                        int reference_budget, const std::filesystem::path& dir) {
  const std::vector<std::string>& strategies = results.options.strategies;
  const int n = static_cast<int>(strategies.size());

  // budget.dat: one block per strategy.
  std::string budget_dat;
  for (const std::string& s : strategies) {
    absl::StrAppend(&budget_dat, "# ", s,
                    "\n# budget probe_kl probe_top1 fact_prob probe_coverage fact_hot kl "
                    "greedy_match answer_hit final_hot_per_head blocks_recalled\n");
    for (int b : results.options.budgets) {
      const Aggregate* a = Find(aggregates, s, b);
      absl::StrAppend(&budget_dat, b, " ", Num(a->probe_kl), " ", Num(a->probe_top1), " ",
                      Num(a->fact_prob), " ", Num(a->probe_coverage), " ", Num(a->fact_hot), " ",
                      Num(a->kl), " ", Num(a->greedy_match), " ", Num(a->answer_hit), " ",
                      Num(a->final_hot_per_head), " ", Num(a->blocks_recalled), "\n");
    }
    budget_dat += "\n\n";
  }
  KVMEM_RETURN_IF_ERROR(WriteFile(dir / "budget.dat", budget_dat));

  // turn.dat: per strategy, means over sessions per turn index at the reference budget.
  std::string turn_dat;
  int max_turn = 0;
  for (const std::string& s : strategies) {
    // kl, top1, coverage, hot per head, turn ms, server ms, blocks recalled
    std::map<int, std::array<Mean, 7>> by_turn;
    for (const TurnMetrics& m : results.turns) {
      if (m.strategy != s || m.budget != reference_budget) continue;
      auto& means = by_turn[m.turn];
      means[0].Add(m.kl);
      means[1].Add(m.top1);
      means[2].Add(m.coverage_mean);
      means[3].Add(m.hot_per_head);
      means[4].Add(m.turn_ms);
      means[5].Add(m.server_ms);
      means[6].Add(static_cast<double>(m.blocks_recalled));
      max_turn = std::max(max_turn, m.turn);
    }
    absl::StrAppend(&turn_dat, "# ", s,
                    "\n# turn kl top1 coverage hot_per_head turn_ms server_ms blocks_recalled\n");
    for (const auto& [t, means] : by_turn) {
      absl::StrAppend(&turn_dat, t, " ", Num(means[0].Get()), " ", Num(means[1].Get()), " ",
                      Num(means[2].Get()), " ", Num(means[3].Get()), " ", Num(means[4].Get()),
                      " ", Num(means[5].Get()), " ", Num(means[6].Get()), "\n");
    }
    turn_dat += "\n\n";
  }
  KVMEM_RETURN_IF_ERROR(WriteFile(dir / "turn.dat", turn_dat));

  // head_coverage.dat: (head, strategy index, mean coverage at probes).
  const int heads = results.num_layers * results.num_kv_heads;
  std::string head_dat = "# head strategy_index coverage_at_probes\n";
  for (int si = 0; si < n; ++si) {
    std::vector<Mean> per_head(heads);
    for (const TurnMetrics& m : results.turns) {
      if (m.strategy != strategies[si] || m.budget != reference_budget || !m.probe) continue;
      for (int h = 0; h < heads && h < static_cast<int>(m.coverage.size()); ++h) {
        per_head[h].Add(m.coverage[h]);
      }
    }
    for (int h = 0; h < heads; ++h) {
      absl::StrAppend(&head_dat, h, " ", si, " ", Num(per_head[h].Get()), "\n");
    }
    head_dat += "\n";
  }
  KVMEM_RETURN_IF_ERROR(WriteFile(dir / "head_coverage.dat", head_dat));

  // retention_<i>.dat for every strategy but full at the reference budget.
  std::vector<const RetentionMap*> maps;
  for (const std::string& s : strategies) {
    if (s == "full") continue;
    for (const RetentionMap& r : results.retention) {
      if (r.strategy == s && r.budget == reference_budget) maps.push_back(&r);
    }
  }
  for (size_t i = 0; i < maps.size(); ++i) {
    const RetentionMap& r = *maps[i];
    std::string dat = "# position head share\n";
    for (int h = 0; h < r.heads; ++h) {
      for (int64_t p = 0; p < r.positions; ++p) {
        absl::StrAppend(&dat, p, " ", h, " ", Num(r.share[h * r.positions + p]), "\n");
      }
      dat += "\n";
    }
    KVMEM_RETURN_IF_ERROR(WriteFile(dir / absl::StrCat("retention_", i, ".dat"), dat));
  }

  // plots.gp
  std::string gp =
      absl::StrCat("# Renders kvmem-sim's plots: gnuplot plots.gp (in this directory).\n",
                   "names = \"", Names(strategies), "\"\n", "n = ", n, "\n",
                   "set terminal pngcairo size 1400,1000 font ',11'\n",
                   // One style per strategy, distinct in colour, point and dash.
                   "set style line 1 lc rgb '#000000' lw 2 pt 1 ps 1.2\n",
                   "set style line 2 lc rgb '#1b9e77' lw 2 pt 2 ps 1.2\n",
                   "set style line 3 lc rgb '#d95f02' lw 2 pt 4 ps 1.2\n",
                   "set style line 4 lc rgb '#7570b3' lw 2 pt 6 ps 1.2\n",
                   "set style line 5 lc rgb '#e7298a' lw 2 pt 7 ps 1.2\n",
                   "set style line 6 lc rgb '#7570b3' lw 2 pt 8 ps 1.2 dt 2\n",
                   "set style line 7 lc rgb '#a6761d' lw 2 pt 9 ps 1.2\n",
                   "set style data linespoints\nset grid\n");
  // plot command over every strategy's block of `file`, column `col` against column 1.
  auto plot = [&](const char* file, int col) {
    return absl::StrCat("plot for [i=0:n-1] '", file, "' index i using 1:", col,
                        " ls (i % 7 + 1) title word(names, i+1)\n");
  };
  const bool server = !results.server.empty();
  if (server) {
    // Over gRPC there are no logits or hot positions: what the API measures instead.
    absl::StrAppend(
        &gp, "set output 'sim_vs_budget.png'\n",
        "set multiplot layout 2,2 title 'kvmem-sim (kvmemd at ", results.server, "): ",
        results.scenario, ", probe turns vs hot budget (mean over probes)'\n",
        "set xlabel 'hot budget (entries per layer and KV head)'\nset logscale x 2\n",
        "set key bottom right box opaque\n", "set yrange [-0.02:1.02]\n",
        "set ylabel 'top-1 agreement with full (greedy)'\n", plot("budget.dat", 3), "unset key\n",
        "set ylabel 'first ", results.greedy_tokens, " greedy tokens equal full''s'\n",
        plot("budget.dat", 8), "set ylabel 'greedy continuation starts with the answer'\n",
        plot("budget.dat", 9),
        "set autoscale y\nset ylabel 'hot entries per head (after the last turn)'\n",
        plot("budget.dat", 10), "unset multiplot\nunset logscale x\nset autoscale y\n");
    absl::StrAppend(
        &gp, "set output 'sim_vs_turn.png'\n",
        "set multiplot layout 2,2 title 'kvmem-sim (kvmemd at ", results.server, "): ",
        results.scenario, ", every turn at hot budget ", reference_budget,
        " (mean over sessions)'\n", "set xlabel 'turn'\nset xrange [-0.5:", max_turn, ".5]\n",
        "set key top left box opaque\n", "set ylabel 'hot entries per head (after the turn)'\n",
        plot("turn.dat", 5), "unset key\n", "set ylabel 'AppendTurn ms (client wall clock)'\n",
        plot("turn.dat", 6), "set ylabel 'AppendTurn ms (server total)'\n", plot("turn.dat", 7),
        "set ylabel 'blocks recalled'\n", plot("turn.dat", 8),
        "unset multiplot\nset autoscale x\nset autoscale y\n");
    return WriteFile(dir / "plots.gp", gp);
  }
  absl::StrAppend(
      &gp, "set output 'sim_vs_budget.png'\n",
      "set multiplot layout 2,2 title 'kvmem-sim: ", results.scenario,
      ", metrics at probe turns vs hot budget (mean over probes)'\n",
      "set xlabel 'hot budget (entries per layer and KV head)'\nset logscale x 2\n",
      "set key top right box opaque\n", "set ylabel 'KL(full || strategy), nats'\n",
      plot("budget.dat", 2), "unset key\n",
      "set ylabel 'top-1 agreement with full'\nset yrange [*:1.01]\n", plot("budget.dat", 3),
      "set autoscale y\nset ylabel 'P(planted answer | probe prompt)'\n", plot("budget.dat", 4),
      "set ylabel 'attention mass covered by hot set'\nset yrange [0:1.02]\n",
      plot("budget.dat", 5), "unset multiplot\nunset logscale x\nset autoscale y\n");
  absl::StrAppend(
      &gp, "set output 'sim_vs_turn.png'\n",
      "set multiplot layout 2,2 title 'kvmem-sim: ", results.scenario,
      ", every turn at hot budget ", reference_budget, " (mean over sessions)'\n",
      "set xlabel 'turn'\nset xrange [-0.5:", max_turn, ".5]\n", "set key top left box opaque\n",
      "set ylabel 'KL(full || strategy), nats'\n", plot("turn.dat", 2), "unset key\n",
      "set ylabel 'top-1 agreement with full'\nset yrange [*:1.01]\n", plot("turn.dat", 3),
      "set ylabel 'attention mass covered by hot set'\nset yrange [*:1.01]\n", plot("turn.dat", 4),
      "set autoscale y\nset ylabel 'hot entries per head (after the turn)'\n", plot("turn.dat", 5),
      "unset multiplot\nset autoscale x\nset autoscale y\n");
  absl::StrAppend(
      &gp, "set output 'sim_head_coverage.png'\nset terminal pngcairo size 1400,600\n",
      "set title 'attention mass covered by the hot set at probe turns, per head (budget ",
      reference_budget, ")'\n", "set xlabel 'head (layer * ", results.num_kv_heads,
      " + KV head)'\nset ylabel ''\nunset grid\n", "set ytics (",
      [&] {
        std::vector<std::string> tics;
        for (int i = 0; i < n; ++i) tics.push_back(absl::StrCat("'", strategies[i], "' ", i));
        return absl::StrJoin(tics, ", ");
      }(),
      ")\nset xrange [-0.5:", heads - 0.5, "]\nset yrange [-0.5:", n - 0.5, "]\n",
      "set cbrange [0:1]\nset palette defined (0 '#fff7ec', 0.5 '#fc8d59', 1 '#7f0000')\n",
      "plot 'head_coverage.dat' using 1:2:3 with image notitle\n",
      "set ytics autofreq\nset autoscale\nset grid\nunset title\n");
  if (!maps.empty()) {
    const RetentionMap& first = *maps.front();
    const int rows = static_cast<int>((maps.size() + 1) / 2);
    absl::StrAppend(
        &gp, "set terminal pngcairo size 1400,", 330 * rows + 60, "\n",
        "set output 'sim_retention.png'\n", "set multiplot layout ", rows,
        ",2 title 'kvmem-sim: share of turn boundaries each position stayed hot, session ",
        first.session, ", budget ", reference_budget,
        " (red boxes: planted facts; dotted: turn starts)'\n",
        "set xlabel 'position'\nset ylabel 'head (layer * ", results.num_kv_heads, " + KV head)'\n",
        "set xrange [-0.5:", first.positions - 0.5, "]\nset yrange [-0.5:", first.heads - 0.5,
        "]\n", "set cbrange [0:1]\nset palette defined (0 'white', 0.5 '#6baed6', 1 '#08306b')\n",
        "unset grid\n");
    for (const auto& [begin, end] : first.facts) {
      absl::StrAppend(&gp, "set object rect from first ", begin - 0.5, ", graph 0 to first ",
                      end - 0.5, ", graph 1 front fillstyle empty border lc rgb 'red' lw 2\n");
    }
    for (int64_t start : first.turn_starts) {
      if (start == 0) continue;
      absl::StrAppend(&gp, "set arrow from first ", start - 0.5, ", graph 0 to first ", start - 0.5,
                      ", graph 1 nohead front lc rgb 'gray40' dt 3\n");
    }
    for (size_t i = 0; i < maps.size(); ++i) {
      absl::StrAppend(&gp, "set title '", maps[i]->strategy, "'\n", "plot 'retention_", i,
                      ".dat' using 1:2:3 with image notitle\n");
    }
    gp += "unset multiplot\n";
  }
  return WriteFile(dir / "plots.gp", gp);
}

// Quotes a string for the POSIX shell.
std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

}  // namespace

std::vector<Aggregate> Aggregates(const SimResults& results) {
  // full's log P(answer) per (budget, session, turn), for the gap.
  std::map<std::tuple<int, int, int>, double> full_logprob;
  std::map<std::pair<int, int>, int> last_turn;  // (budget, session) -> last turn index
  for (const TurnMetrics& m : results.turns) {
    if (m.strategy == "full" && m.probe)
      full_logprob[{m.budget, m.session, m.turn}] = m.fact_logprob;
    int& last = last_turn[{m.budget, m.session}];
    last = std::max(last, m.turn);
  }
  std::vector<Aggregate> out;
  for (const std::string& s : results.options.strategies) {
    for (int b : results.options.budgets) {
      Aggregate a{.strategy = s, .budget = b};
      Mean probe_kl, probe_top1, fact_prob, gap, fact_hot, coverage, coverage_min, kl, top1,
          hot_per_head, hot_bytes, block_bytes, turn_ms, greedy_match, answer_hit, warm_bytes,
          cold_bytes, server_ms;
      for (const TurnMetrics& m : results.turns) {
        if (m.strategy != s || m.budget != b) continue;
        kl.Add(m.kl);
        top1.Add(m.top1);
        turn_ms.Add(m.turn_ms);
        server_ms.Add(m.server_ms);
        a.blocks_recalled += m.blocks_recalled;
        if (m.turn == last_turn[{b, m.session}]) {
          hot_per_head.Add(m.hot_per_head);
          hot_bytes.Add(static_cast<double>(m.hot_bytes));
          block_bytes.Add(static_cast<double>(m.block_bytes));
          warm_bytes.Add(static_cast<double>(m.warm_bytes));
          cold_bytes.Add(static_cast<double>(m.cold_bytes));
        }
        if (!m.probe) continue;
        ++a.probes;
        probe_kl.Add(m.kl);
        probe_top1.Add(m.top1);
        fact_prob.Add(m.fact_prob);
        gap.Add(m.fact_logprob - full_logprob[{b, m.session, m.turn}]);
        fact_hot.Add(m.fact_hot);
        coverage.Add(m.coverage_mean);
        coverage_min.Add(m.coverage_min);
        greedy_match.Add(m.greedy_match);
        answer_hit.Add(m.answer_hit);
      }
      a.probe_kl = probe_kl.Get();
      a.probe_top1 = probe_top1.Get();
      a.fact_prob = fact_prob.Get();
      a.fact_logprob_gap = gap.Get();
      a.fact_hot = fact_hot.Get();
      a.probe_coverage = coverage.Get();
      a.probe_coverage_min = coverage_min.Get();
      a.kl = kl.Get();
      a.top1 = top1.Get();
      a.final_hot_per_head = hot_per_head.Get();
      a.final_hot_bytes = hot_bytes.Get();
      a.final_block_bytes = block_bytes.Get();
      a.turn_ms = turn_ms.Get();
      a.greedy_match = greedy_match.Get();
      a.answer_hit = answer_hit.Get();
      a.final_warm_bytes = results.server.empty() ? kNaN : warm_bytes.Get();
      a.final_cold_bytes = results.server.empty() ? kNaN : cold_bytes.Get();
      a.server_ms = server_ms.Get();
      a.blocks_recalled /= std::max(1, results.sessions);
      out.push_back(a);
    }
  }
  return out;
}

namespace {

// The summary of a server-mode run: what the API measures, and n/a for what needs logits.
std::string ServerSummaryMarkdown(const SimResults& results,
                                  const std::vector<Aggregate>& aggregates,
                                  const ReportOptions& options) {
  const SimOptions& o = results.options;
  const int reference = ReferenceBudget(results, options);
  std::string md = absl::StrCat("# kvmem-sim: ", results.scenario, " (kvmemd at ", results.server,
                                ")\n\n");
  if (!options.command_line.empty()) {
    absl::StrAppend(&md, "Command: `", options.command_line, "`\n\n");
  }
  const auto [shortest, longest] =
      std::minmax_element(results.session_tokens.begin(), results.session_tokens.end());
  int64_t turns = 0, probes = 0;
  for (const TurnMetrics& m : results.turns) {
    if (m.strategy == "full" && m.budget == o.budgets.front()) {
      ++turns;
      probes += m.probe;
    }
  }
  absl::StrAppend(
      &md, "- server: kvmemd at ", results.server, ", model fingerprint ",
      results.model_fingerprint.empty() ? "(none)" : results.model_fingerprint, " (",
      results.num_layers, " layers x ", results.num_kv_heads, " KV heads)\n",
      "- sessions: ", results.sessions, ", turns: ", turns, " (", probes,
      " probes), tokens per session: ", results.session_tokens.empty() ? 0 : *shortest, "-",
      results.session_tokens.empty() ? 0 : *longest, "\n",
      "- hot budgets (entries per layer and KV head): ", absl::StrJoin(o.budgets, ", "),
      "; reference budget: ", reference, "\n", "- settings sent: SnapKV window ", o.window,
      ", kernel ", o.kernel, " (", o.pooling == Pooling::kMax ? "max" : "avg",
      " pooling); snapkv+recall recall_blocks ", o.recall_blocks,
      "; the server's own: window sinks, h2o recent share, adakv min head share, block size ",
      o.block_size, "\n");
  for (const std::string& note : results.notes) absl::StrAppend(&md, "- ", note, "\n");
  absl::StrAppend(
      &md,
      "\nMeasured over gRPC, which exposes no logits: at each probe a fork of the session "
      "appends the probe prompt and is asked for greedy continuations (discarded). Top-1: the "
      "first greedy token equals full's. First ", results.greedy_tokens,
      " tokens: the first ", results.greedy_tokens,
      " greedy tokens all equal full's. Answer hit: the continuation starts with the planted "
      "answer. KL, P(answer) and attention coverage need logits or hot positions: n/a here (run "
      "without --server for them). Hot entries and bytes are from GetSession after each "
      "session's last turn; warm is the share of blocks cached in host RAM, cold every block "
      "the session wrote. ms per turn: AppendTurn as the client timed it / as the server did "
      "(Timings.total_ms).\n\n");
  absl::StrAppend(&md, "## Strategies at hot budget ", reference, "\n\n");
  md += absl::StrCat(
      "| strategy | top-1 at probes | first ", results.greedy_tokens,
      " tokens | answer hit | KL | P(answer) | coverage | hot per head | hot KiB | warm KiB | "
      "cold KiB | blocks recalled | ms per turn (client / server) |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const std::string& s : o.strategies) {
    const Aggregate* a = Find(aggregates, s, reference);
    if (a == nullptr) continue;
    absl::StrAppend(&md, "| ", s, " | ", Fixed(a->probe_top1, 3), " | ",
                    Fixed(a->greedy_match, 3), " | ", Fixed(a->answer_hit, 3),
                    " | n/a | n/a | n/a | ", Fixed(a->final_hot_per_head, 1), " | ",
                    Fixed(a->final_hot_bytes / 1024, 1), " | ",
                    Fixed(a->final_warm_bytes / 1024, 1), " | ",
                    Fixed(a->final_cold_bytes / 1024, 1), " | ", Fixed(a->blocks_recalled, 1),
                    " | ", Fixed(a->turn_ms, 2), " / ", Fixed(a->server_ms, 2), " |\n");
  }
  auto by_budget = [&](const std::string& title, auto value, int decimals) {
    absl::StrAppend(&md, "\n## ", title, " by hot budget\n\n| strategy |");
    std::string rule = "|---|";
    for (int b : o.budgets) {
      absl::StrAppend(&md, " ", b, " |");
      rule += "---:|";
    }
    absl::StrAppend(&md, "\n", rule, "\n");
    for (const std::string& s : o.strategies) {
      absl::StrAppend(&md, "| ", s, " |");
      for (int b : o.budgets) {
        const Aggregate* a = Find(aggregates, s, b);
        absl::StrAppend(&md, " ", a ? Fixed(value(*a), decimals) : "–", " |");
      }
      md += "\n";
    }
  };
  by_budget(
      "Top-1 agreement at probes", [](const Aggregate& a) { return a.probe_top1; }, 3);
  by_budget(
      absl::StrCat("First ", results.greedy_tokens, " greedy tokens equal full's"),
      [](const Aggregate& a) { return a.greedy_match; }, 3);
  by_budget(
      "Answer hit at probes", [](const Aggregate& a) { return a.answer_hit; }, 3);
  by_budget(
      "Hot entries per head", [](const Aggregate& a) { return a.final_hot_per_head; }, 1);
  return md;
}

}  // namespace

std::string SummaryMarkdown(const SimResults& results, const std::vector<Aggregate>& aggregates,
                            const ReportOptions& options) {
  if (!results.server.empty()) return ServerSummaryMarkdown(results, aggregates, options);
  const SimOptions& o = results.options;
  const int reference = ReferenceBudget(results, options);
  std::string md = absl::StrCat("# kvmem-sim: ", results.scenario, "\n\n");
  if (!options.command_line.empty()) {
    absl::StrAppend(&md, "Command: `", options.command_line, "`\n\n");
  }
  const auto [shortest, longest] =
      std::minmax_element(results.session_tokens.begin(), results.session_tokens.end());
  int64_t turns = 0, probes = 0;
  for (const TurnMetrics& m : results.turns) {
    if (m.strategy == "full" && m.budget == o.budgets.front()) {
      ++turns;
      probes += m.probe;
    }
  }
  absl::StrAppend(
      &md, "- model: ", options.model_name.empty() ? "(unnamed)" : options.model_name, " (",
      results.num_layers, " layers x ", results.num_kv_heads, " KV heads, context ",
      results.context, ")\n", "- sessions: ", results.sessions, ", turns: ", turns, " (", probes,
      " probes), tokens per session: ", results.session_tokens.empty() ? 0 : *shortest, "-",
      results.session_tokens.empty() ? 0 : *longest, "\n",
      "- hot budgets (entries per layer and KV head): ", absl::StrJoin(o.budgets, ", "),
      "; reference budget: ", reference, "\n", "- settings: SnapKV window ", o.window, ", kernel ",
      o.kernel, " (", o.pooling == Pooling::kMax ? "max" : "avg", " pooling); h2o recent share ",
      o.recent_share, "; window sinks ", o.sink_tokens, "; adakv min head share ", o.min_head_share,
      "; snapkv+recall recall_blocks ", o.recall_blocks, "; block size ", o.block_size, "\n");
  absl::StrAppend(
      &md,
      "\nMetrics at probe turns are means over every probe of every session; KL and top-1 "
      "compare each token's next-token distribution with the uncompressed run (`full`). "
      "P(answer) is the probability of the planted answer's tokens given the probe prompt; "
      "the log-P gap is the mean of log P(answer) minus full's. Fact hot: share of the "
      "fact's (layer, head, position) entries hot when the probe begins. Coverage: share "
      "of full's attention from the probe's queries to earlier context that falls on the "
      "hot set when the turn begins (mean over heads / worst head); blocks that recall brings "
      "in are attended but not hot, so they do not count. Bytes are after each session's "
      "last turn; block bytes are the full-fidelity blocks (in process they all sit in host "
      "RAM, the warm tier). Blocks recalled: (layer, KV head, block) recalls per session, "
      "summed over its turns and averaged over sessions.\n\n");
  absl::StrAppend(&md, "## Strategies at hot budget ", reference, "\n\n");
  md +=
      "| strategy | KL at probes | top-1 at probes | P(answer) | log-P gap | fact hot | "
      "coverage mean / worst head | KL all turns | hot per head | hot KiB | block KiB | "
      "blocks recalled | ms per turn |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const std::string& s : o.strategies) {
    const Aggregate* a = Find(aggregates, s, reference);
    if (a == nullptr) continue;
    absl::StrAppend(&md, "| ", s, " | ", Fixed(a->probe_kl, 4), " | ", Fixed(a->probe_top1, 3),
                    " | ", Fixed(a->fact_prob, 4), " | ", Fixed(a->fact_logprob_gap, 3), " | ",
                    Fixed(a->fact_hot, 3), " | ", Fixed(a->probe_coverage, 3), " / ",
                    Fixed(a->probe_coverage_min, 3), " | ", Fixed(a->kl, 4), " | ",
                    Fixed(a->final_hot_per_head, 1), " | ", Fixed(a->final_hot_bytes / 1024, 1),
                    " | ", Fixed(a->final_block_bytes / 1024, 1), " | ",
                    Fixed(a->blocks_recalled, 1), " | ", Fixed(a->turn_ms, 2), " |\n");
  }
  auto by_budget = [&](const char* title, auto value, int decimals) {
    absl::StrAppend(&md, "\n## ", title, " by hot budget\n\n| strategy |");
    std::string rule = "|---|";
    for (int b : o.budgets) {
      absl::StrAppend(&md, " ", b, " |");
      rule += "---:|";
    }
    absl::StrAppend(&md, "\n", rule, "\n");
    for (const std::string& s : o.strategies) {
      absl::StrAppend(&md, "| ", s, " |");
      for (int b : o.budgets) {
        const Aggregate* a = Find(aggregates, s, b);
        absl::StrAppend(&md, " ", a ? Fixed(value(*a), decimals) : "–", " |");
      }
      md += "\n";
    }
  };
  by_budget(
      "P(answer) at probes", [](const Aggregate& a) { return a.fact_prob; }, 4);
  by_budget(
      "KL at probes (nats)", [](const Aggregate& a) { return a.probe_kl; }, 4);
  by_budget(
      "Top-1 agreement at probes", [](const Aggregate& a) { return a.probe_top1; }, 3);
  by_budget(
      "Attention coverage at probes", [](const Aggregate& a) { return a.probe_coverage; }, 3);
  return md;
}

absl::Status WriteReport(const SimResults& results, const ReportOptions& options) {
  const int reference = ReferenceBudget(results, options);
  const std::vector<int>& budgets = results.options.budgets;
  if (std::find(budgets.begin(), budgets.end(), reference) == budgets.end()) {
    return absl::InvalidArgumentError(absl::StrCat("reference budget ", reference,
                                                   " is not one of the budgets run (",
                                                   absl::StrJoin(budgets, ", "), ")"));
  }
  const std::filesystem::path dir(options.out_dir);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create output directory ", options.out_dir, ": ", ec.message()));
  }
  const std::vector<Aggregate> aggregates = Aggregates(results);
  KVMEM_RETURN_IF_ERROR(WriteFile(dir / "turns.csv", TurnsCsv(results)));
  KVMEM_RETURN_IF_ERROR(WriteFile(dir / "heads.csv", HeadsCsv(results)));
  KVMEM_RETURN_IF_ERROR(WriteFile(dir / "summary.csv", SummaryCsv(aggregates)));
  if (!results.server.empty()) {
    KVMEM_RETURN_IF_ERROR(WriteFile(dir / "probes.csv", ProbesCsv(results)));
  }
  KVMEM_RETURN_IF_ERROR(
      WriteFile(dir / "summary.md", SummaryMarkdown(results, aggregates, options)));
  KVMEM_RETURN_IF_ERROR(WritePlots(results, aggregates, reference, dir));
  if (options.gnuplot.empty()) return absl::OkStatus();
  const std::string command = absl::StrCat("cd ", ShellQuote(dir.string()), " && ",
                                           ShellQuote(options.gnuplot), " plots.gp");
  const int rc = std::system(command.c_str());
  if (rc != 0) {
    const int code = WIFEXITED(rc) ? WEXITSTATUS(rc) : rc;
    return absl::InternalError(absl::StrCat(
        "gnuplot failed (", code == 127 ? "not found" : absl::StrCat("exit status ", code),
        "): the CSV, Markdown and plots.gp are in ", dir.string(),
        "; install gnuplot-nox (scripts/bootstrap.sh does) or pass --gnuplot '' to skip plots"));
  }
  return absl::OkStatus();
}

}  // namespace kvmem::sim
