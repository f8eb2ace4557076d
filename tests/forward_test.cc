// The CPU forward pass against an independent double-precision transcription of the model.
#include <cmath>
#include <memory>
#include <numbers>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace kvmem {
namespace {

using testing::RandomModelSpec;
using testing::TempDir;

// Straightforward double-precision Llama forward over a whole sequence (no cache), written
// from the Hugging Face modelling code, sharing nothing with the engine but the weights.
class ReferenceLlama {
 public:
  explicit ReferenceLlama(const Model& model) : m_(model), c_(model.config()) {}

  // Logits (n, vocab) for every position of `tokens` (positions 0..n-1).
  std::vector<double> Forward(const std::vector<int32_t>& tokens) const {
    const int n = static_cast<int>(tokens.size());
    const int H = c_.hidden_size, hd = c_.head_dim, nh = c_.num_heads, nkv = c_.num_kv_heads;
    const ModelWeights& w = m_.weights();
    std::vector<std::vector<double>> x(n, std::vector<double>(H));
    for (int t = 0; t < n; ++t) {
      for (int i = 0; i < H; ++i) x[t][i] = w.embed[tokens[t] * H + i];
    }
    for (int l = 0; l < c_.num_layers; ++l) {
      const LayerWeights& lw = w.layers[l];
      std::vector<std::vector<double>> q(n), k(n), v(n);
      for (int t = 0; t < n; ++t) {
        auto xn = Norm(x[t], lw.attn_norm);
        q[t] = Linear(xn, lw.wq, lw.bq, nh * hd);
        k[t] = Linear(xn, lw.wk, lw.bk, nkv * hd);
        v[t] = Linear(xn, lw.wv, lw.bv, nkv * hd);
        Rope(&q[t], nh, t);
        Rope(&k[t], nkv, t);
      }
      for (int t = 0; t < n; ++t) {
        std::vector<double> attn(nh * hd, 0.0);
        for (int h = 0; h < nh; ++h) {
          const int g = h / (nh / nkv);
          std::vector<double> p(t + 1, 0.0);
          double mx = -1e300;
          for (int s = 0; s <= t; ++s) {
            if (c_.sliding_window > 0 && t - s >= c_.sliding_window) continue;
            double dot = 0;
            for (int d = 0; d < hd; ++d) dot += q[t][h * hd + d] * k[s][g * hd + d];
            p[s] = dot / std::sqrt(static_cast<double>(hd));
            mx = std::max(mx, p[s]);
          }
          double sum = 0;
          for (int s = 0; s <= t; ++s) {
            const bool masked = c_.sliding_window > 0 && t - s >= c_.sliding_window;
            p[s] = masked ? 0.0 : std::exp(p[s] - mx);
            sum += p[s];
          }
          for (int s = 0; s <= t; ++s) {
            for (int d = 0; d < hd; ++d) attn[h * hd + d] += p[s] / sum * v[s][g * hd + d];
          }
        }
        auto o = Linear(attn, lw.wo, lw.bo, H);
        for (int i = 0; i < H; ++i) x[t][i] += o[i];
      }
      for (int t = 0; t < n; ++t) {
        auto xn = Norm(x[t], lw.mlp_norm);
        auto gate = Linear(xn, lw.w_gate, lw.b_gate, c_.intermediate_size);
        auto up = Linear(xn, lw.w_up, lw.b_up, c_.intermediate_size);
        for (int i = 0; i < c_.intermediate_size; ++i) {
          gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
        }
        auto down = Linear(gate, lw.w_down, lw.b_down, H);
        for (int i = 0; i < H; ++i) x[t][i] += down[i];
      }
    }
    std::vector<double> logits;
    for (int t = 0; t < n; ++t) {
      auto out = Linear(Norm(x[t], w.final_norm), w.lm_head, nullptr, c_.vocab_size);
      logits.insert(logits.end(), out.begin(), out.end());
    }
    return logits;
  }

 private:
  std::vector<double> Norm(const std::vector<double>& x, const float* weight) const {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double r = 1.0 / std::sqrt(ss / x.size() + c_.rms_norm_eps);
    std::vector<double> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] * r * weight[i];
    return out;
  }

