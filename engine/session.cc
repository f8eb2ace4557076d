#include "engine/session.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

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

absl::Status BrokenError() {
  return absl::FailedPreconditionError(
      "this session's last change could not be made durable; reload the session");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Session>> Session::Create(const Model& model, Backend& backend,
                                                         const SessionOptions& options,
                                                         SessionStorage storage) {
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
  if (options.recall_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "recall_blocks must be >= 0 (0 disables recall), got ", options.recall_blocks));
  }
  KVMEM_ASSIGN_OR_RETURN(auto policy, MakeMemoryPolicy(options.memory));
  KVMEM_ASSIGN_OR_RETURN(
      auto chat_template,
      ChatTemplate::Make(options.chat_template, *model.tokenizer(), model.config()));
  if (storage.source == nullptr || storage.sink == nullptr) {
    auto store = std::make_shared<MemoryBlockStore>();
    storage.source = store;
    storage.sink = store;
  }
  return std::unique_ptr<Session>(new Session(model, backend, options, std::move(chat_template),
                                              std::move(policy), std::move(storage)));
}

Session::Session(const Model& model, Backend& backend, const SessionOptions& options,
                 std::unique_ptr<ChatTemplate> chat_template, std::unique_ptr<MemoryPolicy> policy,
                 SessionStorage storage)
    : model_(model),
      backend_(backend),
      options_(options),
      template_(std::move(chat_template)),
      policy_(std::move(policy)),
      storage_(std::move(storage)),
      hot_(model.config().num_layers, model.config().num_kv_heads, model.config().head_dim,
           backend.KeepsHotRows() && !options.host_hot_rows ? KvCache::RowHome::kBackend
                                                            : KvCache::RowHome::kHost),
      owners_{{0, storage_.uid}},
      tails_(model.config().num_layers),
      digests_(model.config().num_layers) {
  hot_.set_row_source(this);
  // A device backend's pinned pool serves this session's blocks (each K or V is one piece).
  const ModelConfig& c = model.config();
  RegisterBlockBytes(static_cast<size_t>(options_.block_size) * c.num_kv_heads * c.head_dim *
                     BlockValueBytes(backend.KvDType()));
}

absl::StatusOr<std::unique_ptr<Session>> Session::Restore(const Model& model, Backend& backend,
                                                          const SessionOptions& options,
                                                          SessionStorage storage,
                                                          SessionSnapshot snapshot) {
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Session> s,
                         Create(model, backend, options, std::move(storage)));
  const ModelConfig& c = model.config();
  const int B = options.block_size;
  if (static_cast<int>(snapshot.hot_positions.size()) != c.num_layers * c.num_kv_heads ||
      snapshot.owners.empty()) {
    return absl::DataLossError("stored session state does not match the model's shape");
  }
  s->policy_->LoadState(snapshot.hot_positions, snapshot.policy_scores);
  s->turns_ = std::move(snapshot.turns);
  s->position_ = s->committed_ = snapshot.position;
  s->last_logits_ = std::move(snapshot.last_logits);
  s->owners_ = std::move(snapshot.owners);
  const int64_t blocks = (s->position_ + B - 1) / B;
  // Digests of every block, for recall: a batched read per layer, the layers in parallel.
  std::vector<absl::Status> digest_errors(c.num_layers);
  SharedThreadPool().ParallelFor(c.num_layers, [&](int64_t begin, int64_t end) {
    std::vector<BlockKey> keys(blocks);
    for (int64_t l = begin; l < end; ++l) {
      for (int64_t b = 0; b < blocks; ++b) keys[b] = s->KeyOf(static_cast<int>(l), b);
      absl::StatusOr<std::vector<std::vector<float>>> digests =
          s->storage_.source->ReadDigests(keys);
      if (digests.ok()) {
        s->digests_[l] = std::move(*digests);
      } else {
        digest_errors[l] = digests.status();
      }
    }
  });
  for (const absl::Status& e : digest_errors) KVMEM_RETURN_IF_ERROR(e);
  for (int l = 0; l < c.num_layers; ++l) {
    // The partial last block, truncated to this session's positions (a fork may still read
    // its parent's tail block, which the parent keeps filling).
    if (s->position_ % B != 0) {
      KVMEM_ASSIGN_OR_RETURN(auto tail,
                             s->storage_.source->ReadBlock(s->KeyOf(l, blocks - 1), nullptr));
      if (tail->index != blocks - 1 || tail->filled < s->position_ % B) {
        return absl::DataLossError(absl::StrCat("stored block ", blocks - 1, " of layer ", l,
                                                " holds fewer positions than committed"));
      }
      // The tail goes on filling with this backend's rows: it must hold them exactly, so a
      // block of another type than the backend's becomes f32 (which holds every type).
      auto copy =
          std::make_shared<KvBlock>(tail->dtype == backend.KvDType() ? *tail : WidenedBlock(*tail));
      copy->filled = static_cast<int>(s->position_ % B);
      copy->ZeroFrom(static_cast<size_t>(copy->filled) * c.kv_dim());
      s->tails_[l] = std::move(copy);
    }
    // The hot set, read back from the blocks bit for bit. A backend that keeps the rows reads
    // them through ReadRows on its first pass, so here the host takes positions only.
    std::shared_ptr<const KvBlock> block;
    std::vector<float> row_k(c.head_dim), row_v(c.head_dim);
    for (int g = 0; g < c.num_kv_heads; ++g) {
      HeadKv& head = s->hot_.head(l, g);
      for (int64_t p : snapshot.hot_positions[l * c.num_kv_heads + g]) {
        if (p < 0 || p >= s->position_ || (!head.positions.empty() && p <= head.positions.back())) {
          return absl::DataLossError("stored hot index is corrupt");
        }
        if (!s->hot_.host_rows()) {
          head.positions.push_back(p);  // rows: read below
          continue;
        }
        if (block == nullptr || block->index != p / B) {
          KVMEM_ASSIGN_OR_RETURN(block, s->storage_.source->ReadBlock(s->KeyOf(l, p / B), nullptr));
        }
        if (p % B >= block->filled) {
          return absl::DataLossError(absl::StrCat("stored block ", p / B, " lacks position ", p));
        }
        const size_t off = (static_cast<size_t>(p % B) * c.num_kv_heads + g) * c.head_dim;
        block->ReadKeys(off, c.head_dim, row_k.data());
        block->ReadValues(off, c.head_dim, row_v.data());
        head.Append(p, row_k.data(), row_v.data(), c.head_dim);
      }
    }
  }
  // Rows the backend keeps: their blocks are read (and checked) now, for its first upload.
  KVMEM_RETURN_IF_ERROR(s->PrefetchHotBlocks());
  return s;
}

