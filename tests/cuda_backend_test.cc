// The CUDA backend against the CPU reference: logits of random-weight models of several shapes
// (f32 within 1e-5, bf16 within 1e-2, relative L2), the device copy of the hot set through
// every way a session edits it (append, roll back, evict, recall), and whole sessions on the
// real stories260K model (greedy text, SnapKV with recall) giving the same tokens on both.
// Skips, saying why, where no usable CUDA device is present.
#include "engine/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "engine/block_memory.h"
#include "engine/cpu_backend.h"
#include "engine/kv_store.h"
#include "engine/session.h"
#include "gtest/gtest.h"
#include "service/session_manager.h"
#include "tests/test_util.h"

namespace kvmem {
namespace {

using testing::RandomModelSpec;
using testing::TempDir;

#define SKIP_WITHOUT_CUDA()                                                \
  do {                                                                     \
    std::string why;                                                       \
    if (!CudaBackendAvailable(0, &why)) GTEST_SKIP() << "no GPU: " << why; \
  } while (0)

// sqrt(sum (got - want)^2 / sum want^2).
double RelativeL2(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / den);
}

std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& v : t) v = static_cast<int32_t>(rng() % vocab);
  return t;
}

// The bounds: f32 within 1e-5; 16-bit types within 1e-2. The 16-bit cases store their
// random weights in that type, so the bound measures the device's rounding of activations and
// KV, not a rounding of the weights the CPU never sees.
double Tolerance(DeviceDtype dtype) { return dtype == DeviceDtype::kF32 ? 1e-5 : 1e-2; }

// Whole-model logits: every layer rounds its norm outputs, queries, K, V, attention outputs and
// SwiGLU activations to the device type, and the roundings add up over the layers. bf16 keeps 8
// bits of mantissa, f16 11: on an H100 the 2-layer bf16 cases' logits came within 1.1-1.4% of
// the CPU's while each op stays within the per-op 1e-2, and the f16 ones within 0.1-0.2%.
double LogitTolerance(DeviceDtype dtype) {
  switch (dtype) {
    case DeviceDtype::kF32:
      return 1e-5;
    case DeviceDtype::kF16:
      return 1e-2;
    case DeviceDtype::kBF16:
      break;
  }
  return 2e-2;
}

// Keeps entries of every head of `kv` for which keep(layer, kv_head, position) holds.
void Evict(KvCache* kv, const std::function<bool(int, int, int64_t)>& keep) {
  const int hd = kv->head_dim();
  for (int l = 0; l < kv->num_layers(); ++l) {
    for (int g = 0; g < kv->num_kv_heads(); ++g) {
      HeadKv& head = kv->head(l, g);
      HeadKv kept;
      for (int64_t i = 0; i < head.size(); ++i) {
        if (keep(l, g, head.positions[i])) {
          kept.Append(head.positions[i], &head.keys[i * hd], &head.values[i * hd], hd);
        }
      }
      head = std::move(kept);
    }
  }
}

struct Case {
  const char* name;
  RandomModelSpec spec;
  DeviceDtype dtype;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class CudaParityTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_CUDA();
    testing::WriteRandomModel(dir_.path(), GetParam().spec);
    auto model = Model::Load(dir_.path(), {.require_tokenizer = false});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    cpu_ = std::make_unique<CpuBackend>(*model_, CpuBackendOptions{.threads = 2});
    auto gpu = CreateCudaBackend(*model_, {.dtype = GetParam().dtype});
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = std::move(*gpu);
  }

  KvCache NewCache() const {
    const ModelConfig& c = model_->config();
    return KvCache(c.num_layers, c.num_kv_heads, c.head_dim);
  }

  // RelativeL2 of whole-model logits, remembering the worst for the log.
  double LogitError(const std::vector<float>& got, const std::vector<float>& want) {
    const double e = RelativeL2(got, want);
    worst_logit_error_ = std::max(worst_logit_error_, e);
    return e;
  }
  void TearDown() override {
    if (worst_logit_error_ > 0) {
      std::printf("worst relative L2 error of logits: %.3g\n", worst_logit_error_);
    }
  }

  double worst_logit_error_ = 0;

  TempDir dir_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<CpuBackend> cpu_;
  std::unique_ptr<Backend> gpu_;
};

