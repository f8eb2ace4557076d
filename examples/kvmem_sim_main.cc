// `kvmem-sim`: multi-turn memory simulations. Replays the sessions of a scenario (a JSON file
// or the built-in generator) under several memory strategies and hot budgets with the
// in-process engine (simulator.h) or a running kvmemd over gRPC (--server, sim_server.h), and
// writes CSV, a Markdown summary and gnuplot plots (see sim_report.h).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/cpu_backend.h"
#include "engine/malloc_arenas.h"
#include "engine/model.h"
#include "examples/sim_report.h"
#include "examples/sim_scenario.h"
#include "examples/sim_server.h"
#include "examples/simulator.h"

namespace {

constexpr char kUsage[] = R"(usage: kvmem-sim (--scenario FILE | --synthetic) [options]

Scenario:
  --scenario FILE         JSON scenario (format: docs/simulation.md)
  --synthetic             the built-in generator instead, with
    --sessions N            sessions (default 8)
    --turns T               turns per session (default 12)
    --facts F               facts planted early and probed late per session (default 2)
    --seed S                generator seed (default 1)
    --filler-sentences K    at most K sentences per filler turn (default 2)
  --write-scenario FILE   also write the scenario that ran, as JSON

Strategies and budgets:
  --strategies LIST       comma-separated, from full,window,h2o,snapkv,snapkv+recall,
                          snapkv-adaptive,adakv (default: all; full always runs)
  --budgets LIST          comma-separated hot budgets, entries per layer and KV head
                          (default 64)
  --window W              SnapKV observation window, h2o recent entries (default 8)
  --kernel K              SnapKV pooling kernel, odd (default 5)
  --pooling max|avg       SnapKV pooling (default max)
  --sink-tokens S         window: attention sinks kept (default 4; in process only)
  --min-head-share F      adakv: budget share every head keeps (default 0.2; in process only)
  --recall-blocks R       snapkv+recall: blocks recalled per layer and head (default 8)
  --block-size B          positions per KV block (default 16; in process only)

Output:
  --out DIR               output directory (default sim-out)
  --reference-budget B    budget of the main table, per-turn plot and heat maps
                          (default: the median budget)
  --heatmap-session I     session whose per-head retention is mapped (default 0; in process
                          only)
  --gnuplot PROG          plot renderer (default gnuplot; '' writes scripts only)

Engine (in process):
  --model DIR             model directory (default: $KVMEM_MODEL, else
                          ../shared/models/stories260K beside the project root)
  --threads N             CPU backend threads (default 1)

Server (drive a running kvmemd over gRPC instead; metrics that need logits are n/a):
  --server HOST:PORT      where kvmemd listens
  --token T               bearer token (kvmemd --auth-tokens)
  --greedy-tokens K       greedy tokens compared with full's at each probe (default 8)
  --session-prefix P      prefix of the session ids the run creates and deletes
                          (default kvmem-sim-<random hex>)
  --timeout-ms MS         deadline of every call (default 0: none)
)";

int Fail(const std::string& message) {
  std::fprintf(stderr, "kvmem-sim: %s\n", message.c_str());
  return 2;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "kvmem-sim: %s: %s\n", absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return 1;
}

// --name value, --name=value, and the value-less flags in `switches`.
struct Flags {
  std::map<std::string, std::string> values;
  bool Has(const std::string& name) const { return values.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& fallback = "") const {
    auto it = values.find(name);
    return it == values.end() ? fallback : it->second;
  }
};

bool ParseFlags(int argc, char** argv, const std::set<std::string>& known,
                const std::set<std::string>& switches, Flags* flags, std::string* error) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      *error = "unexpected argument " + arg;
      return false;
    }
    std::string name = arg.substr(2), value;
    const auto eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (!known.count(name) && !switches.count(name)) {
      *error = "unknown flag --" + name;
      return false;
    }
    if (switches.count(name)) {
      if (eq != std::string::npos) {
        *error = "flag --" + name + " takes no value";
        return false;
      }
      value = "1";
    } else if (eq == std::string::npos) {
      if (i + 1 >= argc) {
        *error = "flag --" + name + " needs a value";
        return false;
      }
      value = argv[++i];
    }
    if (!flags->values.emplace(name, value).second) {
      *error = "flag --" + name + " given twice";
      return false;
    }
  }
  return true;
}

