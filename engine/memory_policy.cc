#include "engine/memory_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace kvmem {
namespace {

std::vector<int64_t> All(int64_t n) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

SnapKvOptions SnapKvOptionsOf(const MemoryOptions& o) {
  return {.window = o.window, .kernel = o.kernel, .pooling = o.pooling, .budget = o.budget};
}

// The layer's KV heads, as SnapKV's functions take them.
std::vector<const HeadKv*> LayerHeads(const KvCache& kv, int layer) {
  std::vector<const HeadKv*> heads;
  for (int g = 0; g < kv.num_kv_heads(); ++g) heads.push_back(&kv.head(layer, g));
  return heads;
}

// The last `keep` of `w` rows of queries (num_heads, w, head_dim).
std::vector<float> TrailingRows(const float* queries, int num_heads, int w, int keep,
                                int head_dim) {
  std::vector<float> out(static_cast<size_t>(num_heads) * keep * head_dim);
  for (int h = 0; h < num_heads; ++h) {
    std::copy_n(queries + (static_cast<int64_t>(h) * w + w - keep) * head_dim,
                static_cast<int64_t>(keep) * head_dim,
                &out[static_cast<size_t>(h) * keep * head_dim]);
  }
  return out;
}

class FullPolicy : public MemoryPolicy {
 public:
  const char* name() const override { return "full"; }
  bool reads_hot_rows() const override { return false; }
  absl::StatusOr<std::vector<std::vector<int64_t>>> Select(const TurnView& turn) override {
    const KvCache& kv = *turn.kv;
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      for (int g = 0; g < kv.num_kv_heads(); ++g) keep.push_back(All(kv.head(l, g).size()));
    }
    return keep;
  }
  std::unique_ptr<MemoryPolicy> Clone() const override {
    return std::make_unique<FullPolicy>(*this);
  }
};

// StreamingLLM: the first `sinks` entries and the most recent budget - sinks.
class WindowPolicy : public MemoryPolicy {
 public:
  explicit WindowPolicy(const MemoryOptions& o) : budget_(o.budget), sinks_(o.sink_tokens) {}
  const char* name() const override { return "window"; }
  bool reads_hot_rows() const override { return false; }
  absl::StatusOr<std::vector<std::vector<int64_t>>> Select(const TurnView& turn) override {
    const KvCache& kv = *turn.kv;
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      for (int g = 0; g < kv.num_kv_heads(); ++g) {
        const int64_t n = kv.head(l, g).size();
        if (n <= budget_) {
          keep.push_back(All(n));
          continue;
        }
        std::vector<int64_t> k;
        for (int64_t i = 0; i < sinks_; ++i) k.push_back(i);
        for (int64_t i = n - (budget_ - sinks_); i < n; ++i) k.push_back(i);
        keep.push_back(std::move(k));
      }
    }
    return keep;
  }
  std::unique_ptr<MemoryPolicy> Clone() const override {
    return std::make_unique<WindowPolicy>(*this);
  }

 private:
  int64_t budget_;
  int64_t sinks_;
};