TEST_P(CudaParityTest, PrefillAndDecodeLogitsMatchTheCpu) {
  const ModelConfig& c = model_->config();
  const double tol = Tolerance(GetParam().dtype);
  const double logit_tol = LogitTolerance(GetParam().dtype);
  auto tokens = RandomTokens(40, c.vocab_size, 3);
  KvCache cpu_kv = NewCache(), gpu_kv = NewCache();
  ForwardResult want, got;
  const int prompt = 29;
  const ForwardOptions opts{.all_logits = true, .observe_last = 5};
  auto prefix = absl::MakeConstSpan(tokens).subspan(0, prompt);
  ASSERT_TRUE(cpu_->Forward(prefix, 0, &cpu_kv, opts, &want).ok());
  ASSERT_TRUE(gpu_->Forward(prefix, 0, &gpu_kv, opts, &got).ok());
  EXPECT_LT(LogitError(got.logits, want.logits), logit_tol);
  ASSERT_EQ(got.observed_queries.size(), want.observed_queries.size());
  for (int l = 0; l < c.num_layers; ++l) {
    EXPECT_LT(RelativeL2(got.observed_queries[l], want.observed_queries[l]), tol) << "layer " << l;
  }
  // The host cache receives the device's entries, positions in order.
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) {
      EXPECT_EQ(gpu_kv.head(l, g).positions, cpu_kv.head(l, g).positions);
      EXPECT_LT(RelativeL2(gpu_kv.head(l, g).keys, cpu_kv.head(l, g).keys), tol);
      EXPECT_LT(RelativeL2(gpu_kv.head(l, g).values, cpu_kv.head(l, g).values), tol);
    }
  }
  for (int t = prompt; t < static_cast<int>(tokens.size()); ++t) {
    auto one = absl::MakeConstSpan(tokens).subspan(t, 1);
    ASSERT_TRUE(cpu_->Forward(one, t, &cpu_kv, {.observe_last = 1}, &want).ok());
    ASSERT_TRUE(gpu_->Forward(one, t, &gpu_kv, {.observe_last = 1}, &got).ok());
    EXPECT_LT(LogitError(got.logits, want.logits), logit_tol) << "decode at position " << t;
  }
}

TEST_P(CudaParityTest, DeviceCopyFollowsEveryEditOfTheHotSet) {
  const ModelConfig& c = model_->config();
  const double tol = Tolerance(GetParam().dtype);
  const double logit_tol = LogitTolerance(GetParam().dtype);
  auto tokens = RandomTokens(80, c.vocab_size, 5);
  KvCache cpu_kv = NewCache(), gpu_kv = NewCache();
  ForwardResult want, got;
  auto both = [&](int64_t from, int64_t count, const char* what) {
    auto span = absl::MakeConstSpan(tokens).subspan(from, count);
    ASSERT_TRUE(cpu_->Forward(span, from, &cpu_kv, {}, &want).ok());
    ASSERT_TRUE(gpu_->Forward(span, from, &gpu_kv, {}, &got).ok());
    EXPECT_LT(LogitError(got.logits, want.logits), logit_tol) << what;
  };
  both(0, 24, "first prefill");
  // Keep a different subset per head (eviction: a gather on the device).
  const auto evict = [](int l, int g, int64_t p) { return p < 3 || (p * (g + 2) + l) % 5 < 2; };
  Evict(&cpu_kv, evict);
  Evict(&gpu_kv, evict);
  both(24, 9, "after eviction");
  // Roll back the last 4 tokens, then compute different tokens at those positions.
  const auto before_33_minus_4 = [](int, int, int64_t p) { return p < 29; };
  Evict(&cpu_kv, before_33_minus_4);
  Evict(&gpu_kv, before_33_minus_4);
  std::swap(tokens[30], tokens[60]);
  both(29, 1, "decode after roll-back");
  both(30, 1, "second decode after roll-back");
  // Recall: a full host copy is kept aside and some evicted entries come back, per head.
  KvCache full = NewCache();
  ASSERT_TRUE(cpu_->Forward(absl::MakeConstSpan(tokens).subspan(0, 31), 0, &full, {}, &want).ok());
  auto recall = [&](KvCache* kv) {
    const int hd = c.head_dim;
    for (int l = 0; l < c.num_layers; ++l) {
      for (int g = 0; g < c.num_kv_heads; ++g) {
        HeadKv& head = kv->head(l, g);
        const HeadKv& src = full.head(l, g);
        HeadKv merged;
        size_t i = 0;
        for (int64_t j = 0; j < src.size(); ++j) {
          const int64_t p = src.positions[j];
          const bool hot = i < head.positions.size() && head.positions[i] == p;
          if (hot) {
            merged.Append(p, &head.keys[i * hd], &head.values[i * hd], hd);
            ++i;
          } else if ((p + g) % 3 == 0) {
            merged.Append(p, &src.keys[j * hd], &src.values[j * hd], hd);
          }
        }
        head = std::move(merged);
      }
    }
  };
  recall(&cpu_kv);
  recall(&gpu_kv);
  both(31, 17, "prefill after recall");
  both(48, 1, "decode after recall");
  // A copy of the cache has no device copy: the backend uploads it whole.
  KvCache copy = gpu_kv;
  ASSERT_TRUE(gpu_->Forward(absl::MakeConstSpan(tokens).subspan(49, 3), 49, &copy, {}, &got).ok());
  ASSERT_TRUE(
      cpu_->Forward(absl::MakeConstSpan(tokens).subspan(49, 3), 49, &cpu_kv, {}, &want).ok());
  EXPECT_LT(LogitError(got.logits, want.logits), logit_tol) << "a copied cache";
}