template <typename T>
bool ParseNumber(const Flags& flags, const std::string& name, T* out, std::string* error) {
  if (!flags.Has(name)) return true;
  const std::string text = flags.Get(name);
  bool ok;
  if constexpr (std::is_floating_point_v<T>) {
    ok = absl::SimpleAtod(text, out);
  } else {
    ok = absl::SimpleAtoi(text, out);
  }
  if (!ok) *error = "--" + name + " must be a number, got \"" + text + "\"";
  return ok;
}

bool ParseList(const Flags& flags, const std::string& name, std::vector<int>* out,
               std::string* error) {
  if (!flags.Has(name)) return true;
  out->clear();
  for (absl::string_view item : absl::StrSplit(flags.Get(name), ',', absl::SkipEmpty())) {
    int v;
    if (!absl::SimpleAtoi(item, &v) || v <= 0) {
      *error = absl::StrCat("--", name, " takes positive integers separated by commas, got \"",
                            flags.Get(name), "\"");
      return false;
    }
    out->push_back(v);
  }
  if (out->empty()) {
    *error = "--" + name + " is empty";
    return false;
  }
  return true;
}

std::string CommandLine(int argc, char** argv) {
  std::vector<std::string> words = {"kvmem-sim"};
  for (int i = 1; i < argc; ++i) {
    std::string w = argv[i];
    const bool plain = w.find_first_of(" '\"$\\*?()[]{};&|<>") == std::string::npos && !w.empty();
    words.push_back(plain ? w : "'" + w + "'");
  }
  return absl::StrJoin(words, " ");
}

}  // namespace

