#include "examples/sim_metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/status_macros.h"

namespace kvmem::sim {
namespace {

// log of the softmax normaliser: max + log(sum(exp(x - max))).
double LogSumExp(const float* logits, int vocab) {
  const double m = *std::max_element(logits, logits + vocab);
  double z = 0;
  for (int v = 0; v < vocab; ++v) z += std::exp(logits[v] - m);
  return m + std::log(z);
}

}  // namespace

double KlDivergence(const float* reference, const float* candidate, int vocab) {
  const double lse_p = LogSumExp(reference, vocab), lse_q = LogSumExp(candidate, vocab);
  double kl = 0;
  for (int v = 0; v < vocab; ++v) {
    const double log_p = reference[v] - lse_p;
    const double log_q = candidate[v] - lse_q;
    kl += std::exp(log_p) * (log_p - log_q);
  }
  return std::max(kl, 0.0);  // rounding can leave a tiny negative
}

int ArgMax(const float* logits, int vocab) {
  return static_cast<int>(std::max_element(logits, logits + vocab) - logits);
}

double LogProbability(const float* logits, int vocab, int token) {
  KVMEM_CHECK(token >= 0 && token < vocab);
  return logits[token] - LogSumExp(logits, vocab);
}

std::vector<double> ContextAttention(const HeadKv& full, int64_t context_end, const float* queries,
                                     int num_heads, int rows, int kv_head, int num_kv_heads,
                                     int64_t first_row_position, int sliding_window) {
  std::vector<double> attention(context_end, 0.0);
  if (context_end == 0 || rows == 0) return attention;
  KVMEM_CHECK(full.size() >= context_end && full.positions[context_end - 1] == context_end - 1);
  const int hd = static_cast<int>(full.keys.size() / full.positions.size());
  const int group = num_heads / num_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> logit(context_end);
  int counted = 0;
  for (int g = 0; g < group; ++g) {
    const int hq = kv_head * group + g;
    for (int r = 0; r < rows; ++r) {
      const float* q = queries + (static_cast<int64_t>(hq) * rows + r) * hd;
      const int64_t pos = first_row_position + r;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t p = 0; p < context_end; ++p) {
        if (sliding_window > 0 && pos - p >= sliding_window) {
          logit[p] = -std::numeric_limits<double>::infinity();
          continue;
        }
        double dot = 0;
        for (int d = 0; d < hd; ++d) dot += static_cast<double>(q[d]) * full.keys[p * hd + d];
        logit[p] = dot * scale;
        m = std::max(m, logit[p]);
      }
      ++counted;
      if (m == -std::numeric_limits<double>::infinity()) continue;  // all context masked
      double total = 0;
      for (int64_t p = 0; p < context_end; ++p) total += (logit[p] = std::exp(logit[p] - m));
      for (int64_t p = 0; p < context_end; ++p) attention[p] += logit[p] / total;
    }
  }
  for (double& a : attention) a /= counted;
  return attention;
}

double CoveredShare(const std::vector<double>& attention, const std::vector<int64_t>& hot) {
  if (attention.empty()) return std::numeric_limits<double>::quiet_NaN();
  double covered = 0;
  for (int64_t p : hot) {
    if (p >= 0 && p < static_cast<int64_t>(attention.size())) covered += attention[p];
  }
  return covered;
}

}  // namespace kvmem::sim
