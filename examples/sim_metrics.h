// The numbers kvmem-sim reports, as pure functions of logits, queries and keys.
#ifndef KVMEM_EXAMPLES_SIM_METRICS_H_
#define KVMEM_EXAMPLES_SIM_METRICS_H_

#include <cstdint>
#include <vector>

#include "engine/kv_cache.h"

namespace kvmem::sim {

// KL(P || Q) in nats, P = softmax(reference), Q = softmax(candidate), over `vocab` logits.
// 0 exactly when the two rows are equal.
double KlDivergence(const float* reference, const float* candidate, int vocab);

// The id of the largest logit (the lowest id among equals).
int ArgMax(const float* logits, int vocab);

// log softmax(logits)[token].
double LogProbability(const float* logits, int vocab, int token);

// How a turn's queries spread their attention over earlier context, for one (layer, KV head),
// in the uncompressed session: for each query row r of each query head of the KV head's group,
//   a_r(p) = softmax over context positions p < context_end of q_r . k_p / sqrt(head_dim)
//   (positions a sliding window masks for that row get 0),
// and the result is the mean of a_r over rows: (context_end) weights indexed by position,
// summing to 1 (rows whose whole context is masked add 0; all zero when there are no rows).
// full: the uncompressed head, holding every position [0, context_end) in order.
// queries: (num_heads, rows, head_dim), post-RoPE; row i sits at first_row_position + i.
std::vector<double> ContextAttention(const HeadKv& full, int64_t context_end, const float* queries,
                                     int num_heads, int rows, int kv_head, int num_kv_heads,
                                     int64_t first_row_position, int sliding_window = 0);

// The share of `attention` (from ContextAttention) on the ascending positions in `hot`:
// because the weights are a mean of per-row distributions, this is the mean over rows of the
// share of each row's attention that the hot set covers. NaN for empty `attention`.
double CoveredShare(const std::vector<double>& attention, const std::vector<int64_t>& hot);

}  // namespace kvmem::sim

#endif  // KVMEM_EXAMPLES_SIM_METRICS_H_