class SnapKvPolicy : public MemoryPolicy {
 public:
  explicit SnapKvPolicy(const MemoryOptions& o) : options_(SnapKvOptionsOf(o)) {}
  const char* name() const override { return "snapkv"; }
  int observe_window() const override { return options_.window; }
  // Selects where the backend keeps its rows; reads rows on the host (read back from the blocks
  // when the backend keeps them) only when the backend has no such path or it fails.
  bool reads_hot_rows() const override { return false; }
  absl::StatusOr<std::vector<std::vector<int64_t>>> Select(const TurnView& turn) override {
    const KvCache& kv = *turn.kv;
    const int w = static_cast<int>(std::min<int64_t>(turn.observed, turn.new_tokens));
    KVMEM_CHECK(w == turn.observed && w > 0);
    if (turn.backend != nullptr) {
      // The backend's own copy of the cache (the GPU's) picks the same entries, without
      // bringing the keys to the host. Any failure there falls back to the host below.
      auto on_backend = turn.backend->SelectSnapKv(kv, options_, *turn.observed_queries, w,
                                                   turn.observed_queries_on_backend);
      if (on_backend.ok()) return *std::move(on_backend);
    }
    // On the host: with the cache's own rows, or rows read back from the session's blocks.
    std::optional<KvCache> read_back;
    if (!kv.host_rows()) {
      KVMEM_ASSIGN_OR_RETURN(read_back, kv.WithHostRows());
    }
    const KvCache& rows = read_back.has_value() ? *read_back : kv;
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      auto layer_keep = SelectSnapKv(options_, (*turn.observed_queries)[l].data(), turn.num_heads,
                                     w, LayerHeads(rows, l), turn.sliding_window);
      for (auto& k : layer_keep) keep.push_back(std::move(k));
    }
    return keep;
  }
  std::unique_ptr<MemoryPolicy> Clone() const override {
    return std::make_unique<SnapKvPolicy>(*this);
  }

 private:
  SnapKvOptions options_;
};

// H2O at turn granularity: at each turn boundary every query of the turn adds its attention
// weights (averaged over the query heads of a KV group) to the entries it attended, on top of
// what the entries accumulated in earlier turns; then each head keeps its last
// recent = floor(recent_share * budget) entries and the top budget - recent of the rest by
// accumulated score (ties to the lower position).
// Scores are remembered by absolute position, so entries that come back into the hot set from
// elsewhere (recall) start from 0 and entries that leave are forgotten, as in H2O.
class H2oPolicy : public MemoryPolicy {
 public:
  explicit H2oPolicy(const MemoryOptions& o)
      : budget_(o.budget), recent_(static_cast<int64_t>(std::floor(o.recent_share * o.budget))) {}
  const char* name() const override { return "h2o"; }
  int observe_window() const override { return kWholeTurn; }

  absl::StatusOr<std::vector<std::vector<int64_t>>> Select(const TurnView& turn) override {
    const KvCache& kv = *turn.kv;
    const int group = turn.num_heads / kv.num_kv_heads();
    if (memory_.empty()) memory_.resize(static_cast<size_t>(kv.num_layers()) * kv.num_kv_heads());
    KVMEM_CHECK(memory_.size() == static_cast<size_t>(kv.num_layers()) * kv.num_kv_heads());
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      for (int g = 0; g < kv.num_kv_heads(); ++g) {
        const HeadKv& head = kv.head(l, g);
        HeadScores& remembered = memory_[l * kv.num_kv_heads() + g];
        std::vector<double> score = Recall(remembered, head.positions);
        if (turn.observed > 0) {
          ForEachAttentionRow((*turn.observed_queries)[l].data(), turn.num_heads, turn.observed,
                              head, group, g, turn.sliding_window,
                              [&](int, int64_t self, const double* row) {
                                for (int64_t j = 0; j <= self; ++j) score[j] += row[j] / group;
                              });
        }
        const int64_t n = head.size();
        std::vector<int64_t> k;
        if (n <= budget_) {
          k = All(n);
        } else {
          const int64_t recent = std::min<int64_t>(recent_, n);
          k = TopKWithWindow(std::vector<double>(score.begin(), score.end() - recent), recent,
                             budget_);
        }
        remembered.positions.clear();
        remembered.scores.clear();
        for (int64_t i : k) {
          remembered.positions.push_back(head.positions[i]);
          remembered.scores.push_back(score[i]);
        }
        keep.push_back(std::move(k));
      }
    }
    return keep;
  }
  std::unique_ptr<MemoryPolicy> Clone() const override {
    return std::make_unique<H2oPolicy>(*this);
  }
  std::vector<std::vector<double>> SaveState() const override {
    std::vector<std::vector<double>> state;
    for (const HeadScores& h : memory_) state.push_back(h.scores);
    return state;
  }
  void LoadState(const std::vector<std::vector<int64_t>>& hot_positions,
                 const std::vector<std::vector<double>>& scores) override {
    memory_.clear();
    if (scores.size() != hot_positions.size()) return;  // nothing saved: start afresh
    for (size_t i = 0; i < scores.size(); ++i) {
      if (scores[i].size() != hot_positions[i].size()) {
        memory_.clear();
        return;
      }
      memory_.push_back({hot_positions[i], scores[i]});
    }
  }

 private:
  // Accumulated scores of the entries one (layer, KV head) kept at the last turn boundary.
  struct HeadScores {
    std::vector<int64_t> positions;  // ascending
    std::vector<double> scores;      // same order
  };

  // The remembered score of each of `positions` (ascending), 0 for positions not remembered.
  static std::vector<double> Recall(const HeadScores& remembered,
                                    const std::vector<int64_t>& positions) {
    std::vector<double> score(positions.size(), 0.0);
    size_t r = 0;
    for (size_t i = 0; i < positions.size(); ++i) {
      while (r < remembered.positions.size() && remembered.positions[r] < positions[i]) ++r;
      if (r < remembered.positions.size() && remembered.positions[r] == positions[i]) {
        score[i] = remembered.scores[r];
      }
    }
    return score;
  }

  int64_t budget_;
  int64_t recent_;
  std::vector<HeadScores> memory_;  // (layer, KV head)
};

