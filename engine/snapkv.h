// SnapKV selection (Li et al., NeurIPS 2024) over a ragged per-head KV cache.
//
// For one layer after a turn of n tokens was appended: the observation window is the last
// w' = min(w, n) tokens of the turn. Each window query's attention row is softmax-normalised
// over everything it attends (every earlier entry of its KV head and, causally, the turn's
// tokens up to itself). Votes for each entry before the window are the sum over window rows,
// averaged over the query heads of a KV group; they are pooled with stride 1 over the entry
// order (max or average, a window of `kernel` entries centred on each, clipped at the ends so
// only existing entries count). Each KV head keeps the window plus the top budget - w' pooled
// candidates (ties to the lower position): exactly min(budget, entries) unique entries.
#ifndef KVMEM_ENGINE_SNAPKV_H_
#define KVMEM_ENGINE_SNAPKV_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "engine/kv_cache.h"

namespace kvmem {

enum class Pooling { kMax, kAvg };

struct SnapKvOptions {
  // Default: 32. Observation window: the last `window` tokens of the turn vote.
  int window = 32;
  // Default: 7. Pooling kernel (odd), in entries.
  int kernel = 7;
  // Default: kMax. How votes of neighbouring entries are pooled.
  Pooling pooling = Pooling::kMax;
  // Default: 1024. Entries each (layer, KV head) keeps hot; must exceed `window`.
  int budget = 1024;
};

// INVALID_ARGUMENT for a budget not larger than the window, a non-positive window, or a kernel
// that is not a positive odd number.
absl::Status ValidateSnapKvOptions(const SnapKvOptions& options);

// Calls fn(query_head, self, row) for every observed query of every query head of KV head
// `kv_head`'s group, where row[0..self] is the softmax attention of that query over the head's
// entries [0, self] (self: the query's own entry, the head's entry size() - w + i for row i).
// Entries masked by the sliding window get weight 0. queries: (num_heads, w, head_dim).
void ForEachAttentionRow(const float* queries, int num_heads, int w, const HeadKv& head, int group,
                         int kv_head, int sliding_window,
                         const std::function<void(int, int64_t, const double*)>& fn);

// The pooled votes of the candidates (entries before the window) of one KV head.
// queries: (num_heads, w, head_dim), the post-RoPE queries of the last w entries of every head
// (query head h belongs to KV head h / (num_heads / num_kv_heads)). `heads` holds the layer's
// KV heads; the window's own entries are each head's last w entries. `sliding_window` > 0
// masks keys at distance >= sliding_window as the model's attention does.
std::vector<double> SnapKvScores(const SnapKvOptions& options, const float* queries, int num_heads,
                                 int w, const std::vector<const HeadKv*>& heads, int kv_head,
                                 int sliding_window = 0);

// Indices into each KV head's entries to keep, ascending: (num_kv_heads) lists.
std::vector<std::vector<int64_t>> SelectSnapKv(const SnapKvOptions& options, const float* queries,
                                               int num_heads, int w,
                                               const std::vector<const HeadKv*>& heads,
                                               int sliding_window = 0);

// Indices to keep from `scores` (one per candidate) plus the `w` window entries after them:
// the top min(budget, candidates + w) - w candidates by score, ties to the lower index.
std::vector<int64_t> TopKWithWindow(const std::vector<double>& scores, int64_t w, int64_t budget);

}  // namespace kvmem

#endif  // KVMEM_ENGINE_SNAPKV_H_
