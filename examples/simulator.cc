#include "examples/simulator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "engine/chat_template.h"
#include "engine/session.h"
#include "engine/status_macros.h"
#include "examples/sim_metrics.h"

namespace kvmem::sim {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// A turn's tokens as the session will see them.
struct PreparedTurn {
  int64_t first = 0;   // absolute position of the turn's first token
  int64_t tokens = 0;  // turn length
  // Probe turns: the answer's tokens are [answer_begin, answer_end) of the turn (0, 0 else);
  // answer_begin > 0, so the token before the answer is in the same turn.
  int64_t answer_begin = 0;
  int64_t answer_end = 0;
};

struct PreparedSession {
  std::vector<PreparedTurn> turns;
  std::map<std::string, std::pair<int64_t, int64_t>> facts;  // id -> [begin, end)
  int64_t total = 0;
};

// Tokenizes every turn the way Session::AppendTurn will, to find probe answers and fact spans
// and to check sessions fit the model's context.
absl::StatusOr<std::vector<PreparedSession>> Prepare(const Model& model, const Scenario& scenario) {
  KVMEM_ASSIGN_OR_RETURN(
      auto chat_template,
      ChatTemplate::Make(scenario.chat_template, *model.tokenizer(), model.config()));
  const int context = model.config().max_position_embeddings;
  std::vector<PreparedSession> out;
  for (size_t s = 0; s < scenario.sessions.size(); ++s) {
    const ScenarioSession& session = scenario.sessions[s];
    PreparedSession prepared;
    int64_t position = 0;
    for (size_t t = 0; t < session.turns.size(); ++t) {
      const ScenarioTurn& turn = session.turns[t];
      const bool first = t == 0;
      KVMEM_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                             chat_template->EncodeTurn(turn.role, turn.AppendedText(), first));
      PreparedTurn p{.first = position, .tokens = static_cast<int64_t>(ids.size())};
      if (turn.probe) {
        KVMEM_ASSIGN_OR_RETURN(std::vector<int32_t> prompt,
                               chat_template->EncodeTurn(turn.role, turn.text, first));
        // ids should be prompt's tokens with the answer's inserted where the text ends: at
        // the end (raw), or before the tokens a template closes a turn with (e.g. EOS).
        size_t prefix = 0, suffix = 0;
        while (prefix < prompt.size() && prefix < ids.size() && prompt[prefix] == ids[prefix]) {
          ++prefix;
        }
        if (prefix < prompt.size()) {
          while (suffix < prompt.size() - prefix && suffix < ids.size() &&
                 prompt[prompt.size() - 1 - suffix] == ids[ids.size() - 1 - suffix]) {
            ++suffix;
          }
        }
        if (ids.size() <= prompt.size() || prefix + suffix < prompt.size() ||
            suffix == prompt.size()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "session \"", session.name, "\" turn ", t, ": the probe answer \"",
              turn.probe->answer, "\" does not tokenize as a continuation of the prompt \"",
              turn.text, "\" under the ", scenario.chat_template,
              " template; the simulator measures the answer as the tokens the answer adds"));
        }
        p.answer_begin = static_cast<int64_t>(prompt.size() - suffix);
        p.answer_end = static_cast<int64_t>(ids.size() - suffix);
      }
      if (!turn.fact.empty()) {
        // A session's opening BOS is an attention sink, not part of the fact.
        const int64_t skip = first && !ids.empty() && ids[0] == model.tokenizer()->bos_id();
        prepared.facts[turn.fact] = {position + skip, position + p.tokens};
      }
      position += p.tokens;
      prepared.turns.push_back(p);
    }
    prepared.total = position;
    if (position > context) {
      return absl::InvalidArgumentError(absl::StrCat(
          "session \"", session.name, "\" is ", position, " tokens long, more than the model's ",
          context, "-token context: shorten its turns or use fewer"));
    }
    out.push_back(std::move(prepared));
  }
  return out;
}

// Hot positions of every (layer, KV head), layer-major.
std::vector<std::vector<int64_t>> HotPositions(const Session& session) {
  const KvCache& hot = session.hot();
  std::vector<std::vector<int64_t>> out;
  for (int l = 0; l < hot.num_layers(); ++l) {
    for (int g = 0; g < hot.num_kv_heads(); ++g) out.push_back(hot.head(l, g).positions);
  }
  return out;
}

// What one turn of a replay hands to its observer.
struct TurnObservation {
  int turn = 0;
  const AppendResult* result = nullptr;
  const Session* session = nullptr;
  const std::vector<std::vector<int64_t>>* hot_before = nullptr;
  double turn_ms = 0;
};

