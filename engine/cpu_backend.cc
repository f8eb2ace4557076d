#include "engine/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace kvmem {

CpuBackend::CpuBackend(const Model& model, const CpuBackendOptions& options)
    : model_(model),
      options_(options),
      pool_(std::make_unique<ThreadPool>(options.threads)),
      inv_freq_(model.config().RopeInverseFrequencies()) {
  openblas_set_num_threads(pool_->size());
}

absl::Status CpuBackend::Forward(absl::Span<const int32_t> tokens, int64_t start_pos,
                                 KvCache* kv, const ForwardOptions& options,
                                 ForwardResult* result) {
  const ModelConfig& c = model_.config();
  const ModelWeights& w = model_.weights();
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return absl::InvalidArgumentError("Forward needs at least one token");
  if (!kv->host_rows()) {
    return absl::FailedPreconditionError(
        "the CPU backend attends to rows in host memory; this cache keeps them with a device "
        "backend");
  }
  for (int32_t t : tokens) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  if (start_pos <= kv->MaxPosition()) {
    return absl::InvalidArgumentError(absl::StrCat("start position ", start_pos,
                                                   " does not follow the cached position ",
                                                   kv->MaxPosition()));
  }
  const int64_t h = c.hidden_size, hd = c.head_dim, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t inter = c.intermediate_size;

  std::vector<float> x(n * h);           // (n, hidden) residual stream
  std::vector<float> xn(n * h);          // (n, hidden) normed
  std::vector<float> q(n * qd);          // (n, num_heads, head_dim)
  std::vector<float> k(n * kvd);         // (n, num_kv_heads, head_dim)
  std::vector<float> v(n * kvd);         // (n, num_kv_heads, head_dim)
  std::vector<float> attn(n * qd);       // (n, num_heads, head_dim)
  std::vector<float> proj(n * h);        // (n, hidden)
  std::vector<float> gate(n * inter);    // (n, intermediate)
  std::vector<float> up(n * inter);      // (n, intermediate)

  for (int64_t t = 0; t < n; ++t) {
    std::memcpy(&x[t * h], w.embed + static_cast<int64_t>(tokens[t]) * h, h * sizeof(float));
  }
  const int observed = static_cast<int>(std::min<int64_t>(options.observe_last, n));
  result->observed_queries.assign(observed > 0 ? c.num_layers : 0, {});

  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    // Attention block.
    RmsNorm(x.data(), lw.attn_norm, n, h, c.rms_norm_eps, xn.data());
    MatMulTransposed(xn.data(), n, h, lw.wq, qd, lw.bq, q.data(), pool_.get(), options_.gemm);
    MatMulTransposed(xn.data(), n, h, lw.wk, kvd, lw.bk, k.data(), pool_.get(), options_.gemm);
    MatMulTransposed(xn.data(), n, h, lw.wv, kvd, lw.bv, v.data(), pool_.get(), options_.gemm);
    for (int64_t t = 0; t < n; ++t) {
      ApplyRope(&q[t * qd], c.num_heads, hd, start_pos + t, inv_freq_.data());
      ApplyRope(&k[t * kvd], c.num_kv_heads, hd, start_pos + t, inv_freq_.data());
    }
    if (options.before_attention) {
      const int64_t rows =
          options.hook_query_rows > 0 ? std::min<int64_t>(options.hook_query_rows, n) : n;
      KVMEM_RETURN_IF_ERROR(options.before_attention(l, q.data() + (n - rows) * qd, rows, kv));
    }
    for (int g = 0; g < c.num_kv_heads; ++g) {
      HeadKv& head = kv->head(l, g);
      for (int64_t t = 0; t < n; ++t) {
        head.Append(start_pos + t, &k[(t * c.num_kv_heads + g) * hd],
                    &v[(t * c.num_kv_heads + g) * hd], hd);
      }
    }
    if (observed > 0) {
      std::vector<float>& oq = result->observed_queries[l];  // (num_heads, observed, head_dim)
      oq.resize(static_cast<size_t>(c.num_heads) * observed * hd);
      for (int hq = 0; hq < c.num_heads; ++hq) {
        for (int i = 0; i < observed; ++i) {
          const int64_t t = n - observed + i;
          std::memcpy(&oq[(hq * observed + i) * hd], &q[(t * c.num_heads + hq) * hd],
                      hd * sizeof(float));
        }
      }
    }
    Attend(*kv, l, n, start_pos, q.data(), attn.data());
    MatMulTransposed(attn.data(), n, qd, lw.wo, h, lw.bo, proj.data(), pool_.get(), options_.gemm);
    for (int64_t i = 0; i < n * h; ++i) x[i] += proj[i];

    // MLP block (SwiGLU).
    RmsNorm(x.data(), lw.mlp_norm, n, h, c.rms_norm_eps, xn.data());
    MatMulTransposed(xn.data(), n, h, lw.w_gate, inter, lw.b_gate, gate.data(), pool_.get(),
                     options_.gemm);
    MatMulTransposed(xn.data(), n, h, lw.w_up, inter, lw.b_up, up.data(), pool_.get(),
                     options_.gemm);
    SwiGlu(gate.data(), up.data(), n * inter);
    MatMulTransposed(gate.data(), n, inter, lw.w_down, h, lw.b_down, proj.data(), pool_.get(),
                     options_.gemm);
    for (int64_t i = 0; i < n * h; ++i) x[i] += proj[i];
  }

  const int64_t first = options.all_logits ? 0 : n - 1;
  const int64_t rows = n - first;
  RmsNorm(&x[first * h], w.final_norm, rows, h, c.rms_norm_eps, xn.data());
  result->logits.resize(rows * c.vocab_size);
  MatMulTransposed(xn.data(), rows, h, w.lm_head, c.vocab_size, nullptr, result->logits.data(),
                   pool_.get(), options_.gemm);
  return absl::OkStatus();
}