TEST_P(CudaParityTest, RecallHookGetsTheLastQueryRowsItAsksFor) {
  const ModelConfig& c = model_->config();
  auto tokens = RandomTokens(12, c.vocab_size, 4);
  auto run = [&](Backend& backend) {
    std::vector<float> seen;  // every layer's rows, in layer order
    std::vector<int64_t> counts;
    KvCache kv = NewCache();
    ForwardOptions opts;
    opts.hook_query_rows = 5;
    opts.before_attention = [&](int, const float* q, int64_t n, KvCache*) {
      counts.push_back(n);
      seen.insert(seen.end(), q, q + n * c.q_dim());
      return absl::OkStatus();
    };
    ForwardResult r;
    EXPECT_TRUE(backend.Forward(tokens, 0, &kv, opts, &r).ok());
    EXPECT_EQ(counts, std::vector<int64_t>(c.num_layers, 5));
    return seen;
  };
  const std::vector<float> want = run(*cpu_), got = run(*gpu_);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_LT(RelativeL2(got, want), Tolerance(GetParam().dtype));
}

TEST_P(CudaParityTest, RecallHookChangesTheLayerBeforeItsAttention) {
  // The session's recall inserts entries while the pass runs (ForwardOptions::before_attention).
  const ModelConfig& c = model_->config();
  const double tol = Tolerance(GetParam().dtype);
  const double logit_tol = LogitTolerance(GetParam().dtype);
  auto tokens = RandomTokens(50, c.vocab_size, 9);
  KvCache full = NewCache();
  ForwardResult want, got;
  ASSERT_TRUE(cpu_->Forward(absl::MakeConstSpan(tokens).subspan(0, 40), 0, &full, {}, &want).ok());
  KvCache cpu_kv = full, gpu_kv = full;
  const auto sparse = [](int, int g, int64_t p) { return p % 4 == g % 4; };
  Evict(&cpu_kv, sparse);
  Evict(&gpu_kv, sparse);
  int hook_calls = 0;
  ForwardOptions opts;
  opts.before_attention = [&](int layer, const float* q, int64_t n, KvCache* kv) {
    ++hook_calls;
    EXPECT_EQ(n, 10);
    EXPECT_TRUE(std::isfinite(q[0]));
    const int hd = c.head_dim;
    for (int g = 0; g < c.num_kv_heads; ++g) {
      // Bring back every entry of positions 8..15 for this layer.
      HeadKv& head = kv->head(layer, g);
      const HeadKv& src = full.head(layer, g);
      HeadKv merged;
      size_t i = 0;
      for (int64_t j = 0; j < src.size(); ++j) {
        const int64_t p = src.positions[j];
        if (i < head.positions.size() && head.positions[i] == p) {
          merged.Append(p, &head.keys[i * hd], &head.values[i * hd], hd);
          ++i;
        } else if (p >= 8 && p < 16) {
          merged.Append(p, &src.keys[j * hd], &src.values[j * hd], hd);
        }
      }
      head = std::move(merged);
    }
    return absl::OkStatus();
  };
  auto turn = absl::MakeConstSpan(tokens).subspan(40, 10);
  ASSERT_TRUE(cpu_->Forward(turn, 40, &cpu_kv, opts, &want).ok());
  ASSERT_TRUE(gpu_->Forward(turn, 40, &gpu_kv, opts, &got).ok());
  EXPECT_EQ(hook_calls, 2 * c.num_layers);
  EXPECT_LT(LogitError(got.logits, want.logits), logit_tol);
  for (int l = 0; l < c.num_layers; ++l) {
    EXPECT_EQ(gpu_kv.head(l, 0).positions, cpu_kv.head(l, 0).positions);
  }
  // A failing hook fails the pass; the next pass still matches (the device copy is rebuilt).
  ForwardOptions failing;
  failing.before_attention = [](int layer, const float*, int64_t, KvCache*) {
    return layer == 1 ? absl::DataLossError("planted") : absl::OkStatus();
  };
  EXPECT_EQ(
      gpu_->Forward(absl::MakeConstSpan(tokens).subspan(0, 1), 50, &gpu_kv, failing, &got).code(),
      absl::StatusCode::kDataLoss);
  ASSERT_TRUE(
      cpu_->Forward(absl::MakeConstSpan(tokens).subspan(0, 1), 50, &cpu_kv, {}, &want).ok());
  ASSERT_TRUE(gpu_->Forward(absl::MakeConstSpan(tokens).subspan(0, 1), 50, &gpu_kv, {}, &got).ok());
  EXPECT_LT(LogitError(got.logits, want.logits), logit_tol);
}