// SnapKV where each KV head votes with, and keeps, its own observation window: the last
// EntropyAdaptiveWindows(entropies of the layer's heads, w) queries of the turn. A head whose
// observed attention is sharp (low entropy) needs few queries to show what it reads and spends
// the rest of its budget on older entries; a diffuse head gets the whole window.
class AdaptiveSnapKvPolicy : public MemoryPolicy {
 public:
  explicit AdaptiveSnapKvPolicy(const MemoryOptions& o) : options_(SnapKvOptionsOf(o)) {}
  const char* name() const override { return "snapkv-adaptive"; }
  int observe_window() const override { return options_.window; }

  absl::StatusOr<std::vector<std::vector<int64_t>>> Select(const TurnView& turn) override {
    const KvCache& kv = *turn.kv;
    const int w = static_cast<int>(std::min<int64_t>(turn.observed, turn.new_tokens));
    KVMEM_CHECK(w == turn.observed && w > 0);
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      const float* queries = (*turn.observed_queries)[l].data();
      const std::vector<const HeadKv*> heads = LayerHeads(kv, l);
      std::vector<double> entropy(heads.size());
      for (size_t g = 0; g < heads.size(); ++g) {
        entropy[g] = NormalizedAttentionEntropy(queries, turn.num_heads, w, heads,
                                                static_cast<int>(g), turn.sliding_window);
      }
      const std::vector<int> windows = EntropyAdaptiveWindows(entropy, w);
      for (size_t g = 0; g < heads.size(); ++g) {
        const int64_t n = heads[g]->size();
        if (n <= options_.budget) {
          keep.push_back(All(n));
          continue;
        }
        const int wg = windows[g];
        const std::vector<float> rows = TrailingRows(queries, turn.num_heads, w, wg, kv.head_dim());
        const std::vector<double> scores =
            SnapKvScores(options_, rows.data(), turn.num_heads, wg, heads, static_cast<int>(g),
                         turn.sliding_window);
        keep.push_back(TopKWithWindow(scores, wg, options_.budget));
      }
    }
    return keep;
  }
  std::unique_ptr<MemoryPolicy> Clone() const override {
    return std::make_unique<AdaptiveSnapKvPolicy>(*this);
  }

 private:
  SnapKvOptions options_;
};

// Ada-KV: SnapKV's pooled votes, with the layer's num_kv_heads * budget entries allocated to
// the heads by AllocateAdaKv.
class AdaKvPolicy : public MemoryPolicy {
 public:
  explicit AdaKvPolicy(const MemoryOptions& o)
      : options_(SnapKvOptionsOf(o)), min_head_share_(o.min_head_share) {}
  const char* name() const override { return "adakv"; }
  int observe_window() const override { return options_.window; }