BlockKey Session::KeyOf(int layer, int64_t index) const {
  uint64_t owner = owners_.front().second;
  for (const auto& [first, uid] : owners_) {
    if (first > index) break;
    owner = uid;
  }
  return {owner, layer, index};
}

absl::StatusOr<AppendResult> Session::AppendTurn(Role role, std::string_view text,
                                                 const AppendOptions& append_options) {
  if (broken_) return BrokenError();
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
  const int64_t n = static_cast<int64_t>(tokens.size());
  const ModelConfig& c = model_.config();
  KVMEM_RETURN_IF_ERROR(PrefetchHotBlocks());

  // 2. Prefill over the hot set, recalled blocks and the turn, causally.
  AppendResult result;
  auto start = std::chrono::steady_clock::now();
  ForwardResult forward;
  const int policy_window = policy_->observe_window();
  const int observe = std::max(policy_window, append_options.return_queries);
  ForwardOptions forward_options{.all_logits = append_options.return_logits,
                                 .observe_last = observe};
  if (options_.recall_blocks > 0 && committed_ > 0) {
    forward_options.before_attention = [&](int layer, const float* q, int64_t count, KvCache*) {
      return Recall(layer, q, count, &result);
    };
    forward_options.hook_query_rows = std::max(1, options_.memory.window);  // what Recall reads
  }
  absl::Status forward_status =
      backend_.Forward(tokens, position_, &hot_, forward_options, &forward);
  blocks_in_flight_.clear();  // recall's blocks: the backend has its rows now
  if (!forward_status.ok()) {
    // Recall may have changed the hot set before failing: the session must be restored.
    if (result.recalled_blocks > 0 || hot_.MaxPosition() >= position_) broken_ = true;
    return forward_status;
  }
  result.prefill_ms = MillisSince(start);
  const int64_t first = position_;
  position_ += n;

  // 3. Every position goes into blocks before anything leaves hot.
  std::vector<BlockWrite> blocks = FillBlocks();

  // 4. The memory policy decides what stays hot.
  start = std::chrono::steady_clock::now();
  const int observed = static_cast<int>(std::min<int64_t>(observe, n));
  const int policy_observed = static_cast<int>(std::min<int64_t>(policy_window, n));
  const std::vector<std::vector<float>>& queries = forward.observed_queries;
  if (append_options.return_queries > 0) {
    result.queries = TrailingQueries(queries, c.num_heads, c.head_dim, observed,
                                     std::min(append_options.return_queries, observed));
  }
  // The policy reads the observed queries in place (and the backend its own copy of them)
  // unless its window is shorter.
  const bool in_place = policy_observed == observed;
  const std::vector<std::vector<float>> trailing =
      in_place ? std::vector<std::vector<float>>()
               : TrailingQueries(queries, c.num_heads, c.head_dim, observed, policy_observed);
  absl::StatusOr<int64_t> evicted =
      ApplyPolicy(n, in_place ? queries : trailing, policy_observed,
                  in_place ? forward.observed_queries_on_backend : 0);
  if (!evicted.ok()) {
    broken_ = true;  // the turn is in the hot set and its blocks but not durable
    return evicted.status();
  }
  result.evicted = *evicted;
  result.select_ms = MillisSince(start);

  if (append_options.return_logits) {
    result.logits = forward.logits;
    last_logits_.assign(forward.logits.end() - c.vocab_size, forward.logits.end());
  } else {
    last_logits_ = std::move(forward.logits);
  }

  // 5. Commit: the turn, its blocks, the hot index, in one durable write.
  turns_.push_back({role, std::string(text), std::move(tokens), first});
  start = std::chrono::steady_clock::now();
  KVMEM_RETURN_IF_ERROR(Commit(turns_.back(), std::move(blocks)));
  result.commit_ms = MillisSince(start);
  recalled_blocks_ += result.recalled_blocks;
  result.turn_index = static_cast<int64_t>(turns_.size()) - 1;
  result.turn_tokens = n;
  result.total_tokens = position_;
  result.hot_tokens = hot_.TotalEntries();
  return result;
}