TEST_P(CudaParityTest, SnapKvOnTheDevicePicksTheHostsEntries) {
  const ModelConfig& c = model_->config();
  auto tokens = RandomTokens(70, c.vocab_size, 13);
  KvCache gpu_kv = NewCache();
  ForwardResult got;
  const int w = 8;
  ASSERT_TRUE(gpu_->Forward(tokens, 0, &gpu_kv, {.observe_last = w}, &got).ok());
  // A ragged cache: heads already differ before this selection.
  const auto evict = [](int l, int g, int64_t p) { return p >= 40 || (p + l + g) % 3 != 0; };
  Evict(&gpu_kv, evict);
  const SnapKvOptions options{.window = w, .kernel = 3, .pooling = Pooling::kMax, .budget = 20};
  // Three times: reading the queries the pass kept on the device (as a session's turn ends),
  // then uploading the host's, then with the kept copy's name again, which the first selection
  // used up (so the host's are uploaded). All three pick the host's entries.
  const uint64_t kept = got.observed_queries_on_backend;
  EXPECT_NE(kept, 0u);
  const int64_t kept_reads = GetCudaUploadStats(*gpu_).snapkv_queries_kept;
  for (uint64_t queries_on_backend : {kept, uint64_t{0}, kept}) {
    SCOPED_TRACE(::testing::Message() << "queries_on_backend " << queries_on_backend);
    auto on_device =
        gpu_->SelectSnapKv(gpu_kv, options, got.observed_queries, w, queries_on_backend);
    ASSERT_TRUE(on_device.ok()) << on_device.status();
    ASSERT_EQ(on_device->size(), static_cast<size_t>(c.num_layers * c.num_kv_heads));
    for (int l = 0; l < c.num_layers; ++l) {
      std::vector<const HeadKv*> heads;
      for (int g = 0; g < c.num_kv_heads; ++g) heads.push_back(&gpu_kv.head(l, g));
      const auto want = SelectSnapKv(options, got.observed_queries[l].data(), c.num_heads, w,
                                     heads, c.sliding_window);
      for (int g = 0; g < c.num_kv_heads; ++g) {
        EXPECT_EQ((*on_device)[l * c.num_kv_heads + g], want[g]) << "layer " << l << " head " << g;
      }
    }
  }
  EXPECT_EQ(GetCudaUploadStats(*gpu_).snapkv_queries_kept - kept_reads, 1);
  // The CPU backend and a cache the device has never seen leave selection to the host.
  EXPECT_EQ(cpu_->SelectSnapKv(gpu_kv, options, got.observed_queries, w, 0).status().code(),
            absl::StatusCode::kUnimplemented);
  KvCache fresh = gpu_kv;
  EXPECT_EQ(gpu_->SelectSnapKv(fresh, options, got.observed_queries, w, kept).status().code(),
            absl::StatusCode::kUnimplemented);
}

TEST_P(CudaParityTest, RecallScoresOnTheDeviceEqualTheHostLoopBitForBit) {
  const ModelConfig& c = model_->config();
  auto tokens = RandomTokens(12, c.vocab_size, 19);
  KvCache kv = NewCache();
  ForwardResult r;
  ASSERT_TRUE(gpu_->Forward(tokens, 0, &kv, {}, &r).ok());  // the cache gets its device copy
  const int hd = c.head_dim, kvh = c.num_kv_heads, group = c.group_size();
  const int64_t n = 10;
  const int w = 6;
  std::mt19937 rng(23);
  std::normal_distribution<float> normal;
  std::vector<float> q(n * c.q_dim());
  for (float& v : q) v = normal(rng);
  std::vector<std::vector<float>> digests(5, std::vector<float>(kvh * 2 * hd));
  for (auto& d : digests) {
    for (float& v : d) v = normal(rng);
  }
  auto host = [&] {
    std::vector<float> want(kvh * digests.size());
    for (int g = 0; g < kvh; ++g) {
      for (size_t b = 0; b < digests.size(); ++b) {
        float best = -std::numeric_limits<float>::infinity();
        for (int h = g * group; h < (g + 1) * group; ++h) {
          for (int64_t i = n - w; i < n; ++i) {
            best = std::max(best, DigestScore(&q[(i * c.num_heads + h) * hd],
                                              &digests[b][static_cast<size_t>(g) * 2 * hd], hd));
          }
        }
        want[g * digests.size() + b] = best;
      }
    }
    return want;
  };
  for (int layer : {0, 1}) {
    auto got = gpu_->ScoreRecallBlocks(kv, layer, q.data(), n, w, digests);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, host()) << "layer " << layer;
  }
  // The last block fills further and two more arrive: only those are uploaded again.
  for (float& v : digests.back()) v = normal(rng);
  digests.push_back(digests.front());
  digests.push_back(std::vector<float>(kvh * 2 * hd, 0.5f));
  auto again = gpu_->ScoreRecallBlocks(kv, 0, q.data(), n, w, digests);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, host());
  // Past the first allocation (64 blocks) the device copy grows, keeping what it holds.
  while (digests.size() < 70) {
    std::vector<float> d(kvh * 2 * hd);
    for (float& v : d) v = normal(rng);
    digests.push_back(std::move(d));
  }
  auto grown = gpu_->ScoreRecallBlocks(kv, 0, q.data(), n, w, digests);
  ASSERT_TRUE(grown.ok()) << grown.status();
  EXPECT_EQ(*grown, host());
  // Fewer blocks than were synced (not this cache's history): everything is uploaded again.
  digests.resize(3);
  for (float& v : digests[0]) v = normal(rng);
  auto shorter = gpu_->ScoreRecallBlocks(kv, 0, q.data(), n, w, digests);
  ASSERT_TRUE(shorter.ok()) << shorter.status();
  EXPECT_EQ(*shorter, host());
  EXPECT_EQ(cpu_->ScoreRecallBlocks(kv, 0, q.data(), n, w, digests).status().code(),
            absl::StatusCode::kUnimplemented);
}

