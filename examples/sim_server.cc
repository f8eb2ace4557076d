#include "examples/sim_server.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"

namespace kvmem::sim {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr char kRunLabel[] = "kvmem-sim-run";

// Deletes every session of the run that is still alive when it goes out of scope, so a
// failed run leaves nothing behind either.
class RunSessions {
 public:
  explicit RunSessions(AgentMemoryClient& client) : client_(client) {}
  ~RunSessions() {
    for (const std::string& id : live_) client_.DeleteSession(id).IgnoreError();
  }
  RunSessions(const RunSessions&) = delete;
  RunSessions& operator=(const RunSessions&) = delete;

  void Created(const std::string& id) { live_.insert(id); }
  absl::Status Delete(const std::string& id) {
    live_.erase(id);
    return client_.DeleteSession(id);
  }

 private:
  AgentMemoryClient& client_;
  std::set<std::string> live_;
};

absl::Status WithContext(const absl::Status& status, const std::string& where) {
  return absl::Status(status.code(), absl::StrCat(where, ": ", status.message()));
}

// A session id may hold [A-Za-z0-9._-]; strategy labels may hold '+'.
std::string IdPart(const std::string& text) {
  std::string out = text;
  for (char& c : out) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) {
      c = '_';
    }
  }
  return out;
}

std::string FreshPrefix() {
  std::random_device random;
  return absl::StrFormat("kvmem-sim-%08x", random());
}

// The greedy continuations of one probe prompt.
struct Continuation {
  std::string first;  // 1 token
  int64_t first_tokens = 0;
  std::string text;  // greedy_tokens tokens (fewer at EOS)
  int64_t tokens = 0;
};

bool SameFirst(const Continuation& a, const Continuation& b) {
  return a.first == b.first && a.first_tokens == b.first_tokens;
}
bool SameText(const Continuation& a, const Continuation& b) {
  return a.text == b.text && a.tokens == b.tokens;
}

v1::CreateSessionRequest CreateRequest(const std::string& id, const std::string& prefix,
                                       const MemoryOptions& m, int recall_blocks,
                                       const std::string& chat_template) {
  v1::CreateSessionRequest request;
  request.set_session_id(id);
  (*request.mutable_labels())[kRunLabel] = prefix;
  v1::MemoryPolicy* memory = request.mutable_memory();
  memory->set_policy(m.policy);
  memory->set_hot_budget(m.budget);
  memory->set_window(m.window);
  memory->set_kernel(m.kernel);
  memory->set_pooling(m.pooling == Pooling::kMax ? v1::POOLING_MAX : v1::POOLING_AVG);
  memory->set_recall_blocks(recall_blocks);
  request.set_chat_template(chat_template);
  return request;
}

// The server's answer to a policy name it does not know (the engine's "unknown memory
// policy", or a service-side check worded alike).
bool RejectsPolicyName(const absl::Status& status) {
  return status.code() == absl::StatusCode::kInvalidArgument &&
         absl::StrContains(status.message(), "policy") &&
         (absl::StrContains(status.message(), "unknown") ||
          absl::StrContains(status.message(), "not supported"));
}

absl::StatusOr<v1::GenerateUsage> Greedy(AgentMemoryClient& client, const std::string& id,
                                         int tokens) {
  v1::GenerateRequest request;
  request.set_session_id(id);
  request.set_max_tokens(tokens);
  request.set_temperature(0);
  request.set_discard(true);
  return client.Generate(request);
}

// One session of the scenario replayed on the server, turn by turn.
struct ReplayedSession {
  std::vector<TurnMetrics> turns;
  std::vector<std::optional<Continuation>> probes;  // by turn
  v1::Session last;                                 // GetSession after the last turn
};