absl::Status Session::Recall(int layer, const float* q, int64_t n, AppendResult* stats) {
  const ModelConfig& c = model_.config();
  const int B = options_.block_size, hd = c.head_dim, group = c.group_size();
  const int64_t blocks = static_cast<int64_t>(digests_[layer].size());
  const int w = static_cast<int>(std::min<int64_t>(options_.memory.window, n));
  const int kvh = c.num_kv_heads;
  // 1. Candidates: (KV head, block) pairs holding a committed position the head lacks.
  // One pass over each head's positions counts its hot entries per block.
  std::vector<char> open(static_cast<size_t>(kvh) * blocks, 0);
  std::vector<int32_t> hot_in_block(blocks);
  bool any_open = false;
  for (int g = 0; g < kvh; ++g) {
    std::fill(hot_in_block.begin(), hot_in_block.end(), 0);
    // Positions are sorted: a division only where a new block starts.
    int64_t block = 0, block_end = 0;
    for (int64_t p : std::as_const(hot_).head(layer, g).positions) {
      if (p >= committed_) break;
      if (p >= block_end) {
        block = p / B;
        block_end = (block + 1) * B;
        if (block >= blocks) break;
      }
      ++hot_in_block[block];
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t committed_in_block = std::min<int64_t>((b + 1) * B, committed_) - b * B;
      open[static_cast<size_t>(g) * blocks + b] = hot_in_block[b] < committed_in_block;
      any_open |= hot_in_block[b] < committed_in_block;
    }
  }
  if (!any_open) return absl::OkStatus();
  // 2. Their scores (-inf for the rest). The backend's copy of the digests (the GPU's) scores
  // every block at once, bit-identical to the host loop; without one the host scores, on the
  // shared thread pool when the work is large (blocks x window rows x group heads x head_dim
  // per head: the largest host cost of a turn at large models).
  std::vector<float> scores(static_cast<size_t>(kvh) * blocks,
                            -std::numeric_limits<float>::infinity());
  absl::StatusOr<std::vector<float>> on_backend =
      backend_.ScoreRecallBlocks(hot_, layer, q, n, w, digests_[layer]);
  if (on_backend.ok()) {
    for (size_t item = 0; item < scores.size(); ++item) {
      if (open[item]) scores[item] = (*on_backend)[item];
    }
  } else if (on_backend.status().code() != absl::StatusCode::kUnimplemented) {
    return on_backend.status();
  } else {
    auto score = [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        if (!open[item]) continue;
        const int g = static_cast<int>(item / blocks);
        const float* digest = &digests_[layer][item % blocks][static_cast<size_t>(g) * 2 * hd];
        float best = -std::numeric_limits<float>::infinity();
        for (int h = g * group; h < (g + 1) * group; ++h) {
          for (int64_t i = n - w; i < n; ++i) {
            best = std::max(best, DigestScore(q + (i * c.num_heads + h) * hd, digest, hd));
          }
        }
        scores[item] = best;
      }
    };
    // Below about a million multiply-adds the threads cost more than they save.
    if (static_cast<int64_t>(c.num_heads) * blocks * w * hd < (int64_t{1} << 20)) {
      score(0, kvh * blocks);
    } else {
      SharedThreadPool().ParallelFor(kvh * blocks, score);
    }
  }
  // 3. Per head, the top blocks. Every block a head chose is read once, on the thread pool
  // (with the warm tier full, most come from cold: 64 reads a layer at 8B shape).
  std::vector<std::vector<std::pair<float, int64_t>>> top(kvh);  // (-score, block index)
  std::vector<int64_t> to_read;
  for (int g = 0; g < kvh; ++g) {
    std::vector<std::pair<float, int64_t>>& scored = top[g];
    for (int64_t b = 0; b < blocks; ++b) {
      const size_t item = static_cast<size_t>(g) * blocks + b;
      if (open[item]) scored.push_back({-scores[item], b});
    }
    const size_t take = std::min<size_t>(options_.recall_blocks, scored.size());
    std::partial_sort(scored.begin(), scored.begin() + take, scored.end());
    scored.resize(take);
    for (const auto& [score, b] : scored) to_read.push_back(b);
  }
  std::sort(to_read.begin(), to_read.end());
  to_read.erase(std::unique(to_read.begin(), to_read.end()), to_read.end());
  std::vector<absl::StatusOr<std::shared_ptr<const KvBlock>>> read(to_read.size());
  std::vector<char> read_cold(to_read.size(), 0);
  SharedThreadPool().ParallelFor(
      static_cast<int64_t>(to_read.size()), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          bool cold = false;
          read[i] = storage_.source->ReadBlock(KeyOf(layer, to_read[i]), &cold);
          read_cold[i] = cold;
        }
      });
  std::map<int64_t, std::shared_ptr<const KvBlock>> loaded;  // this layer's reads, by index
  for (size_t i = 0; i < to_read.size(); ++i) {
    KVMEM_RETURN_IF_ERROR(read[i].status());
    (read_cold[i] ? stats->cold_reads : stats->warm_hits)++;
    loaded.emplace(to_read[i], std::move(*read[i]));
  }
  // 4. Per head, merge the chosen blocks' missing positions in.
  for (int g = 0; g < kvh; ++g) {
    const std::vector<std::pair<float, int64_t>>& scored = top[g];
    const size_t take = scored.size();
    // Merge the chosen blocks' missing positions into the head, keeping it sorted. The head is
    // only touched mutably when it changes (a device backend re-syncs changed heads).
    const HeadKv& head = std::as_const(hot_).head(layer, g);
    HeadKv merged;
    struct Extra {
      int64_t position;
      const KvBlock* block;  // held by `loaded`
      size_t off;            // of the head's row in the block
    };
    std::vector<Extra> extra;
    for (size_t t = 0; t < take; ++t) {
      const int64_t b = scored[t].second;
      const auto it = loaded.find(b);  // every chosen block was read above
      const KvBlock& block = *it->second;
      if (block.index != b || block.filled < std::min<int64_t>(B, committed_ - b * B)) {
        return absl::DataLossError(absl::StrCat("stored block ", b, " of layer ", layer,
                                                " holds fewer positions than committed"));
      }
      for (int64_t p = b * B; p < std::min<int64_t>((b + 1) * B, committed_); ++p) {
        if (std::binary_search(head.positions.begin(), head.positions.end(), p)) continue;
        extra.push_back({p, &block, (static_cast<size_t>(p % B) * c.num_kv_heads + g) * hd});
      }
      // A backend that keeps the rows uploads them through ReadRows during this pass.
      if (!hot_.host_rows()) blocks_in_flight_.emplace(std::make_pair(layer, b), it->second);
      ++stats->recalled_blocks;
    }
    if (extra.empty()) continue;
    if (!hot_.host_rows()) {
      std::vector<int64_t> added;
      for (const Extra& x : extra) added.push_back(x.position);
      std::sort(added.begin(), added.end());
      std::vector<int64_t> positions(head.positions.size() + added.size());
      std::merge(head.positions.begin(), head.positions.end(), added.begin(), added.end(),
                 positions.begin());
      hot_.head(layer, g).positions = std::move(positions);
      continue;
    }
    std::sort(extra.begin(), extra.end(),
              [](const Extra& a, const Extra& b) { return a.position < b.position; });
    std::vector<float> row_k(hd), row_v(hd);
    size_t e = 0;
    for (int64_t i = 0; i <= head.size(); ++i) {
      const int64_t next_hot = i < head.size() ? head.positions[i] : INT64_MAX;
      for (; e < extra.size() && extra[e].position < next_hot; ++e) {
        extra[e].block->ReadKeys(extra[e].off, hd, row_k.data());
        extra[e].block->ReadValues(extra[e].off, hd, row_v.data());
        merged.Append(extra[e].position, row_k.data(), row_v.data(), hd);
      }
      if (i < head.size()) {
        merged.Append(head.positions[i], &head.keys[i * hd], &head.values[i * hd], hd);
      }
    }
    hot_.head(layer, g) = std::move(merged);
  }
  return absl::OkStatus();
}