RandomModelSpec Spec(std::function<void(RandomModelSpec&)> edit) {
  RandomModelSpec s;
  s.hidden = 64;
  s.intermediate = 96;
  s.heads = 4;
  s.kv_heads = 2;
  s.head_dim = 16;
  s.vocab = 96;
  edit(s);
  return s;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaParityTest,
    ::testing::Values(
        Case{"GqaF32", Spec([](RandomModelSpec&) {}), DeviceDtype::kF32},
        Case{"GqaBf16", Spec([](RandomModelSpec& s) { s.dtype = DType::kBF16; }),
             DeviceDtype::kBF16},
        Case{"GqaF16", Spec([](RandomModelSpec& s) { s.dtype = DType::kF16; }), DeviceDtype::kF16},
        Case{"MultiQueryF32", Spec([](RandomModelSpec& s) {
               s.kv_heads = 1;
               s.layers = 3;
             }),
             DeviceDtype::kF32},
        Case{"BiasesTiedF32", Spec([](RandomModelSpec& s) {
               s.attention_bias = s.mlp_bias = s.tie_embeddings = true;
               s.head_dim = 32;
             }),
             DeviceDtype::kF32},
        Case{"Llama3RopeBf16", Spec([](RandomModelSpec& s) {
               s.dtype = DType::kBF16;
               s.rope_theta = 500000.0;
               s.rope_scaling = {{"rope_type", "llama3"},
                                 {"factor", 8.0},
                                 {"low_freq_factor", 1.0},
                                 {"high_freq_factor", 4.0},
                                 {"original_max_position_embeddings", 16}};
             }),
             DeviceDtype::kBF16},
        Case{"SlidingWindowF32", Spec([](RandomModelSpec& s) { s.sliding_window = 7; }),
             DeviceDtype::kF32},
        Case{"HeadDim128Bf16", Spec([](RandomModelSpec& s) {
               s.dtype = DType::kBF16;
               s.head_dim = 128;
               s.heads = 8;
               s.kv_heads = 2;
               s.hidden = 256;
             }),
             DeviceDtype::kBF16}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// A multi-token pass's rows leave through a ring of pinned slots, one layer per slot: with two
// slots for five layers every slot is reused, and the host must still get every row, query and
// logit exactly as with a slot per layer.
TEST(CudaBackendTest, DownloadRingReusingItsSlotsLosesNothing) {
  SKIP_WITHOUT_CUDA();
  TempDir dir;
  RandomModelSpec spec;
  spec.layers = 5;
  spec.dtype = DType::kBF16;
  testing::WriteRandomModel(dir.path(), spec);
  auto model = Model::Load(dir.path(), {.require_tokenizer = false});
  ASSERT_TRUE(model.ok()) << model.status();
  auto roomy = CreateCudaBackend(**model, {});
  auto tight = CreateCudaBackend(**model, {.download_staging_bytes = 1});
  ASSERT_TRUE(roomy.ok()) << roomy.status();
  ASSERT_TRUE(tight.ok()) << tight.status();
  const ModelConfig& c = (*model)->config();
  const auto tokens = RandomTokens(37, c.vocab_size, 21);
  auto run = [&](Backend& backend, ForwardResult* result) {
    KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim);
    EXPECT_TRUE(
        backend.Forward(tokens, 0, &kv, {.all_logits = true, .observe_last = 6}, result).ok());
    return kv;
  };
  ForwardResult want, got;
  const KvCache want_kv = run(**roomy, &want), got_kv = run(**tight, &got);
  EXPECT_EQ(got.logits, want.logits);
  EXPECT_EQ(got.observed_queries, want.observed_queries);
  for (int l = 0; l < c.num_layers; ++l) {
    for (int g = 0; g < c.num_kv_heads; ++g) {
      EXPECT_EQ(got_kv.head(l, g).positions, want_kv.head(l, g).positions) << l << "/" << g;
      EXPECT_EQ(got_kv.head(l, g).keys, want_kv.head(l, g).keys) << l << "/" << g;
      EXPECT_EQ(got_kv.head(l, g).values, want_kv.head(l, g).values) << l << "/" << g;
    }
  }
}

TEST(CudaBackendTest, RejectsBadTokensAndPositionsLikeTheCpu) {
  SKIP_WITHOUT_CUDA();
  TempDir dir;
  testing::WriteRandomModel(dir.path(), RandomModelSpec{});
  auto model = Model::Load(dir.path(), {.require_tokenizer = false});
  ASSERT_TRUE(model.ok()) << model.status();
  auto gpu = CreateCudaBackend(**model, {.dtype = DeviceDtype::kF32});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const ModelConfig& c = (*model)->config();
  KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim);
  ForwardResult r;
  std::vector<int32_t> bad = {1, c.vocab_size};
  EXPECT_EQ((*gpu)->Forward(bad, 0, &kv, {}, &r).code(), absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> ok = {1, 2};
  ASSERT_TRUE((*gpu)->Forward(ok, 0, &kv, {}, &r).ok());
  EXPECT_EQ((*gpu)->Forward(ok, 1, &kv, {}, &r).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.head(0, 0).size(), 2);
}

TEST(CudaBackendTest, RejectsBadOptions) {
  SKIP_WITHOUT_CUDA();
  TempDir dir;
  testing::WriteRandomModel(dir.path(), RandomModelSpec{});
  auto model = Model::Load(dir.path(), {.require_tokenizer = false});
  ASSERT_TRUE(model.ok()) << model.status();
  for (const CudaBackendOptions& bad :
       {CudaBackendOptions{.graph_bucket = 0}, CudaBackendOptions{.decode_split = -1},
        CudaBackendOptions{.pinned_block_bytes = -1}}) {
    auto backend = CreateCudaBackend(**model, bad);
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kInvalidArgument) << backend.status();
  }
}

