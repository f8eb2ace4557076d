#include "engine/session.h"

#include <algorithm>
#include <chrono>
#include <deque>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace kvmem {
namespace {

double MillisSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// The queries of the most recent `capacity` tokens of a turn, per layer, collected from
// several forward passes (prefix prefill, decode steps, suffix prefill).
class QueryWindow {
 public:
  QueryWindow(int layers, int heads, int head_dim, int capacity)
      : heads_(heads), head_dim_(head_dim), capacity_(capacity), rows_(layers) {}

  // `observed` from one forward pass: per layer (heads, count, head_dim).
  void Add(const std::vector<std::vector<float>>& observed) {
    if (capacity_ == 0 || observed.empty()) return;
    const int count = static_cast<int>(observed[0].size() / (heads_ * head_dim_));
    for (size_t l = 0; l < rows_.size(); ++l) {
      for (int i = 0; i < count; ++i) {
        std::vector<float> row(heads_ * head_dim_);  // (heads, head_dim) of one token
        for (int h = 0; h < heads_; ++h) {
          std::copy_n(&observed[l][(h * count + i) * head_dim_], head_dim_, &row[h * head_dim_]);
        }
        rows_[l].push_back(std::move(row));
        if (static_cast<int>(rows_[l].size()) > capacity_) rows_[l].pop_front();
      }
    }
  }

  int size() const { return rows_.empty() ? 0 : static_cast<int>(rows_[0].size()); }

  // Per layer (heads, size(), head_dim).
  std::vector<std::vector<float>> Gather() const {
    std::vector<std::vector<float>> out(rows_.size());
    const int n = size();
    for (size_t l = 0; l < rows_.size(); ++l) {
      out[l].resize(static_cast<size_t>(heads_) * n * head_dim_);
      for (int i = 0; i < n; ++i) {
        for (int h = 0; h < heads_; ++h) {
          std::copy_n(&rows_[l][i][h * head_dim_], head_dim_, &out[l][(h * n + i) * head_dim_]);
        }
      }
    }
    return out;
  }

