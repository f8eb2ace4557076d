#include "engine/snapkv.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace kvmem {

absl::Status ValidateSnapKvOptions(const SnapKvOptions& o) {
  if (o.window <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("snapkv window must be positive, got ", o.window));
  }
  if (o.kernel <= 0 || o.kernel % 2 == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("snapkv pooling kernel must be a positive odd number, got ", o.kernel));
  }
  if (o.budget <= o.window) {
    return absl::InvalidArgumentError(absl::StrCat("hot budget (", o.budget,
                                                   ") must be larger than the snapkv window (",
                                                   o.window, ")"));
  }
  return absl::OkStatus();
}

void ForEachAttentionRow(const float* queries, int num_heads, int w, const HeadKv& head, int group,
                         int kv_head, int sliding_window,
                         const std::function<void(int, int64_t, const double*)>& fn) {
  const int64_t n = head.size();
  KVMEM_CHECK(w <= n);
  const int hd = static_cast<int>(head.keys.size() / std::max<int64_t>(n, 1));
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> row(n);
  for (int g = 0; g < group; ++g) {
    const int hq = kv_head * group + g;
    for (int i = 0; i < w; ++i) {
      const float* q = queries + (static_cast<int64_t>(hq) * w + i) * hd;
      const int64_t self = n - w + i;
      const int64_t pos = head.positions[self];
      double max_logit = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j <= self; ++j) {
        if (sliding_window > 0 && pos - head.positions[j] >= sliding_window) {
          row[j] = -std::numeric_limits<double>::infinity();
          continue;
        }
        const float* k = &head.keys[j * hd];
        float dot = 0.f;
        for (int d = 0; d < hd; ++d) dot += q[d] * k[d];
        row[j] = dot * scale;
        max_logit = std::max(max_logit, row[j]);
      }
      double denom = 0;
      for (int64_t j = 0; j <= self; ++j) {
        row[j] = std::exp(row[j] - max_logit);
        denom += row[j];
      }
      for (int64_t j = 0; j <= self; ++j) row[j] /= denom;
      fn(hq, self, row.data());
    }
  }
}

std::vector<double> SnapKvScores(const SnapKvOptions& options, const float* queries, int num_heads,
                                 int w, const std::vector<const HeadKv*>& heads, int kv_head,
                                 int sliding_window) {
  const int group = num_heads / static_cast<int>(heads.size());
  const HeadKv& head = *heads[kv_head];
  const int64_t candidates = head.size() - w;
  KVMEM_CHECK(candidates >= 0);
  std::vector<double> votes(candidates, 0.0);
  ForEachAttentionRow(queries, num_heads, w, head, group, kv_head, sliding_window,
                      [&](int, int64_t, const double* row) {
                        for (int64_t j = 0; j < candidates; ++j) votes[j] += row[j];
                      });
  for (double& v : votes) v /= group;

  // Stride-1 pooling that keeps the length; the ends see only entries that exist.
  const int64_t half = options.kernel / 2;
  std::vector<double> pooled(candidates);
  for (int64_t j = 0; j < candidates; ++j) {
    const int64_t lo = std::max<int64_t>(0, j - half);
    const int64_t hi = std::min<int64_t>(candidates - 1, j + half);
    double acc = options.pooling == Pooling::kMax ? -std::numeric_limits<double>::infinity() : 0.0;
    for (int64_t t = lo; t <= hi; ++t) {
      acc = options.pooling == Pooling::kMax ? std::max(acc, votes[t]) : acc + votes[t];
    }
    pooled[j] = options.pooling == Pooling::kMax ? acc : acc / static_cast<double>(hi - lo + 1);
  }
  return pooled;
}

std::vector<int64_t> TopKWithWindow(const std::vector<double>& scores, int64_t w, int64_t budget) {
  const int64_t candidates = static_cast<int64_t>(scores.size());
  const int64_t take = std::max<int64_t>(0, std::min(budget, candidates + w) - w);
  std::vector<int64_t> order(candidates);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + take, order.end(),
                    [&](int64_t a, int64_t b) {
                      return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
                    });
  order.resize(take);
  std::sort(order.begin(), order.end());
  for (int64_t i = 0; i < w; ++i) order.push_back(candidates + i);
  return order;
}

std::vector<std::vector<int64_t>> SelectSnapKv(const SnapKvOptions& options, const float* queries,
                                               int num_heads, int w,
                                               const std::vector<const HeadKv*>& heads,
                                               int sliding_window) {
  std::vector<std::vector<int64_t>> keep(heads.size());
  for (size_t g = 0; g < heads.size(); ++g) {
    const int64_t n = heads[g]->size();
    if (n <= options.budget) {  // nothing to evict
      keep[g].resize(n);
      std::iota(keep[g].begin(), keep[g].end(), 0);
      continue;
    }
    std::vector<double> scores =
        SnapKvScores(options, queries, num_heads, w, heads, static_cast<int>(g), sliding_window);
    keep[g] = TopKWithWindow(scores, w, options.budget);
  }
  return keep;
}

}  // namespace kvmem