absl::StatusOr<GenerateResult> Session::Generate(const GenerateOptions& options,
                                                 const TextCallback& on_text) {
  if (broken_) return BrokenError();
  KVMEM_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  const ModelConfig& c = model_.config();
  KVMEM_RETURN_IF_ERROR(PrefetchHotBlocks());
  GenerateResult result;
  result.hot_attended = hot_.TotalEntries();
  result.start_position = position_;
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
        if (hot_.host_rows()) {
          h.keys.resize(n * c.head_dim);
          h.values.resize(n * c.head_dim);
        }
      }
    }
    if (!hot_.host_rows()) hot_.DropFreshFrom(position_before);
    position_ = position_before;
    blocks_in_flight_.clear();
  };

  const int window = policy_->observe_window();
  QueryWindow queries(c.num_layers, c.num_heads, c.head_dim, window);
  KVMEM_ASSIGN_OR_RETURN(std::vector<int32_t> turn_tokens,
                         template_->AssistantPrefix(turns_.empty()));
  std::vector<float> logits = last_logits_;
  ForwardResult forward;
  if (!turn_tokens.empty()) {
    absl::Status s =
        backend_.Forward(turn_tokens, position_, &hot_, {.observe_last = window}, &forward);
    if (!s.ok()) {
      roll_back();
      return s;
    }
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
  request.cancelled = options.cancelled;
  auto generated =
      DecodeTokens(model_, backend_, &hot_, std::move(request), options.sampling, on_text);
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

  // Close the assistant turn and commit it like any other turn. Only tokens that were fed are
  // kept: a token that completed a stop string was sampled but never entered the cache.
  result.generation.tokens.resize(result.generation.decode_steps);
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
  blocks_in_flight_.clear();               // the passes are done: the backend holds what it read
  if (turn_tokens.empty()) return result;  // nothing was generated: no turn to keep

  std::vector<BlockWrite> blocks = FillBlocks();
  start = std::chrono::steady_clock::now();
  absl::StatusOr<int64_t> evicted =
      ApplyPolicy(static_cast<int64_t>(turn_tokens.size()), queries.Gather(), queries.size());
  if (!evicted.ok()) {
    broken_ = true;  // the turn is in the hot set and its blocks but not durable
    return evicted.status();
  }
  result.evicted = *evicted;
  result.select_ms = MillisSince(start);
  last_logits_ = std::move(final_logits);
  turns_.push_back(
      {Role::kAssistant, result.generation.text, std::move(turn_tokens), position_before});
  KVMEM_RETURN_IF_ERROR(Commit(turns_.back(), std::move(blocks)));
  result.turn_index = static_cast<int64_t>(turns_.size()) - 1;
  return result;
}