 private:
  int heads_;
  int head_dim_;
  int capacity_;
  std::vector<std::deque<std::vector<float>>> rows_;  // (layer) -> tokens, oldest first
};

// The last `keep` of `observed` query rows: per layer (heads, observed, head_dim) ->
// (heads, keep, head_dim).
std::vector<std::vector<float>> TrailingQueries(const std::vector<std::vector<float>>& queries,
                                                int heads, int head_dim, int observed, int keep) {
  if (keep == observed) return queries;
  std::vector<std::vector<float>> out;
  for (const std::vector<float>& layer : queries) {
    std::vector<float>& tail = out.emplace_back(static_cast<size_t>(heads) * keep * head_dim);
    for (int h = 0; h < heads; ++h) {
      std::copy_n(&layer[(static_cast<int64_t>(h) * observed + observed - keep) * head_dim],
                  static_cast<int64_t>(keep) * head_dim,
                  &tail[static_cast<int64_t>(h) * keep * head_dim]);
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Session>> Session::Create(const Model& model, Backend& backend,
                                                         const SessionOptions& options) {
  if (model.tokenizer() == nullptr) {
    return absl::FailedPreconditionError("sessions need the model's tokenizer");
  }
  if (options.block_size <= 0 || options.block_size > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("block size must be in [1, 4096], got ", options.block_size));
  }
  if (options.max_turn_tokens <= 0) {
    return absl::InvalidArgumentError("max_turn_tokens must be positive");
  }
  KVMEM_ASSIGN_OR_RETURN(auto policy, MakeMemoryPolicy(options.memory));
  KVMEM_ASSIGN_OR_RETURN(auto chat_template, ChatTemplate::Make(options.chat_template,
                                                                *model.tokenizer(), model.config()));
  return std::unique_ptr<Session>(
      new Session(model, backend, options, std::move(chat_template), std::move(policy)));
}

Session::Session(const Model& model, Backend& backend, const SessionOptions& options,
                 std::unique_ptr<ChatTemplate> chat_template, std::unique_ptr<MemoryPolicy> policy)
    : model_(model),
      backend_(backend),
      options_(options),
      template_(std::move(chat_template)),
      policy_(std::move(policy)),
      hot_(model.config().num_layers, model.config().num_kv_heads, model.config().head_dim),
      blocks_(model.config().num_layers, model.config().num_kv_heads, model.config().head_dim,
              options.block_size) {}

absl::StatusOr<AppendResult> Session::AppendTurn(Role role, std::string_view text,
                                                 const AppendOptions& append_options) {
  if (text.empty()) {
    return absl::InvalidArgumentError("turn content is empty; send the text of the turn");
  }
  // 1. Tokenize through the chat template.
  KVMEM_ASSIGN_OR_RETURN(std::vector<int32_t> tokens,
                         template_->EncodeTurn(role, text, turns_.empty()));
  if (tokens.empty()) return absl::InvalidArgumentError("turn content encodes to no tokens");
  if (static_cast<int64_t>(tokens.size()) > options_.max_turn_tokens) {
    return absl::ResourceExhaustedError(
        absl::StrCat("turn has ", tokens.size(), " tokens, more than the limit of ",
                     options_.max_turn_tokens, "; split it into several turns"));
  }
  // 2. Prefill over the hot set plus the turn, causally.
  AppendResult result;
  auto start = std::chrono::steady_clock::now();
  ForwardResult forward;
  const int policy_window = policy_->observe_window();
  const int observe = std::max(policy_window, append_options.return_queries);
  KVMEM_RETURN_IF_ERROR(backend_.Forward(
      tokens, position_, &hot_,
      {.all_logits = append_options.return_logits, .observe_last = observe}, &forward));
  result.prefill_ms = MillisSince(start);
  const int64_t first = position_;
  position_ += static_cast<int64_t>(tokens.size());
  // 3. Every position is kept at full fidelity before anything leaves hot.
  CommitBlocks();
  // 4. The memory policy decides what stays hot.
  start = std::chrono::steady_clock::now();
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int observed = static_cast<int>(std::min<int64_t>(observe, n));
  const int policy_observed = static_cast<int>(std::min<int64_t>(policy_window, n));
  const ModelConfig& c = model_.config();
  const std::vector<std::vector<float>>& queries = forward.observed_queries;
  if (append_options.return_queries > 0) {
    result.queries = TrailingQueries(queries, c.num_heads, c.head_dim, observed,
                                     std::min(append_options.return_queries, observed));
  }
  result.evicted = ApplyPolicy(
      n, TrailingQueries(queries, c.num_heads, c.head_dim, observed, policy_observed),
      policy_observed);
  result.select_ms = MillisSince(start);

  if (append_options.return_logits) {
    const int vocab = model_.config().vocab_size;
    result.logits = forward.logits;
    last_logits_.assign(forward.logits.end() - vocab, forward.logits.end());
  } else {
    last_logits_ = std::move(forward.logits);
  }
  turns_.push_back({role, std::string(text), std::move(tokens), first});
  result.turn_index = static_cast<int64_t>(turns_.size()) - 1;
  result.turn_tokens = static_cast<int64_t>(turns_.back().tokens.size());
  result.total_tokens = position_;
  result.hot_tokens = hot_.TotalEntries();
  return result;
}

absl::StatusOr<GenerateResult> Session::Generate(const GenerateOptions& options,
                                                 const TextCallback& on_text) {
  KVMEM_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  const ModelConfig& c = model_.config();
  GenerateResult result;
  result.hot_attended = hot_.TotalEntries();
  auto start = std::chrono::steady_clock::now();

  // Everything needed to undo this call: hot lengths and the position counter.
  const int64_t position_before = position_;
  std::vector<int64_t> sizes_before;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) sizes_before.push_back(hot_.head(l, g).size());
  }
  auto roll_back = [&] {
    for (int l = 0; l < c.num_layers; ++l) {
      for (int g = 0; g < c.num_kv_heads; ++g) {
        HeadKv& h = hot_.head(l, g);
        const int64_t n = sizes_before[l * c.num_kv_heads + g];
        h.positions.resize(n);
        h.keys.resize(n * c.head_dim);
        h.values.resize(n * c.head_dim);
      }
    }
    position_ = position_before;
  };

  const int window = policy_->observe_window();
  QueryWindow queries(c.num_layers, c.num_heads, c.head_dim, window);
  KVMEM_ASSIGN_OR_RETURN(std::vector<int32_t> turn_tokens,
                         template_->AssistantPrefix(turns_.empty()));
  std::vector<float> logits = last_logits_;
  ForwardResult forward;
  if (!turn_tokens.empty()) {
    KVMEM_RETURN_IF_ERROR(
        backend_.Forward(turn_tokens, position_, &hot_, {.observe_last = window}, &forward));
    position_ += static_cast<int64_t>(turn_tokens.size());
    queries.Add(forward.observed_queries);
    logits = std::move(forward.logits);
  }
  if (logits.empty()) {
    roll_back();
    return absl::FailedPreconditionError(
        "the session has no turns to continue from; append a turn first");
  }

  DecodeRequest request;
  request.logits = std::move(logits);
  request.next_position = &position_;
  {
    // Detokenisation context: the last few committed (or prefix) tokens.
    std::vector<int> context;
    for (auto it = turns_.rbegin(); it != turns_.rend() && context.size() < 8; ++it) {
      context.insert(context.begin(), it->tokens.begin(), it->tokens.end());
    }
    context.insert(context.end(), turn_tokens.begin(), turn_tokens.end());
    if (context.size() > 8) context.erase(context.begin(), context.end() - 8);
    request.context = std::move(context);
  }
  request.feed_final_token = true;
  request.forward_options.observe_last = window > 0 ? 1 : 0;
  request.on_forward = [&](const ForwardResult& f) { queries.Add(f.observed_queries); };
  auto generated = DecodeTokens(model_, backend_, &hot_, std::move(request), options.sampling,
                                on_text);
  if (!generated.ok()) {
    roll_back();
    return generated.status();
  }
  result.generation = std::move(*generated);
  result.decode_ms = MillisSince(start);
  if (!options.keep || result.generation.finish == FinishReason::kCancelled) {
    roll_back();
    return result;
  }

  // Close the assistant turn and commit it like any other turn.
  turn_tokens.insert(turn_tokens.end(), result.generation.tokens.begin(),
                     result.generation.tokens.end());
  std::vector<float> final_logits = std::move(result.generation.last_logits);
  const std::vector<int32_t> suffix = template_->AssistantSuffix();
  if (!suffix.empty()) {
    absl::Status s = backend_.Forward(suffix, position_, &hot_, {.observe_last = window}, &forward);
    if (!s.ok()) {
      roll_back();
      return s;
    }
    position_ += static_cast<int64_t>(suffix.size());
    queries.Add(forward.observed_queries);
    final_logits = std::move(forward.logits);
    turn_tokens.insert(turn_tokens.end(), suffix.begin(), suffix.end());
  }
  result.generation.last_logits.clear();
  if (turn_tokens.empty()) return result;  // nothing was generated: no turn to keep

  CommitBlocks();
  start = std::chrono::steady_clock::now();
  result.evicted = ApplyPolicy(static_cast<int64_t>(turn_tokens.size()), queries.Gather(),
                               queries.size());
  result.select_ms = MillisSince(start);
  last_logits_ = std::move(final_logits);
  turns_.push_back({Role::kAssistant, result.generation.text, std::move(turn_tokens),
                    position_before});
  result.turn_index = static_cast<int64_t>(turns_.size()) - 1;
  return result;
}

absl::StatusOr<std::unique_ptr<Session>> Session::Fork() const {
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Session> fork, Create(model_, backend_, options_));
  fork->hot_ = hot_;
  fork->blocks_ = blocks_;
  fork->turns_ = turns_;
  fork->position_ = position_;
  fork->last_logits_ = last_logits_;
  return fork;
}