void CpuBackend::Attend(const KvCache& kv, int layer, int64_t n, int64_t start_pos,
                        const float* q, float* out) {
  const ModelConfig& c = model_.config();
  const int hd = c.head_dim;
  const int group = c.group_size();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t window = c.sliding_window > 0 ? c.sliding_window : std::numeric_limits<int64_t>::max();
  // One work item per (query head, new token).
  pool_->ParallelFor(c.num_heads * n, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int hq = static_cast<int>(item / n);
      const int64_t t = item % n;
      const HeadKv& head = kv.head(layer, hq / group);
      // The new tokens are the last n entries; token t sees every entry up to its own.
      const int64_t visible = head.size() - n + t + 1;
      const int64_t pos = start_pos + t;
      const float* qv = q + (t * c.num_heads + hq) * hd;
      scores.assign(visible, -std::numeric_limits<float>::infinity());
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < visible; ++j) {
        if (pos - head.positions[j] >= window) continue;
        const float* kj = &head.keys[j * hd];
        float dot = 0.f;
        for (int d = 0; d < hd; ++d) dot += qv[d] * kj[d];
        scores[j] = dot * scale;
        max_score = std::max(max_score, scores[j]);
      }
      double denom = 0;
      for (int64_t j = 0; j < visible; ++j) {
        scores[j] = std::exp(scores[j] - max_score);  // masked entries become 0
        denom += scores[j];
      }
      float* o = out + (t * c.num_heads + hq) * hd;
      std::fill(o, o + hd, 0.f);
      const float inv = static_cast<float>(1.0 / denom);
      for (int64_t j = 0; j < visible; ++j) {
        if (scores[j] == 0.f) continue;
        const float p = scores[j] * inv;
        const float* vj = &head.values[j * hd];
        for (int d = 0; d < hd; ++d) o[d] += p * vj[d];
      }
    }
  });
}

}  // namespace kvmem