// Appends every turn of `spec` to a new session; calls on_turn after each.
absl::Status Replay(const Model& model, Backend& backend, const SessionOptions& options,
                    const ScenarioSession& spec, const PreparedSession& prepared,
                    int return_queries,
                    const std::function<absl::Status(const TurnObservation&)>& on_turn) {
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Session> session,
                         Session::Create(model, backend, options));
  for (size_t t = 0; t < spec.turns.size(); ++t) {
    const ScenarioTurn& turn = spec.turns[t];
    const std::vector<std::vector<int64_t>> before = HotPositions(*session);
    const auto start = std::chrono::steady_clock::now();
    auto result = session->AppendTurn(turn.role, turn.AppendedText(),
                                      {.return_logits = true, .return_queries = return_queries});
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (!result.ok()) {
      return absl::Status(result.status().code(), absl::StrCat("session \"", spec.name, "\" turn ",
                                                               t, ": ", result.status().message()));
    }
    if (result->turn_tokens != prepared.turns[t].tokens) {
      return absl::InternalError(absl::StrCat(
          "session \"", spec.name, "\" turn ", t, ": the session encoded ", result->turn_tokens,
          " tokens, the simulator expected ", prepared.turns[t].tokens));
    }
    KVMEM_RETURN_IF_ERROR(on_turn({.turn = static_cast<int>(t),
                                   .result = &*result,
                                   .session = session.get(),
                                   .hot_before = &before,
                                   .turn_ms = ms}));
  }
  return absl::OkStatus();
}

// What the uncompressed run of one session leaves for the comparisons.
struct Reference {
  std::vector<std::vector<float>> logits;  // (turn) -> (turn_tokens, vocab)
  // (turn) -> (layer * num_kv_heads + kv_head) -> ContextAttention of the turn's queries.
  std::vector<std::vector<std::vector<double>>> attention;
};

// The metrics of one turn of a compressed (or the full) run against the reference.
TurnMetrics Measure(const Model& model, const std::string& strategy, int budget, int s,
                    const ScenarioTurn& turn, const PreparedSession& prepared,
                    const Reference& reference, const TurnObservation& o) {
  const int vocab = model.config().vocab_size;
  const int t = o.turn;
  const PreparedTurn& p = prepared.turns[t];
  const AppendResult& r = *o.result;
  TurnMetrics m;
  m.strategy = strategy;
  m.budget = budget;
  m.session = s;
  m.turn = t;
  m.role = turn.role;
  m.probe = turn.probe.has_value();
  m.turn_tokens = p.tokens;
  m.first_position = p.first;

  const std::vector<float>& ref = reference.logits[t];
  double kl = 0;
  int agree = 0;
  for (int64_t i = 0; i < p.tokens; ++i) {
    kl += KlDivergence(&ref[i * vocab], &r.logits[i * vocab], vocab);
    agree += ArgMax(&ref[i * vocab], vocab) == ArgMax(&r.logits[i * vocab], vocab);
  }
  m.kl = kl / static_cast<double>(p.tokens);
  m.top1 = agree / static_cast<double>(p.tokens);

  m.fact_logprob = m.fact_prob = m.fact_hot = kNaN;
  if (turn.probe) {
    const std::vector<int32_t>& tokens = o.session->turns().back().tokens;
    double logprob = 0;
    for (int64_t i = p.answer_begin; i < p.answer_end; ++i) {
      logprob += LogProbability(&r.logits[(i - 1) * vocab], vocab, tokens[i]);
    }
    m.fact_logprob = logprob;
    m.fact_prob = std::exp(logprob);
    const auto [begin, end] = prepared.facts.at(turn.probe->fact);
    int64_t hot = 0;
    for (const std::vector<int64_t>& head : *o.hot_before) {
      hot += std::lower_bound(head.begin(), head.end(), end) -
             std::lower_bound(head.begin(), head.end(), begin);
    }
    m.fact_hot = static_cast<double>(hot) /
                 static_cast<double>((end - begin) * static_cast<int64_t>(o.hot_before->size()));
  }

  m.coverage_mean = m.coverage_min = kNaN;
  if (t > 0) {
    double sum = 0, lowest = std::numeric_limits<double>::infinity();
    for (size_t h = 0; h < o.hot_before->size(); ++h) {
      const double c = CoveredShare(reference.attention[t][h], (*o.hot_before)[h]);
      m.coverage.push_back(c);
      sum += c;
      lowest = std::min(lowest, c);
    }
    m.coverage_mean = sum / static_cast<double>(m.coverage.size());
    m.coverage_min = lowest;
  }

  const SessionStats stats = o.session->Stats();
  m.hot_tokens = stats.hot_tokens;
  m.hot_per_head = static_cast<double>(stats.hot_tokens) /
                   static_cast<double>(std::max<size_t>(1, stats.hot_tokens_per_head.size()));
  m.hot_bytes = stats.hot_bytes;
  m.block_bytes = stats.block_bytes;
  m.evicted = r.evicted;
  m.blocks_recalled = r.recalled_blocks;
  m.warm_hits = r.warm_hits;
  m.cold_reads = r.cold_reads;
  m.turn_ms = o.turn_ms;
  m.prefill_ms = r.prefill_ms;
  m.select_ms = r.select_ms;
  return m;
}