  std::vector<double> Linear(const std::vector<double>& x, const float* w, const float* b,
                             int out_dim) const {
    std::vector<double> y(out_dim);
    for (int o = 0; o < out_dim; ++o) {
      double acc = b ? b[o] : 0.0;
      for (size_t i = 0; i < x.size(); ++i) acc += x[i] * w[o * x.size() + i];
      y[o] = acc;
    }
    return y;
  }

  // Rotate-half RoPE with the frequencies written out here (llama3 scaling included).
  void Rope(std::vector<double>* x, int heads, int pos) const {
    const int hd = c_.head_dim, half = hd / 2;
    for (int i = 0; i < half; ++i) {
      double f = std::pow(c_.rope_theta, -2.0 * i / hd);
      const RopeScaling& s = c_.rope_scaling;
      if (s.type == RopeScaling::Type::kLlama3) {
        const double wavelen = 2 * std::numbers::pi / f;
        const double lo = s.original_max_position_embeddings / s.low_freq_factor;
        const double hi = s.original_max_position_embeddings / s.high_freq_factor;
        if (wavelen > lo) {
          f = f / s.factor;
        } else if (wavelen >= hi) {
          const double a = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) /
                           (s.high_freq_factor - s.low_freq_factor);
          f = (1 - a) * f / s.factor + a * f;
        }
      } else if (s.type == RopeScaling::Type::kLinear) {
        f /= s.factor;
      }
      const double cs = std::cos(pos * f), sn = std::sin(pos * f);
      for (int h = 0; h < heads; ++h) {
        double& a = (*x)[h * hd + i];
        double& b = (*x)[h * hd + i + half];
        const double a0 = a, b0 = b;
        a = a0 * cs - b0 * sn;
        b = b0 * cs + a0 * sn;
      }
    }
  }

  const Model& m_;
  const ModelConfig& c_;
};

double RelativeError(const std::vector<float>& got, const std::vector<double>& want,
                     size_t offset = 0) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = got[i] - want[offset + i];
    num += d * d;
    den += want[offset + i] * want[offset + i];
  }
  return std::sqrt(num / den);
}

std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& v : t) v = static_cast<int32_t>(rng() % vocab);
  return t;
}

struct Case {
  const char* name;
  RandomModelSpec spec;
};

class ForwardTest : public ::testing::TestWithParam<Case> {};

TEST_P(ForwardTest, PrefillMatchesDoublePrecisionReference) {
  TempDir dir;
  testing::WriteRandomModel(dir.path(), GetParam().spec);
  auto model = Model::Load(dir.path(), {.require_tokenizer = false});
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  auto tokens = RandomTokens(19, c.vocab_size, 7);
  std::vector<double> want = ReferenceLlama(**model).Forward(tokens);
  for (GemmImpl gemm : {GemmImpl::kOpenBlas, GemmImpl::kBlocked}) {
    CpuBackend backend(**model, {.threads = 2, .gemm = gemm});
    KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim);
    ForwardResult result;
    ASSERT_TRUE(backend.Forward(tokens, 0, &kv, {.all_logits = true}, &result).ok());
    ASSERT_EQ(result.logits.size(), want.size());
    EXPECT_LT(RelativeError(result.logits, want), 1e-5) << "gemm " << static_cast<int>(gemm);
  }
}

TEST_P(ForwardTest, DecodeWithCacheMatchesFullRecompute) {
  TempDir dir;
  testing::WriteRandomModel(dir.path(), GetParam().spec);
  auto model = Model::Load(dir.path(), {.require_tokenizer = false});
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  const int prompt = 6, steps = 10;
  auto tokens = RandomTokens(prompt + steps, c.vocab_size, 11);
  std::vector<double> want = ReferenceLlama(**model).Forward(tokens);
  CpuBackend backend(**model, {.threads = 2});
  KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim);
  ForwardResult result;
  ASSERT_TRUE(backend.Forward(absl::MakeConstSpan(tokens).subspan(0, prompt), 0, &kv, {}, &result)
                  .ok());
  EXPECT_LT(RelativeError(result.logits, want, (prompt - 1) * c.vocab_size), 1e-5);
  for (int t = prompt; t < prompt + steps; ++t) {
    ASSERT_TRUE(backend.Forward(absl::MakeConstSpan(tokens).subspan(t, 1), t, &kv, {}, &result)
                    .ok());
    EXPECT_LT(RelativeError(result.logits, want, static_cast<size_t>(t) * c.vocab_size), 1e-5)
        << "decode step at position " << t;
  }
  EXPECT_EQ(kv.head(0, 0).size(), prompt + steps);
}