  absl::StatusOr<std::vector<std::vector<int64_t>>> Select(const TurnView& turn) override {
    const KvCache& kv = *turn.kv;
    const int w = static_cast<int>(std::min<int64_t>(turn.observed, turn.new_tokens));
    KVMEM_CHECK(w == turn.observed && w > 0);
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      const std::vector<const HeadKv*> heads = LayerHeads(kv, l);
      int64_t entries = 0;
      for (const HeadKv* h : heads) entries += h->size();
      if (entries <= static_cast<int64_t>(heads.size()) * options_.budget) {
        for (const HeadKv* h : heads) keep.push_back(All(h->size()));
        continue;
      }
      std::vector<std::vector<double>> scores;
      for (size_t g = 0; g < heads.size(); ++g) {
        scores.push_back(SnapKvScores(options_, (*turn.observed_queries)[l].data(), turn.num_heads,
                                      w, heads, static_cast<int>(g), turn.sliding_window));
      }
      for (auto& k : AllocateAdaKv(scores, w, options_.budget, min_head_share_)) {
        keep.push_back(std::move(k));
      }
    }
    return keep;
  }
  std::unique_ptr<MemoryPolicy> Clone() const override {
    return std::make_unique<AdaKvPolicy>(*this);
  }

 private:
  SnapKvOptions options_;
  double min_head_share_;
};

}  // namespace

double NormalizedAttentionEntropy(const float* queries, int num_heads, int w,
                                  const std::vector<const HeadKv*>& heads, int kv_head,
                                  int sliding_window) {
  const int group = num_heads / static_cast<int>(heads.size());
  const HeadKv& head = *heads[kv_head];
  double sum = 0;
  int rows = 0;
  ForEachAttentionRow(queries, num_heads, w, head, group, kv_head, sliding_window,
                      [&](int, int64_t self, const double* row) {
                        int64_t attended = 0;
                        double h = 0;
                        for (int64_t j = 0; j <= self; ++j) {
                          if (row[j] <= 0) continue;
                          ++attended;
                          h -= row[j] * std::log(row[j]);
                        }
                        if (attended > 1) sum += h / std::log(static_cast<double>(attended));
                        ++rows;
                      });
  return rows == 0 ? 0.0 : std::clamp(sum / rows, 0.0, 1.0);
}

std::vector<int> EntropyAdaptiveWindows(const std::vector<double>& entropy, int w) {
  const double max_entropy =
      entropy.empty() ? 0.0 : *std::max_element(entropy.begin(), entropy.end());
  std::vector<int> windows;
  for (double e : entropy) {
    if (max_entropy <= 0) {
      windows.push_back(w);
      continue;
    }
    const int wg = static_cast<int>(std::lround(w * e / max_entropy));
    windows.push_back(std::clamp(wg, 1, w));
  }
  return windows;
}