int main(int argc, char** argv) {
  kvmem::ShareOneMallocArena();  // as kvmemd does
  using namespace kvmem;
  using namespace kvmem::sim;
  Flags flags;
  std::string error;
  if (argc >= 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (!ParseFlags(argc, argv, {"scenario",      "sessions",         "turns",           "facts",
                               "seed",          "filler-sentences", "write-scenario",  "strategies",
                               "budgets",       "window",           "kernel",          "pooling",
                               "sink-tokens",   "min-head-share",   "recall-blocks",   "block-size",
                               "out",           "reference-budget", "heatmap-session", "gnuplot",
                               "model",         "threads",          "server",          "token",
                               "greedy-tokens", "session-prefix",   "timeout-ms"},
                  {"synthetic"}, &flags, &error)) {
    return Fail(error + "\n" + kUsage);
  }
  const bool server = flags.Has("server");
  if (server) {
    // What kvmemd decides for every session, or what the API cannot show.
    for (const char* local :
         {"sink-tokens", "min-head-share", "block-size", "model", "threads", "heatmap-session"}) {
      if (flags.Has(local)) {
        return Fail(absl::StrCat("--", local, " applies in process only: with --server ",
                                 std::string_view(local) == "heatmap-session"
                                     ? "hot positions are not exposed over gRPC"
                                     : "kvmemd's own flags set it"));
      }
    }
    if (flags.Get("server").empty()) return Fail("--server needs HOST:PORT");
  } else {
    for (const char* remote : {"token", "greedy-tokens", "session-prefix", "timeout-ms"}) {
      if (flags.Has(remote)) return Fail(absl::StrCat("--", remote, " configures --server"));
    }
  }
  if (flags.Has("scenario") == flags.Has("synthetic")) {
    return Fail(std::string("give exactly one of --scenario FILE and --synthetic\n") + kUsage);
  }
  for (const char* generator_flag : {"sessions", "turns", "facts", "seed", "filler-sentences"}) {
    if (flags.Has(generator_flag) && !flags.Has("synthetic")) {
      return Fail(absl::StrCat("--", generator_flag, " configures --synthetic"));
    }
  }

  SyntheticOptions synthetic;
  SimOptions sim;
  ReportOptions report;
  report.out_dir = flags.Get("out", "sim-out");
  report.gnuplot = flags.Get("gnuplot", "gnuplot");
  report.command_line = CommandLine(argc, argv);
  int threads = 1;
  ServerSimOptions server_sim;
  server_sim.session_prefix = flags.Get("session-prefix");
  int64_t timeout_ms = 0;
  if (!ParseNumber(flags, "sessions", &synthetic.sessions, &error) ||
      !ParseNumber(flags, "turns", &synthetic.turns, &error) ||
      !ParseNumber(flags, "facts", &synthetic.facts, &error) ||
      !ParseNumber(flags, "seed", &synthetic.seed, &error) ||
      !ParseNumber(flags, "filler-sentences", &synthetic.max_filler_sentences, &error) ||
      !ParseList(flags, "budgets", &sim.budgets, &error) ||
      !ParseNumber(flags, "window", &sim.window, &error) ||
      !ParseNumber(flags, "kernel", &sim.kernel, &error) ||
      !ParseNumber(flags, "sink-tokens", &sim.sink_tokens, &error) ||
      !ParseNumber(flags, "min-head-share", &sim.min_head_share, &error) ||
      !ParseNumber(flags, "recall-blocks", &sim.recall_blocks, &error) ||
      !ParseNumber(flags, "block-size", &sim.block_size, &error) ||
      !ParseNumber(flags, "heatmap-session", &sim.retention_session, &error) ||
      !ParseNumber(flags, "reference-budget", &report.reference_budget, &error) ||
      !ParseNumber(flags, "threads", &threads, &error) ||
      !ParseNumber(flags, "greedy-tokens", &server_sim.greedy_tokens, &error) ||
      !ParseNumber(flags, "timeout-ms", &timeout_ms, &error)) {
    return Fail(error);
  }
  if (flags.Has("strategies")) {
    sim.strategies = absl::StrSplit(flags.Get("strategies"), ',', absl::SkipEmpty());
    for (const std::string& s : sim.strategies) {
      int unused;
      if (absl::Status st = StrategyMemory(s, 64, sim, &unused).status(); !st.ok()) {
        return Fail(st);
      }
    }
  }
  if (flags.Has("pooling")) {
    const std::string p = flags.Get("pooling");
    if (p != "max" && p != "avg") return Fail("--pooling is max or avg, got \"" + p + "\"");
    sim.pooling = p == "max" ? Pooling::kMax : Pooling::kAvg;
  }
  if (report.reference_budget != 0 && std::find(sim.budgets.begin(), sim.budgets.end(),
                                                report.reference_budget) == sim.budgets.end()) {
    return Fail(
        absl::StrCat("--reference-budget ", report.reference_budget, " is not one of --budgets"));
  }

  absl::StatusOr<Scenario> scenario =
      flags.Has("scenario") ? LoadScenarioFile(flags.Get("scenario")) : GenerateScenario(synthetic);
  if (!scenario.ok()) return Fail(scenario.status());
  if (flags.Has("write-scenario")) {
    const std::filesystem::path path = flags.Get("write-scenario");
    std::error_code ignored;  // a failure shows when the file is written
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), ignored);
    std::ofstream out(path);
    out << ScenarioToJson(*scenario).dump(2) << "\n";
    if (!out) return Fail("cannot write " + flags.Get("write-scenario"));
  }

  sim.progress = [](const std::string& line) {
    std::fprintf(stderr, "kvmem-sim: %s\n", line.c_str());
  };
  if (server) {
    const std::string address = flags.Get("server");
    AgentMemoryClient client(
        {.address = address, .token = flags.Get("token"), .timeout_ms = timeout_ms});
    auto results = RunServerSimulation(client, address, *scenario, sim, server_sim);
    if (!results.ok()) return Fail(results.status());
    report.model_name = "kvmemd at " + address;
    if (absl::Status s = WriteReport(*results, report); !s.ok()) return Fail(s);
    std::fprintf(stderr, "kvmem-sim: wrote %s/summary.md, CSV files%s\n", report.out_dir.c_str(),
                 report.gnuplot.empty() ? " and plots.gp" : " and plots");
    return 0;
  }

  auto dir = ResolveModelDir(flags.Get("model"));
  if (!dir.ok()) return Fail(dir.status());
  auto model = Model::Load(*dir);
  if (!model.ok()) return Fail(model.status());
  report.model_name = std::filesystem::path(*dir).filename().string();
  if (report.model_name.empty()) report.model_name = *dir;
  CpuBackend backend(**model, {.threads = threads});

  auto results = RunSimulation(**model, backend, *scenario, sim);
  if (!results.ok()) return Fail(results.status());
  if (absl::Status s = WriteReport(*results, report); !s.ok()) return Fail(s);
  std::fprintf(stderr, "kvmem-sim: wrote %s/summary.md, CSV files%s\n", report.out_dir.c_str(),
               report.gnuplot.empty() ? " and plots.gp" : " and plots");
  return 0;
}