// Turns per-turn hot snapshots of one session into its retention map.
RetentionMap Retention(const std::string& strategy, int budget, int s,
                       const PreparedSession& prepared,
                       const std::vector<std::vector<std::vector<int64_t>>>& hot_after) {
  RetentionMap map;
  map.strategy = strategy;
  map.budget = budget;
  map.session = s;
  map.heads = hot_after.empty() ? 0 : static_cast<int>(hot_after[0].size());
  map.positions = prepared.total;
  map.share.assign(static_cast<size_t>(map.heads) * map.positions, 0.0);
  for (const auto& [id, span] : prepared.facts) map.facts.push_back(span);
  std::sort(map.facts.begin(), map.facts.end());
  std::vector<int> written_turn(map.positions);  // the turn that wrote each position
  for (size_t t = 0; t < prepared.turns.size(); ++t) {
    map.turn_starts.push_back(prepared.turns[t].first);
    for (int64_t i = 0; i < prepared.turns[t].tokens; ++i) {
      written_turn[prepared.turns[t].first + i] = static_cast<int>(t);
    }
  }
  const int turns = static_cast<int>(hot_after.size());
  for (int t = 0; t < turns; ++t) {
    for (int h = 0; h < map.heads; ++h) {
      for (int64_t p : hot_after[t][h]) map.share[h * map.positions + p] += 1.0;
    }
  }
  for (int h = 0; h < map.heads; ++h) {
    for (int64_t p = 0; p < map.positions; ++p) {
      map.share[h * map.positions + p] /= turns - written_turn[p];
    }
  }
  return map;
}

}  // namespace

const std::vector<std::string>& AllStrategies() {
  static const std::vector<std::string> kAll = {
      "full", "window", "h2o", "snapkv", "snapkv+recall", "snapkv-adaptive", "adakv"};
  return kAll;
}

absl::StatusOr<MemoryOptions> StrategyMemory(const std::string& strategy, int budget,
                                             const SimOptions& o, int* recall_blocks) {
  MemoryOptions m{.budget = budget,
                  .window = o.window,
                  .kernel = o.kernel,
                  .pooling = o.pooling,
                  .sink_tokens = o.sink_tokens,
                  .min_head_share = o.min_head_share,
                  .recent_share = o.recent_share};
  *recall_blocks = 0;
  if (strategy == "snapkv+recall") {
    m.policy = "snapkv";
    *recall_blocks = o.recall_blocks;
  } else if (strategy == "full" || strategy == "window" || strategy == "h2o" ||
             strategy == "snapkv" || strategy == "snapkv-adaptive" || strategy == "adakv") {
    m.policy = strategy;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown strategy \"", strategy,
                                                   "\": use full, window, h2o, snapkv, "
                                                   "snapkv+recall, snapkv-adaptive or adakv"));
  }
  return m;
}