std::vector<std::vector<int64_t>> AllocateAdaKv(const std::vector<std::vector<double>>& scores,
                                                int64_t w, int64_t budget, double min_head_share) {
  const size_t heads = scores.size();
  std::vector<std::vector<int64_t>> keep(heads);
  int64_t entries = 0;
  for (const auto& s : scores) entries += static_cast<int64_t>(s.size()) + w;
  if (entries <= static_cast<int64_t>(heads) * budget) {
    for (size_t g = 0; g < heads; ++g) keep[g] = All(static_cast<int64_t>(scores[g].size()) + w);
    return keep;
  }
  const int64_t floor = std::max<int64_t>(
      w, static_cast<int64_t>(std::ceil(min_head_share * static_cast<double>(budget))));
  // 1. Every head's safeguard: its window and its own best candidates up to `floor`.
  int64_t left = static_cast<int64_t>(heads) * budget;
  std::vector<std::vector<bool>> taken(heads);
  for (size_t g = 0; g < heads; ++g) {
    const int64_t candidates = static_cast<int64_t>(scores[g].size());
    const int64_t guaranteed = std::min(candidates + w, std::min(floor, budget));
    taken[g].assign(candidates, false);
    for (int64_t i : TopKWithWindow(scores[g], w, guaranteed)) {
      if (i < candidates) taken[g][i] = true;
    }
    left -= guaranteed;
  }
  KVMEM_CHECK(left >= 0);
  // 2. The rest of the layer's budget to the best remaining candidates of any head.
  std::vector<std::tuple<double, size_t, int64_t>> pool;  // (score, head, index)
  for (size_t g = 0; g < heads; ++g) {
    for (size_t i = 0; i < scores[g].size(); ++i) {
      if (!taken[g][i]) pool.emplace_back(scores[g][i], g, static_cast<int64_t>(i));
    }
  }
  const int64_t take = std::min<int64_t>(left, static_cast<int64_t>(pool.size()));
  std::partial_sort(pool.begin(), pool.begin() + take, pool.end(),
                    [](const auto& a, const auto& b) {
                      if (std::get<0>(a) != std::get<0>(b)) return std::get<0>(a) > std::get<0>(b);
                      return std::make_pair(std::get<1>(a), std::get<2>(a)) <
                             std::make_pair(std::get<1>(b), std::get<2>(b));
                    });
  for (int64_t t = 0; t < take; ++t) taken[std::get<1>(pool[t])][std::get<2>(pool[t])] = true;
  for (size_t g = 0; g < heads; ++g) {
    const int64_t candidates = static_cast<int64_t>(scores[g].size());
    for (int64_t i = 0; i < candidates; ++i) {
      if (taken[g][i]) keep[g].push_back(i);
    }
    for (int64_t i = 0; i < w; ++i) keep[g].push_back(candidates + i);
  }
  return keep;
}

absl::Status ValidateMemoryOptions(const MemoryOptions& o) {
  if (o.policy == "full") return absl::OkStatus();
  if (o.policy == "snapkv" || o.policy == "snapkv-adaptive") {
    return ValidateSnapKvOptions(SnapKvOptionsOf(o));
  }
  if (o.policy == "adakv") {
    KVMEM_RETURN_IF_ERROR(ValidateSnapKvOptions(SnapKvOptionsOf(o)));
    if (!(o.min_head_share >= 0.0 && o.min_head_share <= 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("adakv min_head_share must be in [0, 1], got ", o.min_head_share));
    }
    return absl::OkStatus();
  }
  if (o.policy == "h2o") {
    if (o.budget <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("h2o hot budget must be positive, got ", o.budget));
    }
    if (!(o.recent_share >= 0.0 && o.recent_share < 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "h2o recent_share must be in [0, 1) (the rest of the budget holds heavy hitters), got ",
          o.recent_share));
    }
    return absl::OkStatus();
  }
  if (o.policy == "window") {
    if (o.sink_tokens < 0 || o.budget <= o.sink_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("window policy needs 0 <= sink tokens (",
                                                     o.sink_tokens, ") < hot budget (", o.budget,
                                                     ")"));
    }
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown memory policy \"", o.policy,
                   "\": use full, snapkv, window, h2o, snapkv-adaptive or adakv"));
}

absl::StatusOr<std::unique_ptr<MemoryPolicy>> MakeMemoryPolicy(const MemoryOptions& o) {
  KVMEM_RETURN_IF_ERROR(ValidateMemoryOptions(o));
  if (o.policy == "full") return std::unique_ptr<MemoryPolicy>(new FullPolicy());
  if (o.policy == "window") return std::unique_ptr<MemoryPolicy>(new WindowPolicy(o));
  if (o.policy == "h2o") return std::unique_ptr<MemoryPolicy>(new H2oPolicy(o));
  if (o.policy == "snapkv-adaptive") {
    return std::unique_ptr<MemoryPolicy>(new AdaptiveSnapKvPolicy(o));
  }
  if (o.policy == "adakv") return std::unique_ptr<MemoryPolicy>(new AdaKvPolicy(o));
  return std::unique_ptr<MemoryPolicy>(new SnapKvPolicy(o));
}

}  // namespace kvmem