absl::Status Session::Commit(const TurnRecord& turn, std::vector<BlockWrite> blocks) {
  const ModelConfig& c = model_.config();
  TurnCommit commit;
  commit.turn_index = static_cast<int64_t>(turns_.size()) - 1;
  commit.role = static_cast<int>(turn.role);
  commit.text = &turn.text;
  commit.tokens = &turn.tokens;
  commit.first_position = turn.first_position;
  commit.position = position_;
  commit.blocks = std::move(blocks);
  commit.owners = &owners_;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) {
      commit.hot_positions.push_back(&std::as_const(hot_).head(l, g).positions);
    }
  }
  commit.policy_scores = policy_->SaveState();
  commit.last_logits = &last_logits_;
  absl::Status status = storage_.sink->Commit(commit);
  if (!status.ok()) {
    broken_ = true;
    return status;
  }
  blocks_in_flight_.clear();  // storage serves them from here on
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Session>> Session::Fork(SessionStorage storage) const {
  if (broken_) return BrokenError();
  if (storage.source == nullptr || storage.sink == nullptr) {
    static std::atomic<uint64_t> next_uid{1ull << 40};
    storage.uid = next_uid.fetch_add(1);
    storage.source = storage_.source;
    storage.sink = storage_.sink;
  }
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Session> fork,
                         Create(model_, backend_, options_, std::move(storage)));
  fork->policy_ = policy_->Clone();  // stateful policies (h2o) carry their scores over
  fork->hot_ = hot_;  // without the device copy: the fork's first pass uploads its own
  fork->hot_.set_row_source(fork.get());
  fork->turns_ = turns_;
  fork->position_ = position_;
  fork->committed_ = committed_;
  fork->last_logits_ = last_logits_;
  fork->owners_ = owners_;  // shared blocks; the fork's own start at its next write
  fork->digests_ = digests_;
  for (size_t l = 0; l < tails_.size(); ++l) {
    if (tails_[l] != nullptr) fork->tails_[l] = std::make_shared<KvBlock>(*tails_[l]);
  }
  return fork;
}

SessionSnapshot Session::Snapshot() const {
  const ModelConfig& c = model_.config();
  SessionSnapshot s;
  s.turns = turns_;
  s.position = position_;
  s.last_logits = last_logits_;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) s.hot_positions.push_back(hot_.head(l, g).positions);
  }
  s.policy_scores = policy_->SaveState();
  s.owners = owners_;
  return s;
}