void Session::CommitBlocks() {
  const ModelConfig& c = model_.config();
  const int64_t count = position_ - blocks_.positions();
  if (count <= 0) return;
  const int64_t row = c.kv_dim();
  std::vector<float> k(count * row), v(count * row);  // (count, num_kv_heads, head_dim)
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) {
      const HeadKv& h = hot_.head(l, g);
      // The uncommitted positions are the last `count` entries of every head.
      const int64_t base = h.size() - count;
      KVMEM_CHECK(base >= 0 && h.positions[base] == blocks_.positions());
      for (int64_t i = 0; i < count; ++i) {
        std::copy_n(&h.keys[(base + i) * c.head_dim], c.head_dim, &k[i * row + g * c.head_dim]);
        std::copy_n(&h.values[(base + i) * c.head_dim], c.head_dim, &v[i * row + g * c.head_dim]);
      }
    }
    blocks_.Append(l, count, k.data(), v.data());
  }
  blocks_.Commit(count);
}

int64_t Session::ApplyPolicy(int64_t new_tokens, const std::vector<std::vector<float>>& queries,
                             int observed) {
  const ModelConfig& c = model_.config();
  TurnView view{.kv = &hot_,
                .new_tokens = new_tokens,
                .observed_queries = &queries,
                .observed = observed,
                .num_heads = c.num_heads,
                .sliding_window = c.sliding_window};
  std::vector<std::vector<int64_t>> keep = policy_->Select(view);
  int64_t evicted = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) {
      HeadKv& h = hot_.head(l, g);
      const std::vector<int64_t>& k = keep[l * c.num_kv_heads + g];
      if (static_cast<int64_t>(k.size()) == h.size()) continue;
      evicted += h.size() - static_cast<int64_t>(k.size());
      // Compact in place: kept indices are ascending, so each moves down or stays.
      for (size_t i = 0; i < k.size(); ++i) {
        const int64_t from = k[i];
        h.positions[i] = h.positions[from];
        std::copy_n(&h.keys[from * c.head_dim], c.head_dim, &h.keys[i * c.head_dim]);
        std::copy_n(&h.values[from * c.head_dim], c.head_dim, &h.values[i * c.head_dim]);
      }
      h.positions.resize(k.size());
      h.keys.resize(k.size() * c.head_dim);
      h.values.resize(k.size() * c.head_dim);
    }
  }
  return evicted;
}

SessionStats Session::Stats() const {
  const ModelConfig& c = model_.config();
  SessionStats s;
  s.total_tokens = position_;
  s.turns = static_cast<int64_t>(turns_.size());
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) s.hot_tokens_per_head.push_back(hot_.head(l, g).size());
  }
  s.hot_tokens = hot_.TotalEntries();
  s.hot_bytes = hot_.Bytes();
  s.blocks = blocks_.num_blocks();
  s.block_bytes = blocks_.bytes();
  return s;
}

}  // namespace kvmem