class GraphedDecodeTest : public ::testing::TestWithParam<int> {};  // sliding window or 0

TEST_P(GraphedDecodeTest, StepsMatchOpByOpStepsAcrossBuckets) {
  SKIP_WITHOUT_CUDA();
  TempDir dir;
  RandomModelSpec spec;
  spec.vocab = 128;
  spec.sliding_window = GetParam();  // a window's mask reads the step's position in the graph
  testing::WriteRandomModel(dir.path(), spec);
  auto model = Model::Load(dir.path(), {.require_tokenizer = false});
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  // 64-entry buckets: the steps below cross a bucket boundary (a second graph) after a short
  // prompt, which keeps the case quick on the CUDA emulator as well.
  const int kBucket = 64;
  auto graphed = CreateCudaBackend(**model, {.dtype = DeviceDtype::kF32,
                                             .cuda_graphs = true,
                                             .graph_bucket = kBucket,
                                             .profile_ops = true});
  auto eager = CreateCudaBackend(**model, {.dtype = DeviceDtype::kF32, .cuda_graphs = false});
  ASSERT_TRUE(graphed.ok() && eager.ok());
  // Steps on both sides of the first bucket boundary.
  const int prompt = kBucket - 6;
  auto tokens = RandomTokens(prompt + 12, c.vocab_size, 17);
  KvCache a(c.num_layers, c.num_kv_heads, c.head_dim), b = a;
  ForwardResult ra, rb;
  ASSERT_TRUE(
      (*graphed)->Forward(absl::MakeConstSpan(tokens).subspan(0, prompt), 0, &a, {}, &ra).ok());
  ASSERT_TRUE(
      (*eager)->Forward(absl::MakeConstSpan(tokens).subspan(0, prompt), 0, &b, {}, &rb).ok());
  for (int t = prompt; t < prompt + 12; ++t) {
    auto one = absl::MakeConstSpan(tokens).subspan(t, 1);
    ASSERT_TRUE((*graphed)->Forward(one, t, &a, {.observe_last = 1}, &ra).ok()) << t;
    ASSERT_TRUE((*eager)->Forward(one, t, &b, {.observe_last = 1}, &rb).ok()) << t;
    EXPECT_LT(RelativeL2(ra.logits, rb.logits), 1e-6) << "step at " << t;
    EXPECT_LT(RelativeL2(ra.observed_queries[0], rb.observed_queries[0]), 1e-6) << t;
    EXPECT_EQ(a.head(1, 1).positions.back(), t);
  }
  EXPECT_LT(RelativeL2(a.head(1, 0).keys, b.head(1, 0).keys), 1e-6);
  // Every step but the first (which loads the kernels op by op) replayed a graph.
  int64_t graphed_steps = 0;
  for (const CudaOpTime& op : TakeCudaOpProfile(**graphed)) {
    if (op.op == "decode step (graph)") graphed_steps += op.count;
  }
  EXPECT_EQ(graphed_steps, 11);
}

INSTANTIATE_TEST_SUITE_P(Windows, GraphedDecodeTest, ::testing::Values(0, 20),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return info.param == 0 ? std::string("Full")
                                                  : absl::StrCat("SlidingWindow", info.param);
                         });