// Replays `spec` in a session created by `create`, measuring each probe on a fork (see the
// header), and deletes the session. `where` names the run in errors.
absl::StatusOr<ReplayedSession> Replay(AgentMemoryClient& client, RunSessions& sessions,
                                       const v1::CreateSessionRequest& create,
                                       const std::string& strategy, int budget, int s,
                                       const ScenarioSession& spec, int greedy_tokens,
                                       const std::string& where) {
  absl::StatusOr<v1::Session> created = client.CreateSession(create);
  if (!created.ok()) return WithContext(created.status(), where + ": CreateSession");
  const std::string& id = create.session_id();
  sessions.Created(id);
  ReplayedSession out;
  for (size_t t = 0; t < spec.turns.size(); ++t) {
    const ScenarioTurn& turn = spec.turns[t];
    const std::string at = absl::StrCat(where, " turn ", t);
    KVMEM_ASSIGN_OR_RETURN(v1::Role role, RoleFromName(RoleName(turn.role)));
    std::optional<Continuation>& probe = out.probes.emplace_back();
    if (turn.probe) {
      const std::string fork_id = id + "-probe";
      absl::StatusOr<v1::Session> fork = client.ForkSession(id, fork_id);
      if (!fork.ok()) return WithContext(fork.status(), at + ": ForkSession for the probe");
      sessions.Created(fork_id);
      absl::StatusOr<v1::AppendTurnResponse> prompt = client.AppendTurn(fork_id, role, turn.text);
      if (!prompt.ok())
        return WithContext(prompt.status(), at + ": AppendTurn of the probe prompt");
      absl::StatusOr<v1::GenerateUsage> first = Greedy(client, fork_id, 1);
      if (!first.ok()) return WithContext(first.status(), at + ": Generate (1 token)");
      absl::StatusOr<v1::GenerateUsage> longer = Greedy(client, fork_id, greedy_tokens);
      if (!longer.ok()) {
        return WithContext(longer.status(),
                           absl::StrCat(at, ": Generate (", greedy_tokens, " tokens)"));
      }
      probe = Continuation{.first = first->text(),
                           .first_tokens = first->generated_tokens(),
                           .text = longer->text(),
                           .tokens = longer->generated_tokens()};
      if (absl::Status st = sessions.Delete(fork_id); !st.ok()) {
        return WithContext(st, at + ": DeleteSession of the probe fork");
      }
    }

    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<v1::AppendTurnResponse> r = client.AppendTurn(id, role, turn.AppendedText());
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (!r.ok()) return WithContext(r.status(), at + ": AppendTurn");
    absl::StatusOr<v1::Session> shown = client.GetSession(id);
    if (!shown.ok()) return WithContext(shown.status(), at + ": GetSession");

    TurnMetrics m;
    m.strategy = strategy;
    m.budget = budget;
    m.session = s;
    m.turn = static_cast<int>(t);
    m.role = turn.role;
    m.probe = turn.probe.has_value();
    m.turn_tokens = r->turn_tokens();
    m.first_position = r->total_tokens() - r->turn_tokens();
    m.kl = m.top1 = kNaN;  // top1 is set at probes once full's continuation is known
    m.fact_logprob = m.fact_prob = m.fact_hot = kNaN;
    m.coverage_mean = m.coverage_min = kNaN;
    m.hot_tokens = shown->hot_tokens();
    m.hot_per_head = static_cast<double>(shown->hot_tokens()) /
                     static_cast<double>(std::max(1, shown->hot_tokens_per_head_size()));
    m.hot_bytes = shown->hot_bytes();
    m.block_bytes = shown->cold_bytes();
    m.warm_blocks = shown->warm_blocks();
    m.warm_bytes = shown->warm_bytes();
    m.cold_blocks = shown->cold_blocks();
    m.cold_bytes = shown->cold_bytes();
    m.evicted = r->evicted();
    m.blocks_recalled = r->recalled_blocks();
    m.warm_hits = r->warm_hits();
    m.cold_reads = r->cold_reads();
    m.turn_ms = ms;
    m.prefill_ms = r->timings().prefill_ms();
    m.select_ms = r->timings().select_ms();
    m.server_ms = r->timings().total_ms();
    m.queue_ms = r->timings().queue_ms();
    m.commit_ms = r->timings().commit_ms();
    if (probe) {
      m.greedy_text = probe->text;
      m.answer_hit = absl::StartsWith(absl::StripLeadingAsciiWhitespace(probe->text),
                                      absl::StripAsciiWhitespace(turn.probe->answer));
    }
    out.turns.push_back(std::move(m));
    if (t + 1 == spec.turns.size()) out.last = *std::move(shown);
  }
  if (absl::Status st = sessions.Delete(id); !st.ok()) {
    return WithContext(st, where + ": DeleteSession");
  }
  return out;
}

}  // namespace