RandomModelSpec Spec(std::function<void(RandomModelSpec&)> edit) {
  RandomModelSpec s;
  edit(s);
  return s;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ForwardTest,
    ::testing::Values(
        Case{"Gqa", Spec([](RandomModelSpec&) {})},
        Case{"MultiHead", Spec([](RandomModelSpec& s) { s.kv_heads = 4; })},
        Case{"MultiQuery", Spec([](RandomModelSpec& s) { s.kv_heads = 1; s.layers = 3; })},
        Case{"BiasesTiedHeadDim", Spec([](RandomModelSpec& s) {
               s.attention_bias = s.mlp_bias = s.tie_embeddings = true;
               s.head_dim = 16;  // head_dim * heads != hidden
             })},
        Case{"Llama3RopeScaling", Spec([](RandomModelSpec& s) {
               s.rope_theta = 500000.0;
               s.rope_scaling = {{"rope_type", "llama3"}, {"factor", 8.0},
                                 {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                                 {"original_max_position_embeddings", 16}};
             })},
        Case{"SlidingWindow", Spec([](RandomModelSpec& s) { s.sliding_window = 5; })},
        Case{"Bf16Weights", Spec([](RandomModelSpec& s) { s.dtype = DType::kBF16; })},
        Case{"F16Weights", Spec([](RandomModelSpec& s) { s.dtype = DType::kF16; })}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

TEST(ForwardErrorsTest, RejectsOutOfVocabularyTokensAndStalePositions) {
  TempDir dir;
  testing::WriteRandomModel(dir.path(), {});
  auto model = Model::Load(dir.path(), {.require_tokenizer = false});
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  CpuBackend backend(**model, {.threads = 1});
  KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim);
  ForwardResult result;
  std::vector<int32_t> bad = {3, c.vocab_size};
  EXPECT_EQ(backend.Forward(bad, 0, &kv, {}, &result).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.TotalEntries(), 0);
  std::vector<int32_t> good = {3, 4};
  ASSERT_TRUE(backend.Forward(good, 0, &kv, {}, &result).ok());
  EXPECT_EQ(backend.Forward(good, 1, &kv, {}, &result).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.head(0, 0).size(), 2);
}

TEST(ForwardHookTest, HookGetsOnlyTheLastQueryRowsItAsksFor) {
  TempDir dir;
  testing::WriteRandomModel(dir.path(), {});
  auto model = Model::Load(dir.path(), {.require_tokenizer = false});
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  CpuBackend backend(**model, {.threads = 1});
  const std::vector<int32_t> tokens = {3, 4, 5, 6, 7, 8, 9};
  // Per layer, the query rows the hook saw: (rows, num_heads, head_dim).
  auto run = [&](int hook_query_rows, std::vector<int64_t>* counts) {
    std::vector<std::vector<float>> seen(c.num_layers);
    KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim);
    ForwardOptions options;
    options.hook_query_rows = hook_query_rows;
    options.before_attention = [&](int layer, const float* q, int64_t n, KvCache*) {
      counts->push_back(n);
      seen[layer].assign(q, q + n * c.q_dim());
      return absl::OkStatus();
    };
    ForwardResult result;
    EXPECT_TRUE(backend.Forward(tokens, 0, &kv, options, &result).ok());
    return seen;
  };
  std::vector<int64_t> all_counts, tail_counts, big_counts;
  const auto all = run(0, &all_counts);
  const auto tail = run(3, &tail_counts);
  const auto big = run(100, &big_counts);
  EXPECT_EQ(all_counts, std::vector<int64_t>(c.num_layers, 7));
  EXPECT_EQ(tail_counts, std::vector<int64_t>(c.num_layers, 3));
  EXPECT_EQ(big_counts, std::vector<int64_t>(c.num_layers, 7));
  for (int l = 0; l < c.num_layers; ++l) {
    EXPECT_EQ(tail[l], std::vector<float>(all[l].end() - 3 * c.q_dim(), all[l].end()));
    EXPECT_EQ(big[l], all[l]);
  }
}

}  // namespace
}  // namespace kvmem