std::vector<BlockWrite> Session::FillBlocks() {
  const ModelConfig& c = model_.config();
  const int B = options_.block_size;
  const int64_t count = position_ - committed_;
  std::vector<BlockWrite> writes;
  if (count <= 0) return writes;
  // The first block this write touches may belong to a parent session (after a fork): from
  // here on this session owns it.
  const int64_t first_block = committed_ / B;
  if (KeyOf(0, first_block).owner != storage_.uid) owners_.push_back({first_block, storage_.uid});
  const int64_t row = c.kv_dim();
  for (int l = 0; l < c.num_layers; ++l) {
    std::vector<std::shared_ptr<KvBlock>> touched;
    for (int64_t p = committed_; p < position_; ++p) {
      std::shared_ptr<KvBlock>& tail = tails_[l];
      if (tail == nullptr) {
        tail = std::make_shared<KvBlock>(
            MakeEmptyBlock(p / B, B, c.num_kv_heads, c.head_dim, backend_.KvDType()));
      }
      if (touched.empty() || touched.back() != tail) touched.push_back(tail);
      const int64_t slot = p % B;
      KVMEM_CHECK(tail->index == p / B && tail->filled == slot);
      if (!hot_.host_rows()) {
        // The backend handed the new positions' rows over as fresh rows, in block layout.
        const KvCache::FreshRows& f = hot_.fresh(l);
        KVMEM_CHECK(p >= f.first && p < f.first + hot_.fresh_size(l));
        tail->CopyFrom(slot * row, f.rows, static_cast<size_t>(p - f.first) * row, row);
      }
      for (int g = 0; g < c.num_kv_heads && hot_.host_rows(); ++g) {
        // The uncommitted positions are the last `count` entries of every head.
        const HeadKv& h = std::as_const(hot_).head(l, g);
        const int64_t i = h.size() - count + (p - committed_);
        KVMEM_CHECK(h.positions[i] == p);
        tail->WriteKeys(slot * row + g * c.head_dim, &h.keys[i * c.head_dim], c.head_dim);
        tail->WriteValues(slot * row + g * c.head_dim, &h.values[i * c.head_dim], c.head_dim);
      }
      ++tail->filled;
      if (tail->filled == B) tail = nullptr;  // full blocks are immutable from here on
    }
    for (const std::shared_ptr<KvBlock>& block : touched) {
      // A partial block is stored as a snapshot (the live tail keeps filling in later turns); a
      // full one is immutable from here on and is stored as it is.
      std::shared_ptr<const KvBlock> stored =
          block->filled == B ? block : std::make_shared<const KvBlock>(*block);
      std::vector<float> digest = ComputeDigest(*stored, c.num_kv_heads, c.head_dim);
      auto& layer_digests = digests_[l];
      if (static_cast<int64_t>(layer_digests.size()) <= stored->index) {
        layer_digests.resize(stored->index + 1);
      }
      layer_digests[stored->index] = digest;
      blocks_in_flight_[{l, stored->index}] = stored;
      writes.push_back({{storage_.uid, l, stored->index}, std::move(stored), std::move(digest)});
    }
  }
  committed_ = position_;
  if (!hot_.host_rows()) hot_.DropFreshBefore(committed_);
  return writes;
}

absl::StatusOr<std::shared_ptr<const KvBlock>> Session::FindBlock(int layer, int64_t index) {
  if (tails_[layer] != nullptr && tails_[layer]->index == index) return tails_[layer];
  {
    std::lock_guard<std::mutex> lock(blocks_mu_);
    auto it = blocks_in_flight_.find({layer, index});
    if (it != blocks_in_flight_.end()) return it->second;
  }
  // Read without the lock, so that threads reading rows for the backend read blocks in
  // parallel; a block two of them read is kept once.
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<const KvBlock> block,
                         storage_.source->ReadBlock(KeyOf(layer, index), nullptr));
  std::lock_guard<std::mutex> lock(blocks_mu_);
  return blocks_in_flight_.emplace(std::make_pair(layer, index), std::move(block)).first->second;
}