absl::StatusOr<SimResults> RunServerSimulation(AgentMemoryClient& client,
                                               const std::string& address, const Scenario& scenario,
                                               const SimOptions& options,
                                               const ServerSimOptions& server_options) {
  if (server_options.greedy_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("greedy tokens must be >= 1, got ", server_options.greedy_tokens));
  }
  const std::string prefix =
      server_options.session_prefix.empty() ? FreshPrefix() : server_options.session_prefix;
  if (prefix.size() > 64 || IdPart(prefix) != prefix) {
    return absl::InvalidArgumentError(
        absl::StrCat("session prefix \"", prefix, "\" must be at most 64 of [A-Za-z0-9._-]"));
  }
  SimResults results;
  results.scenario = scenario.name;
  results.sessions = static_cast<int>(scenario.sessions.size());
  results.options = options;
  results.options.retention_session = -1;  // hot positions are not exposed over gRPC
  results.server = address;
  results.greedy_tokens = server_options.greedy_tokens;
  std::vector<std::string>& strategies = results.options.strategies;
  strategies = {"full"};
  for (const std::string& s : options.strategies) {
    int unused;
    KVMEM_RETURN_IF_ERROR(StrategyMemory(s, 1, options, &unused).status());
    if (std::find(strategies.begin(), strategies.end(), s) == strategies.end()) {
      strategies.push_back(s);
    }
  }
  std::vector<int>& budgets = results.options.budgets;
  if (budgets.empty()) return absl::InvalidArgumentError("give at least one hot budget");
  std::sort(budgets.begin(), budgets.end());
  budgets.erase(std::unique(budgets.begin(), budgets.end()), budgets.end());

  // Settings the run sends are checked before any session exists; those that depend on the
  // server's own settings (window sinks, h2o and adakv shares) are the server's to check.
  for (const std::string& strategy : strategies) {
    for (int budget : budgets) {
      int recall = 0;
      KVMEM_ASSIGN_OR_RETURN(MemoryOptions memory,
                             StrategyMemory(strategy, budget, options, &recall));
      if (memory.policy != "snapkv" && memory.policy != "snapkv-adaptive") continue;
      if (absl::Status valid = ValidateMemoryOptions(memory); !valid.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("strategy ", strategy, " at budget ", budget, ": ", valid.message()));
      }
    }
  }

  if (absl::Status health = client.CheckHealth(); !health.ok()) {
    if (health.code() == absl::StatusCode::kUnavailable ||
        health.code() == absl::StatusCode::kDeadlineExceeded) {
      return absl::UnavailableError(
          absl::StrCat("cannot reach kvmemd at ", address, " (", health.message(),
                       "): start it (kvmemd --listen ", address,
                       " --model DIR) or point --server at the address it listens on"));
    }
    // Other answers (e.g. UNAUTHENTICATED) come from a live server; its calls will tell.
  }

  RunSessions sessions(client);
  auto session_id = [&](const std::string& strategy, int budget, int s) {
    return absl::StrCat(prefix, "-", IdPart(strategy), "-b", budget, "-s", s);
  };
  auto where = [&](const std::string& strategy, int budget, int s) {
    return absl::StrCat(strategy, " at budget ", budget, ", session \"", scenario.sessions[s].name,
                        "\"");
  };

  // 1. full, once per session (its hot set does not depend on the budget).
  std::vector<std::vector<std::optional<Continuation>>> reference(scenario.sessions.size());
  std::vector<TurnMetrics> full_rows;
  for (size_t s = 0; s < scenario.sessions.size(); ++s) {
    int recall = 0;
    KVMEM_ASSIGN_OR_RETURN(MemoryOptions memory,
                           StrategyMemory("full", budgets.front(), options, &recall));
    const int si = static_cast<int>(s);
    KVMEM_ASSIGN_OR_RETURN(ReplayedSession replayed,
                           Replay(client, sessions,
                                  CreateRequest(session_id("full", 0, si), prefix, memory, recall,
                                                scenario.chat_template),
                                  "full", 0, si, scenario.sessions[s], server_options.greedy_tokens,
                                  where("full", budgets.front(), si)));
    for (TurnMetrics& m : replayed.turns) {
      if (m.probe) m.top1 = m.greedy_match = 1;
      full_rows.push_back(std::move(m));
    }
    reference[s] = std::move(replayed.probes);
    results.session_tokens.push_back(replayed.last.total_tokens());
    if (s == 0) {
      results.num_layers = replayed.last.num_layers();
      results.num_kv_heads = replayed.last.num_kv_heads();
      results.options.block_size = replayed.last.block_size();
      results.model_fingerprint = replayed.last.model_fingerprint();
    }
  }
  for (int budget : budgets) {
    for (TurnMetrics row : full_rows) {
      row.budget = budget;
      results.turns.push_back(std::move(row));
    }
  }
  if (options.progress) {
    options.progress(absl::StrCat("full: ", scenario.sessions.size(), " sessions on ", address));
  }

  // 2. Every other strategy and budget, against full's continuations.
  std::vector<std::string> skipped;
  for (const std::string& strategy : strategies) {
    if (strategy == "full") continue;
    bool skip = false;
    for (int budget : budgets) {
      const auto start = std::chrono::steady_clock::now();
      int recall = 0;
      KVMEM_ASSIGN_OR_RETURN(MemoryOptions memory,
                             StrategyMemory(strategy, budget, options, &recall));
      for (size_t s = 0; s < scenario.sessions.size() && !skip; ++s) {
        const int si = static_cast<int>(s);
        absl::StatusOr<ReplayedSession> replayed =
            Replay(client, sessions,
                   CreateRequest(session_id(strategy, budget, si), prefix, memory, recall,
                                 scenario.chat_template),
                   strategy, budget, si, scenario.sessions[s], server_options.greedy_tokens,
                   where(strategy, budget, si));
        if (!replayed.ok()) {
          // Only the run's first session of a strategy can tell an unknown policy name.
          if (budget == budgets.front() && s == 0 && RejectsPolicyName(replayed.status())) {
            results.notes.push_back(
                absl::StrCat("skipped ", strategy, ": the server does not accept policy \"",
                             memory.policy, "\" (", replayed.status().message(), ")"));
            if (options.progress) options.progress(results.notes.back());
            skip = true;
            break;
          }
          return replayed.status();
        }
        for (TurnMetrics& m : replayed->turns) {
          const std::optional<Continuation>& mine = replayed->probes[m.turn];
          const std::optional<Continuation>& full = reference[s][m.turn];
          if (mine && full) {
            m.top1 = SameFirst(*mine, *full);
            m.greedy_match = SameText(*mine, *full);
          }
          results.turns.push_back(std::move(m));
        }
      }
      if (skip) break;
      if (options.progress) {
        options.progress(absl::StrCat(
            strategy, " at budget ", budget, ": ", scenario.sessions.size(), " sessions in ",
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), " s"));
      }
    }
    if (skip) skipped.push_back(strategy);
  }
  for (const std::string& s : skipped) {
    strategies.erase(std::find(strategies.begin(), strategies.end(), s));
  }
  return results;
}

}  // namespace kvmem::sim