// Whole sessions on stories260K: the f32 GPU backend gives the CPU's tokens.
class CudaSessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_CUDA();
    // A GPU machine has the test models in gpu-pack/ (scripts/gpu-check.sh points here).
    const char* dir = std::getenv("KVMEM_TEST_MODEL_DIR");
    auto model = Model::Load(dir != nullptr ? dir : KVMEM_TEST_MODEL_DIR);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    cpu_ = std::make_unique<CpuBackend>(*model_, CpuBackendOptions{.threads = 2});
    auto gpu = CreateCudaBackend(*model_, {.dtype = DeviceDtype::kF32});
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = std::move(*gpu);
  }

  // Turns appended and generations kept, on one backend; returns every generated text.
  std::vector<std::string> Run(Backend& backend, const SessionOptions& options) {
    auto s = Session::Create(*model_, backend, options);
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return {};
    std::vector<std::string> texts;
    const char* turns[] = {"Once upon a time there was a little dog named Max.",
                           "Max liked to run in the park with his friend Sue.",
                           "One day it started to rain and Max was sad.",
                           "Sue gave Max a big red ball to play with."};
    for (const char* t : turns) {
      auto a = (*s)->AppendTurn(Role::kUser, t);
      EXPECT_TRUE(a.ok()) << a.status();
      auto g = (*s)->Generate({.sampling = {.max_tokens = 24}}, nullptr);
      EXPECT_TRUE(g.ok()) << g.status();
      if (g.ok()) texts.push_back(g->generation.text);
      // On the GPU the host keeps positions only, unless asked to keep the rows as well.
      const bool host_rows = !backend.KeepsHotRows() || options.host_hot_rows;
      EXPECT_EQ((*s)->hot().host_rows(), host_rows);
      if (!host_rows) {
        EXPECT_EQ((*s)->hot().Bytes(), 0) << "fresh rows outlived the commit";
      }
    }
    return texts;
  }

  // Two lives of a durable store: the second restores the session (positions only; its first
  // pass reads the hot rows back from the blocks and uploads them), recalls from the store and
  // keeps generating. Returns the four generated texts.
  std::vector<std::string> RestartedTexts(Backend& backend, bool host_hot_rows = false) {
    TempDir dir;
    SessionManagerOptions o;
    o.data_dir = dir.path();
    o.sync = false;
    o.session_defaults.memory = {.policy = "snapkv", .budget = 24, .window = 8, .kernel = 3};
    o.session_defaults.block_size = 8;
    o.session_defaults.recall_blocks = 2;
    o.session_defaults.host_hot_rows = host_hot_rows;
    std::vector<std::string> texts;
    const char* turns[] = {"The cat sat on the mat.", "A bird sang in the tree.",
                           "The cat looked up at the bird.", "Then it began to rain."};
    for (int life = 0; life < 2; ++life) {
      auto m = SessionManager::Open(*model_, backend, o);
      EXPECT_TRUE(m.ok()) << m.status();
      if (!m.ok()) return texts;
      if (life == 0) {
        EXPECT_TRUE((*m)->CreateSession({.session_id = "s"}).ok());
      }
      for (int t = 0; t < 2; ++t) {
        EXPECT_TRUE((*m)->AppendTurn({.session_id = "s", .content = turns[life * 2 + t]}).ok());
        auto g = (*m)->Generate({.session_id = "s", .options = {.sampling = {.max_tokens = 16}}},
                                nullptr);
        EXPECT_TRUE(g.ok()) << g.status();
        if (g.ok()) texts.push_back(g->generation.text);
      }
    }
    return texts;
  }

  std::unique_ptr<Model> model_;
  std::unique_ptr<CpuBackend> cpu_;
  std::unique_ptr<Backend> gpu_;
};

TEST_F(CudaSessionTest, HotBytesCountTheDeviceRows) {
  auto bf16 = CreateCudaBackend(*model_, {.dtype = DeviceDtype::kBF16});
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  auto s = Session::Create(*model_, **bf16, {.memory = {.policy = "full"}});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->AppendTurn(Role::kUser, "A little fox ran home.").ok());
  const SessionStats stats = (*s)->Stats();
  const int hd = model_->config().head_dim;
  EXPECT_GT(stats.hot_tokens, 0);
  EXPECT_EQ(stats.hot_bytes, stats.hot_tokens * (2 * hd * 2 + 8));  // bf16 K and V, int64 position
}

TEST_F(CudaSessionTest, Bf16RowsReachTheBlocksAlikeWithAndWithoutAHostCopy) {
  // A bf16 device hands its new rows over as bf16 fresh rows: copied from the device straight
  // into them in a prefill, staged through pinned memory in a graphed decode step. With
  // host_hot_rows the same rows reach the blocks through the host's f32 copy instead. The
  // texts and every stored row must agree bit for bit.
  auto bf16 = CreateCudaBackend(*model_, {.dtype = DeviceDtype::kBF16});
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  SessionOptions options{.memory = {.policy = "full"}, .recall_blocks = 0};
  auto a = Session::Create(*model_, **bf16, options);
  options.host_hot_rows = true;
  auto b = Session::Create(*model_, **bf16, options);
  ASSERT_TRUE(a.ok() && b.ok());
  for (const char* t : {"Once upon a time there was a little dog named Max.",
                        "Max liked to run in the park with his friend Sue."}) {
    ASSERT_TRUE((*a)->AppendTurn(Role::kUser, t).ok());
    ASSERT_TRUE((*b)->AppendTurn(Role::kUser, t).ok());
    auto ga = (*a)->Generate({.sampling = {.max_tokens = 24}}, nullptr);
    auto gb = (*b)->Generate({.sampling = {.max_tokens = 24}}, nullptr);
    ASSERT_TRUE(ga.ok() && gb.ok());
    EXPECT_EQ(ga->generation.text, gb->generation.text);
  }
  EXPECT_FALSE((*a)->hot().host_rows());
  EXPECT_TRUE((*b)->hot().host_rows());
  ASSERT_EQ((*a)->position(), (*b)->position());
  const ModelConfig& c = model_->config();
  std::vector<float> ka(c.head_dim), va(c.head_dim), kb(c.head_dim), vb(c.head_dim);
  int64_t differ = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int64_t p = 0; p < (*a)->position(); ++p) {
      for (int g = 0; g < c.num_kv_heads; ++g) {
        ASSERT_TRUE((*a)->ReadPosition(l, p, g, ka.data(), va.data()).ok());
        ASSERT_TRUE((*b)->ReadPosition(l, p, g, kb.data(), vb.data()).ok());
        differ += ka != kb || va != vb;
      }
    }
  }
  EXPECT_EQ(differ, 0);
}