absl::Status Session::PrefetchHotBlocks() {
  if (hot_.host_rows() || hot_.attachment() != nullptr) return absl::OkStatus();
  const ModelConfig& c = model_.config();
  const int B = options_.block_size;
  const int64_t blocks = (committed_ + B - 1) / B;
  // Each block the hot positions lie in, with the last slot of it they need.
  struct Wanted {
    int layer;
    int64_t index;
    int last_slot;
  };
  std::vector<Wanted> wanted;
  std::vector<int> last_slot(blocks);
  for (int l = 0; l < c.num_layers; ++l) {
    std::fill(last_slot.begin(), last_slot.end(), -1);
    for (int g = 0; g < c.num_kv_heads; ++g) {
      for (int64_t p : std::as_const(hot_).head(l, g).positions) {
        if (p >= committed_) break;  // fresh rows: the host holds them
        last_slot[p / B] = std::max(last_slot[p / B], static_cast<int>(p % B));
      }
    }
    for (int64_t b = 0; b < blocks; ++b) {
      if (last_slot[b] >= 0) wanted.push_back({l, b, last_slot[b]});
    }
  }
  // Read on the thread pool: a restore or page-in reads thousands of blocks (FindBlock keeps
  // each one in flight once, and is safe to call from several threads). One batch per layer,
  // so that other sessions' work on the shared pool (commits, recall, a device's uploads) gets
  // in between. The error is the first in (layer, block) order, as a serial read's would be.
  std::mutex error_mu;
  size_t error_at = wanted.size();
  absl::Status error;
  std::atomic<bool> failed{false};
  for (size_t first = 0; first < wanted.size() && !failed.load();) {
    size_t last = first;
    while (last < wanted.size() && wanted[last].layer == wanted[first].layer) ++last;
    SharedThreadPool().ParallelFor(
        static_cast<int64_t>(last - first), [&](int64_t begin, int64_t end) {
          for (size_t i = first + begin; i < first + end && !failed.load(); ++i) {
            const Wanted& w = wanted[i];
            absl::StatusOr<std::shared_ptr<const KvBlock>> block = FindBlock(w.layer, w.index);
            absl::Status s = block.status();
            if (s.ok() && ((*block)->index != w.index || w.last_slot >= (*block)->filled)) {
              s = absl::DataLossError(absl::StrCat("stored block ", w.index, " of layer ", w.layer,
                                                   " lacks position ", w.index * B + w.last_slot));
            }
            if (s.ok()) continue;
            std::lock_guard<std::mutex> lock(error_mu);
            if (i < error_at) {
              error_at = i;
              error = std::move(s);
            }
            failed.store(true);
            return;
          }
        });
    first = last;
  }
  return error;
}

template <typename RowAt, typename E>
absl::Status Session::ReadRowsAt(int layer, size_t n, const RowAt& row_at, E* keys, E* values) {
  const ModelConfig& c = model_.config();
  const int B = options_.block_size, hd = c.head_dim;
  std::shared_ptr<const KvBlock> block;
  for (size_t i = 0; i < n; ++i) {
    const KvRowRef r = row_at(i);
    const int64_t p = r.position;
    if (p < 0 || p >= committed_) {
      return absl::InternalError(absl::StrCat("row of position ", p, " was asked for but only ",
                                              committed_, " positions are in blocks"));
    }
    if (block == nullptr || block->index != p / B) {
      KVMEM_ASSIGN_OR_RETURN(block, FindBlock(layer, p / B));
    }
    if (block->index != p / B || p % B >= block->filled) {
      return absl::DataLossError(
          absl::StrCat("stored block ", p / B, " of layer ", layer, " lacks position ", p));
    }
    block->ReadKv((static_cast<size_t>(p % B) * c.num_kv_heads + r.head) * hd, hd, keys + i * hd,
                  values + i * hd);
  }
  return absl::OkStatus();
}

absl::Status Session::LocateLayerRows(int layer, absl::Span<const KvRowRef> rows, BlockDType dtype,
                                      const void** keys, const void** values,
                                      std::vector<std::shared_ptr<const KvBlock>>* holds) {
  const ModelConfig& c = model_.config();
  const int B = options_.block_size, hd = c.head_dim;
  std::shared_ptr<const KvBlock> block;
  bool usable = false;  // the block is of `dtype` and in the pinned pool
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t p = rows[i].position;
    if (p < 0 || p >= committed_) {
      return absl::InternalError(absl::StrCat("row of position ", p, " was asked for but only ",
                                              committed_, " positions are in blocks"));
    }
    if (block == nullptr || block->index != p / B) {
      KVMEM_ASSIGN_OR_RETURN(block, FindBlock(layer, p / B));
      usable = block->dtype == dtype && BlockIsPinned(*block);
      if (usable) holds->push_back(block);
    }
    if (block->index != p / B || p % B >= block->filled) {
      return absl::DataLossError(
          absl::StrCat("stored block ", p / B, " of layer ", layer, " lacks position ", p));
    }
    if (!usable) {
      keys[i] = values[i] = nullptr;
      continue;
    }
    const size_t off = (static_cast<size_t>(p % B) * c.num_kv_heads + rows[i].head) * hd;
    keys[i] = block->KeysAt(off);
    values[i] = block->ValuesAt(off);
  }
  return absl::OkStatus();
}

absl::Status Session::ReadRows(int layer, int kv_head, absl::Span<const int64_t> positions,
                               float* keys, float* values) {
  return ReadRowsAt(
      layer, positions.size(),
      [&](size_t i) {
        return KvRowRef{positions[i], kv_head};
      },
      keys, values);
}

absl::Status Session::ReadRowsBf16(int layer, int kv_head, absl::Span<const int64_t> positions,
                                   uint16_t* keys, uint16_t* values) {
  // A bf16 device's rows in bf16 blocks are copied as they are.
  return ReadRowsAt(
      layer, positions.size(),
      [&](size_t i) {
        return KvRowRef{positions[i], kv_head};
      },
      keys, values);
}