absl::StatusOr<SimResults> RunSimulation(const Model& model, Backend& backend,
                                         const Scenario& scenario, const SimOptions& options) {
  if (model.tokenizer() == nullptr) {
    return absl::FailedPreconditionError("the simulator needs the model's tokenizer");
  }
  SimResults results;
  results.scenario = scenario.name;
  results.sessions = static_cast<int>(scenario.sessions.size());
  results.num_layers = model.config().num_layers;
  results.num_kv_heads = model.config().num_kv_heads;
  results.context = model.config().max_position_embeddings;
  results.options = options;
  // Strategies: full first, each once, in the order given.
  std::vector<std::string>& strategies = results.options.strategies;
  strategies = {"full"};
  for (const std::string& s : options.strategies) {
    if (std::find(strategies.begin(), strategies.end(), s) == strategies.end()) {
      strategies.push_back(s);
    }
  }
  std::vector<int>& budgets = results.options.budgets;
  if (budgets.empty()) return absl::InvalidArgumentError("give at least one hot budget");
  std::sort(budgets.begin(), budgets.end());
  budgets.erase(std::unique(budgets.begin(), budgets.end()), budgets.end());
  for (const std::string& strategy : strategies) {
    for (int budget : budgets) {
      int recall = 0;
      KVMEM_ASSIGN_OR_RETURN(MemoryOptions memory,
                             StrategyMemory(strategy, budget, options, &recall));
      absl::Status valid = ValidateMemoryOptions(memory);
      if (!valid.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("strategy ", strategy, " at budget ", budget, ": ", valid.message()));
      }
    }
  }
  if (options.retention_session < -1 ||
      options.retention_session >= static_cast<int>(scenario.sessions.size())) {
    return absl::InvalidArgumentError(absl::StrCat("retention session ", options.retention_session,
                                                   " is not a session index of the scenario"));
  }
  KVMEM_ASSIGN_OR_RETURN(std::vector<PreparedSession> prepared, Prepare(model, scenario));
  for (const PreparedSession& p : prepared) results.session_tokens.push_back(p.total);

  const ModelConfig& c = model.config();
  SessionOptions base;
  base.chat_template = scenario.chat_template;
  base.block_size = options.block_size;

  // 1. The uncompressed reference of every session, and full's own rows.
  std::vector<Reference> references(scenario.sessions.size());
  std::vector<TurnMetrics> full_rows;
  std::vector<std::vector<std::vector<int64_t>>> full_hot_after;
  for (size_t s = 0; s < scenario.sessions.size(); ++s) {
    SessionOptions so = base;
    so.memory = {.policy = "full"};
    so.recall_blocks = 0;
    so.host_hot_rows = true;  // the reference's attention is read from the hot rows below
    Reference& ref = references[s];
    const ScenarioSession& spec = scenario.sessions[s];
    KVMEM_RETURN_IF_ERROR(Replay(
        model, backend, so, spec, prepared[s], MemoryPolicy::kWholeTurn,
        [&](const TurnObservation& o) {
          const PreparedTurn& p = prepared[s].turns[o.turn];
          ref.logits.push_back(o.result->logits);
          std::vector<std::vector<double>>& attention = ref.attention.emplace_back();
          for (int l = 0; l < c.num_layers; ++l) {
            for (int g = 0; g < c.num_kv_heads; ++g) {
              attention.push_back(ContextAttention(
                  o.session->hot().head(l, g), p.first, o.result->queries[l].data(), c.num_heads,
                  static_cast<int>(p.tokens), g, c.num_kv_heads, p.first, c.sliding_window));
            }
          }
          full_rows.push_back(Measure(model, "full", 0, static_cast<int>(s), spec.turns[o.turn],
                                      prepared[s], ref, o));
          if (static_cast<int>(s) == options.retention_session) {
            full_hot_after.push_back(HotPositions(*o.session));
          }
          return absl::OkStatus();
        }));
  }
  for (int budget : budgets) {
    for (TurnMetrics row : full_rows) {
      row.budget = budget;
      results.turns.push_back(std::move(row));
    }
    if (options.retention_session >= 0) {
      results.retention.push_back(Retention("full", budget, options.retention_session,
                                            prepared[options.retention_session], full_hot_after));
    }
  }
  if (options.progress) {
    options.progress(absl::StrCat("full: ", scenario.sessions.size(), " sessions"));
  }

  // 2. Every other strategy and budget, against the reference.
  for (const std::string& strategy : strategies) {
    if (strategy == "full") continue;
    for (int budget : budgets) {
      const auto start = std::chrono::steady_clock::now();
      SessionOptions so = base;
      KVMEM_ASSIGN_OR_RETURN(so.memory,
                             StrategyMemory(strategy, budget, options, &so.recall_blocks));
      for (size_t s = 0; s < scenario.sessions.size(); ++s) {
        const ScenarioSession& spec = scenario.sessions[s];
        const bool record = static_cast<int>(s) == options.retention_session;
        std::vector<std::vector<std::vector<int64_t>>> hot_after;
        KVMEM_RETURN_IF_ERROR(
            Replay(model, backend, so, spec, prepared[s], 0, [&](const TurnObservation& o) {
              results.turns.push_back(Measure(model, strategy, budget, static_cast<int>(s),
                                              spec.turns[o.turn], prepared[s], references[s], o));
              if (record) hot_after.push_back(HotPositions(*o.session));
              return absl::OkStatus();
            }));
        if (record) {
          results.retention.push_back(
              Retention(strategy, budget, static_cast<int>(s), prepared[s], hot_after));
        }
      }
      if (options.progress) {
        options.progress(absl::StrCat(
            strategy, " at budget ", budget, ": ", scenario.sessions.size(), " sessions in ",
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), " s"));
      }
    }
  }
  return results;
}

}  // namespace kvmem::sim