TEST_F(CudaSessionTest, GreedyTextEqualsTheCpuInF32) {
  const SessionOptions options{.memory = {.policy = "full"}, .recall_blocks = 0};
  const std::vector<std::string> want = Run(*cpu_, options);
  ASSERT_EQ(want.size(), 4u);
  EXPECT_FALSE(want[0].empty());
  EXPECT_EQ(Run(*gpu_, options), want);
}

TEST_F(CudaSessionTest, SnapKvSessionWithRecallGivesTheSameTokens) {
  SessionOptions options;
  options.memory = {.policy = "snapkv", .budget = 24, .window = 8, .kernel = 3};
  options.block_size = 8;
  options.recall_blocks = 2;
  const std::vector<std::string> want = Run(*cpu_, options);
  ASSERT_EQ(want.size(), 4u);
  const int64_t kept_reads = GetCudaUploadStats(*gpu_).snapkv_queries_kept;
  EXPECT_EQ(Run(*gpu_, options), want);
  // Every turn's selection read the queries its prefill kept on the device.
  EXPECT_GE(GetCudaUploadStats(*gpu_).snapkv_queries_kept - kept_reads, 4);
  options.host_hot_rows = true;  // the same with an f32 host copy of the hot rows
  EXPECT_EQ(Run(*gpu_, options), want);
}

TEST_F(CudaSessionTest, DurableSessionRestartedOnTheGpuContinuesLikeTheCpu) {
  const std::vector<std::string> want = RestartedTexts(*cpu_);
  ASSERT_EQ(want.size(), 4u);
  EXPECT_EQ(RestartedTexts(*gpu_), want);
}

// With the pinned block pool (CudaBackendOptions::pinned_block_bytes), the blocks a session
// makes and reads live in pinned slabs, and the restarted session's page-in and its recalls
// read their rows there by address, over the bus. The pool here is small (two 32 KiB slabs:
// some of the tiny model's blocks fit, the rest stay on the heap), so uploads mix rows read by
// address with rows packed on the host, in partial chunks. The pool is process-wide: cases that
// run after this one in the same process keep it.
TEST_F(CudaSessionTest, RowsReadByAddressFromPinnedBlocksGiveTheSameTokens) {
  const std::vector<std::string> want = RestartedTexts(*cpu_);
  auto f32 =
      CreateCudaBackend(*model_, {.dtype = DeviceDtype::kF32, .pinned_block_bytes = 64 << 10});
  ASSERT_TRUE(f32.ok()) << f32.status();
  EXPECT_EQ(RestartedTexts(**f32), want);
  EXPECT_GT(GetCudaUploadStats(**f32).rows_by_address, 0);
  EXPECT_GT(GetCudaUploadStats(**f32).rows_packed, 0);
  // A bf16 device reads its own rows back bit for bit: the same texts as when every upload
  // packs the rows from an f32 host copy. The f32 blocks' slabs stay carved for their size, so
  // the pool's limit is raised to make room for slabs of bf16 blocks.
  auto bf16 =
      CreateCudaBackend(*model_, {.dtype = DeviceDtype::kBF16, .pinned_block_bytes = 128 << 10});
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  const std::vector<std::string> packed = RestartedTexts(**bf16, /*host_hot_rows=*/true);
  const int64_t by_address = GetCudaUploadStats(**bf16).rows_by_address;
  EXPECT_EQ(RestartedTexts(**bf16), packed);
  EXPECT_GT(GetCudaUploadStats(**bf16).rows_by_address, by_address);
  EXPECT_GT(GetPinnedBlockPoolStats().pinned_bytes, 0);
}

// Staging slots of 8 rows (CudaBackendOptions::upload_staging_bytes): the restarted session's
// page-in and its recalls go up in many chunks that reuse both slots in turn, so the host must
// wait for a slot's previous copy before packing into it again, and the copy stream for the
// slot's previous scatter before overwriting its device half. Run with
// KVMEM_CUDA_EMULATOR_STREAMS=deferred (ctest's emu-deferred.*), a missing wait shows here.
TEST_F(CudaSessionTest, UploadsThroughSmallStagingSlotsGiveTheSameTokens) {
  const std::vector<std::string> want = RestartedTexts(*cpu_);
  auto small = CreateCudaBackend(*model_, {.dtype = DeviceDtype::kF32, .upload_staging_bytes = 1});
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ(RestartedTexts(**small), want);
  EXPECT_GT(GetCudaUploadStats(**small).rows_packed, 4 * 8);  // more than two rounds of slots
  // The same with rows read by address from pinned blocks mixed into the chunks.
  auto pinned = CreateCudaBackend(*model_, {.dtype = DeviceDtype::kF32,
                                            .upload_staging_bytes = 1,
                                            .pinned_block_bytes = 64 << 10});
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_EQ(RestartedTexts(**pinned), want);
  EXPECT_GT(GetCudaUploadStats(**pinned).rows_by_address, 0);
}

}  // namespace
}  // namespace kvmem