absl::Status Session::ReadLayerRows(int layer, absl::Span<const KvRowRef> rows, float* keys,
                                    float* values) {
  return ReadRowsAt(
      layer, rows.size(), [&](size_t i) { return rows[i]; }, keys, values);
}

absl::Status Session::ReadLayerRowsBf16(int layer, absl::Span<const KvRowRef> rows, uint16_t* keys,
                                        uint16_t* values) {
  return ReadRowsAt(
      layer, rows.size(), [&](size_t i) { return rows[i]; }, keys, values);
}

absl::Status Session::ReadPosition(int layer, int64_t position, int kv_head, float* k, float* v) {
  const ModelConfig& c = model_.config();
  if (layer < 0 || layer >= c.num_layers || kv_head < 0 || kv_head >= c.num_kv_heads ||
      position < 0 || position >= committed_) {
    return absl::OutOfRangeError(absl::StrCat("position ", position, " is not committed"));
  }
  const int B = options_.block_size;
  const size_t off = (static_cast<size_t>(position % B) * c.num_kv_heads + kv_head) * c.head_dim;
  const std::shared_ptr<KvBlock>& tail = tails_[layer];
  if (tail != nullptr && tail->index == position / B) {
    tail->ReadKeys(off, c.head_dim, k);
    tail->ReadValues(off, c.head_dim, v);
    return absl::OkStatus();
  }
  KVMEM_ASSIGN_OR_RETURN(auto block,
                         storage_.source->ReadBlock(KeyOf(layer, position / B), nullptr));
  if (block->index != position / B || position % B >= block->filled) {
    return absl::DataLossError(
        absl::StrCat("stored block ", position / B, " lacks position ", position));
  }
  block->ReadKeys(off, c.head_dim, k);
  block->ReadValues(off, c.head_dim, v);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Session::ApplyPolicy(int64_t new_tokens,
                                             const std::vector<std::vector<float>>& queries,
                                             int observed, uint64_t queries_on_backend) {
  const ModelConfig& c = model_.config();
  // A policy that reads attention rows gets them from the blocks when the backend keeps the
  // hot rows (this turn's are among the blocks in flight).
  std::optional<KvCache> with_rows;
  if (!hot_.host_rows() && policy_->reads_hot_rows()) {
    KVMEM_ASSIGN_OR_RETURN(with_rows, hot_.WithHostRows());
  }
  TurnView view{.kv = with_rows.has_value() ? &*with_rows : &hot_,
                .new_tokens = new_tokens,
                .observed_queries = &queries,
                .observed = observed,
                .num_heads = c.num_heads,
                .sliding_window = c.sliding_window,
                .backend = &backend_,
                .observed_queries_on_backend = queries_on_backend};
  KVMEM_ASSIGN_OR_RETURN(std::vector<std::vector<int64_t>> keep, policy_->Select(view));
  int64_t evicted = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) {
      const std::vector<int64_t>& k = keep[l * c.num_kv_heads + g];
      // Only heads that lose entries are touched (a mutable access marks a head changed).
      if (static_cast<int64_t>(k.size()) == std::as_const(hot_).head(l, g).size()) continue;
      HeadKv& h = hot_.head(l, g);
      evicted += h.size() - static_cast<int64_t>(k.size());
      // Compact in place: kept indices are ascending, so each moves down or stays. Without
      // host rows only positions move (the backend gathers its rows on its next sync).
      const bool rows = hot_.host_rows();
      for (size_t i = 0; i < k.size(); ++i) {
        const int64_t from = k[i];
        h.positions[i] = h.positions[from];
        if (!rows || from == static_cast<int64_t>(i)) continue;
        std::copy_n(&h.keys[from * c.head_dim], c.head_dim, &h.keys[i * c.head_dim]);
        std::copy_n(&h.values[from * c.head_dim], c.head_dim, &h.values[i * c.head_dim]);
      }
      h.positions.resize(k.size());
      if (rows) {
        h.keys.resize(k.size() * c.head_dim);
        h.values.resize(k.size() * c.head_dim);
      }
    }
  }
  return evicted;
}

SessionStats Session::Stats() const {
  const ModelConfig& c = model_.config();
  SessionStats s;
  s.total_tokens = position_;
  s.recalled_blocks = recalled_blocks_;
  s.turns = static_cast<int64_t>(turns_.size());
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g)
      s.hot_tokens_per_head.push_back(hot_.head(l, g).size());
  }
  s.hot_tokens = hot_.TotalEntries();
  s.hot_bytes = s.hot_tokens * backend_.HotEntryBytes(c.head_dim);
  const int B = options_.block_size;
  s.blocks = c.num_layers * ((committed_ + B - 1) / B);
  s.block_bytes = s.blocks * 2 * static_cast<int64_t>(B) * c.kv_dim() *
                  (backend_.KvDType() == BlockDType::kF32 ? 4 : 2);
  return s;
}

}  // namespace kvmem
