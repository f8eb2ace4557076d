// Parity of the attention, SnapKV, digest and KV gather kernels with the CPU reference on fresh
// random inputs: attention against a double-precision reference written here (same semantics
// as CpuBackend::Attend), SnapKV against SelectSnapKv / SnapKvScores (engine/snapkv.h), digests
// against ComputeDigest / DigestScore (engine/kv_store.h). Output buffers are poisoned with NaN
// before each launch, so an element a kernel fails to write fails the comparison.
// Skips without a CUDA device.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "engine/kv_blocks.h"
#include "engine/kv_cache.h"
#include "engine/kv_store.h"
#include "engine/safetensors.h"
#include "engine/snapkv.h"
#include "gtest/gtest.h"
#include "kernels/cuda_check.cuh"
#include "kernels/decode_attention.cuh"
#include "kernels/digest.cuh"
#include "kernels/kv_gather.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/ragged_kv.cuh"
#include "kernels/snapkv.cuh"
#include "tests/cuda_test_util.h"

namespace kvmem {
namespace {

using testing::CountNan;
using testing::DeviceArray;
using testing::RandomNormal;
using testing::RelativeError;

// Rounds to bf16 and back, so a CPU reference sees exactly what a bf16 kernel reads.
std::vector<float> RoundToBf16(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = BFloat16ToFloat(FloatToBFloat16(v[i]));
  return out;
}

template <typename T>
std::vector<T> Convert(const std::vector<float>& v);
template <>
std::vector<float> Convert<float>(const std::vector<float>& v) {
  return v;
}
template <>
std::vector<__nv_bfloat16> Convert<__nv_bfloat16>(const std::vector<float>& v) {
  std::vector<__nv_bfloat16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    __nv_bfloat16_raw raw;
    raw.x = FloatToBFloat16(v[i]);
    out[i] = raw;
  }
  return out;
}

std::vector<float> ToFloat(const std::vector<float>& v) { return v; }
std::vector<float> ToFloat(const std::vector<__nv_bfloat16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = BFloat16ToFloat(static_cast<__nv_bfloat16_raw>(v[i]).x);
  }
  return out;
}

template <typename T>
constexpr bool kIsBf16 = std::is_same_v<T, __nv_bfloat16>;

// Random ragged KV for one layer: head g has lengths[g] entries whose last position is
// `last_position`, earlier ones spaced 1 + g % 3 apart (so heads disagree on positions, as a
// SnapKV-compressed cache does). Keys and values are already rounded to T.
template <typename T>
std::vector<HeadKv> RandomHeads(const std::vector<int>& lengths, int head_dim,
                                int64_t last_position, uint32_t seed) {
  std::vector<HeadKv> heads(lengths.size());
  for (size_t g = 0; g < lengths.size(); ++g) {
    const int n = lengths[g];
    std::vector<float> k = RandomNormal(static_cast<size_t>(n) * head_dim, seed + 2 * g);
    std::vector<float> v = RandomNormal(static_cast<size_t>(n) * head_dim, seed + 2 * g + 1);
    if (kIsBf16<T>) {
      k = RoundToBf16(k);
      v = RoundToBf16(v);
    }
    const int64_t step = 1 + static_cast<int64_t>(g % 3);
    for (int j = 0; j < n; ++j) {
      heads[g].Append(last_position - (n - 1 - j) * step, &k[static_cast<size_t>(j) * head_dim],
                      &v[static_cast<size_t>(j) * head_dim], head_dim);
    }
  }
  return heads;
}

// The device copy of a layer's ragged KV and the RaggedKv view of it.
template <typename T>
class DeviceKv {
 public:
  DeviceKv(const std::vector<HeadKv>& heads, int head_dim) {
    std::vector<const T*> k_ptrs, v_ptrs;
    std::vector<const int64_t*> p_ptrs;
    std::vector<int32_t> lengths;
    int32_t max_length = 0;
    for (const HeadKv& h : heads) {
      keys_.push_back(std::make_unique<DeviceArray<T>>(Convert<T>(h.keys)));
      values_.push_back(std::make_unique<DeviceArray<T>>(Convert<T>(h.values)));
      positions_.push_back(std::make_unique<DeviceArray<int64_t>>(h.positions));
      k_ptrs.push_back(keys_.back()->get());
      v_ptrs.push_back(values_.back()->get());
      p_ptrs.push_back(positions_.back()->get());
      lengths.push_back(static_cast<int32_t>(h.size()));
      max_length = std::max(max_length, lengths.back());
    }
    k_ptrs_ = std::make_unique<DeviceArray<const T*>>(k_ptrs);
    v_ptrs_ = std::make_unique<DeviceArray<const T*>>(v_ptrs);
    p_ptrs_ = std::make_unique<DeviceArray<const int64_t*>>(p_ptrs);
    lengths_ = std::make_unique<DeviceArray<int32_t>>(lengths);
    view_.keys = k_ptrs_->get();
    view_.values = v_ptrs_->get();
    view_.positions = p_ptrs_->get();
    view_.lengths = lengths_->get();
    view_.num_kv_heads = static_cast<int>(heads.size());
    view_.head_dim = head_dim;
    view_.max_length = max_length;
  }
  const RaggedKv<T>& view() const { return view_; }

 private:
  std::vector<std::unique_ptr<DeviceArray<T>>> keys_, values_;
  std::vector<std::unique_ptr<DeviceArray<int64_t>>> positions_;
  std::unique_ptr<DeviceArray<const T*>> k_ptrs_, v_ptrs_;
  std::unique_ptr<DeviceArray<const int64_t*>> p_ptrs_;
  std::unique_ptr<DeviceArray<int32_t>> lengths_;
  RaggedKv<T> view_;
};

// softmax_j(scale q . k_j) v_j in double over entries [0, last] of `head` that are within
// `window` of q_position (all when window <= 0), into out (head_dim); zeros when none is.
void ReferenceAttend(const HeadKv& head, int head_dim, const float* q, int64_t last,
                     int64_t q_position, int window, double* out) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  std::vector<double> logits;
  std::vector<int64_t> used;
  double big = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j <= last; ++j) {
    if (window > 0 && q_position - head.positions[j] >= window) continue;
    double dot = 0;
    for (int d = 0; d < head_dim; ++d)
      dot += static_cast<double>(q[d]) * head.keys[j * head_dim + d];
    logits.push_back(dot * scale);
    used.push_back(j);
    big = std::max(big, logits.back());
  }
  std::fill(out, out + head_dim, 0.0);
  double denom = 0;
  for (double& l : logits) denom += (l = std::exp(l - big));
  for (size_t u = 0; u < used.size(); ++u) {
    const float* v = &head.values[used[u] * head_dim];
    for (int d = 0; d < head_dim; ++d) out[d] += logits[u] / denom * v[d];
  }
}

// Waits for the default stream (every launch here uses it) and fails the test on a launch or
// execution error.
void Finish(cudaError_t launch) {
  ASSERT_EQ(launch, cudaSuccess) << KVMEM_CUDA_ERROR_MESSAGE(launch, launch);
  const cudaError_t err = cudaStreamSynchronize(nullptr);
  ASSERT_EQ(err, cudaSuccess) << KVMEM_CUDA_ERROR_MESSAGE(err, cudaStreamSynchronize);
}

class KernelsAttentionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!CudaDeviceAvailable(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  }
};

// ---------------------------------------------------------------------------------------------
// Decode attention

// The scratch query is host code: it runs without a device. It agrees with the launcher
// (nothing for a call it rejects) and does not wrap for a launch bound near INT32_MAX.
TEST(DecodeAttentionWorkspaceTest, IsZeroForRejectedCallsAndCountsLongBoundsIn64Bits) {
  // 8 heads of 128 over 4096 entries in splits of 256: 16 splits of 128 outputs + max + sum.
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(8, 128, 4096, 256), size_t{8} * 16 * 130 * 4);
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(8, 128, 256, 256), 0u);  // one split: no combine
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(0, 128, 4096, 256), 0u);
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(8, 0, 4096, 256), 0u);
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(8, 512, 4096, 256), 0u);
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(8, 128, -1, 256), 0u);
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(8, 128, 4096, -1), 0u);
  const int32_t most = std::numeric_limits<int32_t>::max();
  const size_t splits = (size_t{static_cast<uint32_t>(most)} + 255) / 256;
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(1, 4, most, 0), splits * 6 * 4);
}

struct DecodeCase {
  int num_heads, num_kv_heads, head_dim;
  std::vector<int> lengths;  // per KV head
  int split_size;            // 0: the default
  int sliding_window;        // 0: off
  int max_length = 0;        // the launch's bound on lengths; 0: the longest head's
};

std::vector<DecodeCase> DecodeCases() {
  return {
      {4, 4, 64, {0, 1, 37, 300}, 0, 0},                                // MHA, empty head
      {8, 2, 128, {1, 1000}, 0, 0},                                     // group 4, 4 splits
      {8, 2, 128, {1000, 999}, 16, 0},                                  // 63 splits
      {32, 8, 128, {16384, 9000, 1, 0, 4097, 2048, 333, 12000}, 0, 0},  // 8B shape, long
      {12, 1, 64, {5000}, 0, 0},                                        // group 12 > 8
      {8, 4, 8, {3, 0, 17, 100}, 0, 0},                                 // stories260K dims
      {8, 2, 64, {700, 1500}, 64, 256},                                 // sliding window
      {6, 3, 96, {1, 257, 255}, 0, 0},                                  // head_dim not 2^k
      // Shapes the layouts and head groupings choose differently for.
      {6, 2, 100, {500, 37}, 0, 0},  // group 3; bf16 rows not a multiple of 16 bytes
      {10, 2, 130, {300, 1}, 0, 0},  // group 5; f32 rows not a multiple of 16 bytes
      {16, 1, 256, {1200}, 0, 0},    // group 16, head_dim 256
      {7, 1, 64, {257}, 0, 0},       // group 7
      // A bound far past every head, as a captured graph launches: most splits are empty.
      {8, 4, 128, {0, 1, 256, 257}, 0, 0, 4096},
  };
}

template <typename T>
void CheckDecode(double tolerance) {
  uint32_t seed = 100;
  for (const DecodeCase& c : DecodeCases()) {
    SCOPED_TRACE(::testing::Message()
                 << "heads=" << c.num_heads << "/" << c.num_kv_heads << " head_dim=" << c.head_dim
                 << " split=" << c.split_size << " window=" << c.sliding_window);
    const int64_t q_position = 100000;
    const std::vector<HeadKv> heads = RandomHeads<T>(c.lengths, c.head_dim, q_position, seed);
    std::vector<float> q = RandomNormal(static_cast<size_t>(c.num_heads) * c.head_dim, seed + 99);
    if (kIsBf16<T>) q = RoundToBf16(q);
    seed += 1000;

    const int group = c.num_heads / c.num_kv_heads;
    std::vector<double> want(q.size());
    for (int h = 0; h < c.num_heads; ++h) {
      const HeadKv& head = heads[h / group];
      ReferenceAttend(head, c.head_dim, &q[static_cast<size_t>(h) * c.head_dim], head.size() - 1,
                      q_position, c.sliding_window, &want[static_cast<size_t>(h) * c.head_dim]);
    }

    DeviceKv<T> kv(heads, c.head_dim);
    DeviceArray<T> d_q(Convert<T>(q)), d_out(q.size());
    DecodeAttentionParams<T> p;
    p.q = d_q.get();
    p.kv = kv.view();
    p.num_heads = c.num_heads;
    p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    p.sliding_window = c.sliding_window;
    p.q_position = q_position;
    p.split_size = c.split_size;
    p.out = d_out.get();
    if (c.max_length > 0) p.kv.max_length = c.max_length;
    const size_t ws_bytes =
        DecodeAttentionWorkspaceBytes(c.num_heads, c.head_dim, p.kv.max_length, c.split_size);
    DeviceArray<char> ws(ws_bytes);
    Finish(LaunchDecodeAttention(p, ws.get(), ws_bytes, nullptr));
    const std::vector<float> got = ToFloat(d_out.ToHost());
    EXPECT_EQ(CountNan(got), 0);
    EXPECT_LT(RelativeError(got, want), tolerance);
    // The position read from device memory (as a captured graph does) wins over the argument.
    DeviceArray<int64_t> d_position(std::vector<int64_t>{q_position});
    DecodeAttentionParams<T> from_device = p;
    from_device.q_position = c.sliding_window > 0 ? q_position - c.sliding_window : 0;
    from_device.q_position_device = d_position.get();
    DeviceArray<T> d_out2(q.size());
    from_device.out = d_out2.get();
    Finish(LaunchDecodeAttention(from_device, ws.get(), ws_bytes, nullptr));
    EXPECT_EQ(ToFloat(d_out2.ToHost()), got);
    // A head without entries attends to nothing: exact zeros.
    for (int h = 0; h < c.num_heads; ++h) {
      if (heads[h / group].size() != 0) continue;
      for (int d = 0; d < c.head_dim; ++d) EXPECT_EQ(got[h * c.head_dim + d], 0.f) << h;
    }
  }
}

TEST_F(KernelsAttentionTest, DecodeAttentionF32MatchesReference) { CheckDecode<float>(1e-5); }

TEST_F(KernelsAttentionTest, DecodeAttentionBf16MatchesReference) {
  CheckDecode<__nv_bfloat16>(1e-2);
}

TEST_F(KernelsAttentionTest, DecodeAttentionSplitCountDoesNotChangeResult) {
  const std::vector<HeadKv> heads = RandomHeads<float>({3000, 2500}, 64, 5000, 7);
  const std::vector<float> q = RandomNormal(4 * 64, 8);
  DeviceKv<float> kv(heads, 64);
  DeviceArray<float> d_q(q);
  std::vector<std::vector<float>> outs;
  for (int split : {3000, 1000, 256, 33}) {
    DecodeAttentionParams<float> p;
    p.q = d_q.get();
    p.kv = kv.view();
    p.num_heads = 4;
    p.scale = 0.125f;
    p.split_size = split;
    DeviceArray<float> d_out(q.size());
    p.out = d_out.get();
    const size_t bytes = DecodeAttentionWorkspaceBytes(4, 64, kv.view().max_length, split);
    DeviceArray<char> ws(bytes);
    Finish(LaunchDecodeAttention(p, ws.get(), bytes, nullptr));
    outs.push_back(d_out.ToHost());
  }
  std::vector<double> first(outs[0].begin(), outs[0].end());
  for (size_t i = 1; i < outs.size(); ++i) EXPECT_LT(RelativeError(outs[i], first), 1e-5) << i;
}

TEST_F(KernelsAttentionTest, DecodeAttentionRejectsBadShapes) {
  DecodeAttentionParams<float> p;
  p.kv.num_kv_heads = 2;
  p.num_heads = 3;  // not a multiple
  p.kv.head_dim = 64;
  EXPECT_EQ(LaunchDecodeAttention(p, nullptr, 0, nullptr), cudaErrorInvalidValue);
  p.num_heads = 4;
  p.kv.head_dim = 300;  // above 256
  EXPECT_EQ(LaunchDecodeAttention(p, nullptr, 0, nullptr), cudaErrorInvalidValue);
  p.kv.head_dim = 64;
  p.kv.max_length = 10000;  // needs a workspace
  EXPECT_EQ(LaunchDecodeAttention(p, nullptr, 0, nullptr), cudaErrorInvalidValue);
}

// ---------------------------------------------------------------------------------------------
// Prefill attention

struct PrefillCase {
  int num_heads, num_kv_heads, head_dim;
  int64_t n;                // new tokens
  std::vector<int> prefix;  // entries before the new tokens, per KV head
  int sliding_window;       // 0: off
};

std::vector<PrefillCase> PrefillCases() {
  return {
      {4, 4, 64, 1, {0, 5, 1, 40}, 0},                            // one token, empty prefix
      {8, 2, 128, 37, {0, 100}, 0},                               // group 4
      {32, 8, 128, 100, {0, 1, 1000, 64, 31, 33, 500, 2000}, 0},  // 8B shape, ragged
      {12, 2, 64, 50, {300, 17}, 0},                              // group 6: rows straddle blocks
      {8, 4, 8, 20, {3, 0, 10, 50}, 0},                           // stories260K dims
      {8, 2, 64, 64, {500, 200}, 128},                            // sliding window
      {4, 2, 256, 9, {70, 3}, 0},                                 // head_dim 256: > 48 KiB smem
      // Few rows onto long heads: the tensor-core kernel splits the entries across blocks.
      {32, 8, 128, 24, {9000, 16000, 1, 0, 4097, 2048, 333, 12000}, 0},
      {8, 2, 64, 3, {5000, 70}, 0},
      {4, 1, 32, 5, {3000}, 0},
      {8, 8, 16, 2, {1500, 300, 0, 7, 64, 65, 63, 2000}, 0},
  };
}

template <typename T>
void CheckPrefill(double tolerance, bool tensor_cores = true) {
  uint32_t seed = 200;
  int split_cases = 0;
  for (const PrefillCase& c : PrefillCases()) {
    SCOPED_TRACE(::testing::Message()
                 << "heads=" << c.num_heads << "/" << c.num_kv_heads << " head_dim=" << c.head_dim
                 << " n=" << c.n << " window=" << c.sliding_window);
    const int64_t start = 50000;
    std::vector<int> lengths;
    for (int pre : c.prefix) lengths.push_back(pre + static_cast<int>(c.n));
    // New tokens at start .. start + n - 1: the last n entries are spaced 1 apart only for
    // head 0 (g % 3 == 0); other heads' spacing does not matter to causality, only to windows,
    // so rebuild their new entries at consecutive positions.
    std::vector<HeadKv> heads = RandomHeads<T>(lengths, c.head_dim, start + c.n - 1, seed);
    for (size_t g = 0; g < heads.size(); ++g) {
      const int64_t pre = c.prefix[g];
      for (int64_t t = 0; t < c.n; ++t) heads[g].positions[pre + t] = start + t;
      for (int64_t j = pre - 1; j >= 0; --j) {  // keep strictly increasing
        heads[g].positions[j] = heads[g].positions[j + 1] - 1 - static_cast<int64_t>(g % 3);
      }
    }
    const size_t row = static_cast<size_t>(c.num_heads) * c.head_dim;
    std::vector<float> q = RandomNormal(c.n * row, seed + 77);
    if (kIsBf16<T>) q = RoundToBf16(q);
    seed += 1000;

    const int group = c.num_heads / c.num_kv_heads;
    std::vector<double> want(q.size());
    for (int64_t t = 0; t < c.n; ++t) {
      for (int h = 0; h < c.num_heads; ++h) {
        const HeadKv& head = heads[h / group];
        ReferenceAttend(head, c.head_dim, &q[t * row + h * c.head_dim], head.size() - c.n + t,
                        start + t, c.sliding_window, &want[t * row + h * c.head_dim]);
      }
    }

    DeviceKv<T> kv(heads, c.head_dim);
    DeviceArray<T> d_q(Convert<T>(q)), d_out(q.size());
    PrefillAttentionParams<T> p;
    p.q = d_q.get();
    p.kv = kv.view();
    p.n = c.n;
    p.num_heads = c.num_heads;
    p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    p.sliding_window = c.sliding_window;
    p.start_position = start;
    p.out = d_out.get();
    p.tensor_cores = tensor_cores;
    Finish(LaunchPrefillAttention(p, nullptr));
    const std::vector<float> got = ToFloat(d_out.ToHost());
    EXPECT_EQ(CountNan(got), 0);
    EXPECT_LT(RelativeError(got, want), tolerance);
    // With scratch, long heads are split across blocks and combined: the same function.
    const size_t ws = PrefillAttentionWorkspaceBytes(p);
    if (ws > 0) {
      DeviceArray<uint8_t> workspace(ws);
      DeviceArray<T> d_split(q.size());  // poisoned: every element must be written
      p.out = d_split.get();
      p.workspace = workspace.get();
      p.workspace_bytes = ws;
      Finish(LaunchPrefillAttention(p, nullptr));
      const std::vector<float> split = ToFloat(d_split.ToHost());
      EXPECT_EQ(CountNan(split), 0) << "split";
      EXPECT_LT(RelativeError(split, want), tolerance) << "split";
      ++split_cases;
    }
  }
  if (kIsBf16<T> && tensor_cores) EXPECT_GE(split_cases, 4) << "cases that split their heads";
}

TEST_F(KernelsAttentionTest, PrefillAttentionF32MatchesReference) { CheckPrefill<float>(1e-5); }

// bf16 runs the tensor-core kernel where it applies (head_dim 64 and 128, no window) and the
// CUDA-core kernel elsewhere; the second test forces the CUDA-core kernel everywhere.
TEST_F(KernelsAttentionTest, PrefillAttentionBf16MatchesReference) {
  CheckPrefill<__nv_bfloat16>(1e-2);
}

TEST_F(KernelsAttentionTest, PrefillAttentionBf16OnCudaCoresMatchesReference) {
  CheckPrefill<__nv_bfloat16>(1e-2, /*tensor_cores=*/false);
}

// The scratch query agrees with the launcher: nothing for a call it rejects (no division by a
// zero head count), some for a short turn onto long heads.
TEST_F(KernelsAttentionTest, PrefillWorkspaceIsZeroForCallsTheLauncherRejects) {
  const std::vector<HeadKv> heads = RandomHeads<__nv_bfloat16>({5000, 4000}, 128, 6000, 11);
  DeviceKv<__nv_bfloat16> kv(heads, 128);
  PrefillAttentionParams<__nv_bfloat16> p;
  p.kv = kv.view();
  p.n = 4;
  p.num_heads = 8;
  p.scale = 0.1f;
  EXPECT_GT(PrefillAttentionWorkspaceBytes(p), 0u);
  p.num_heads = 0;
  EXPECT_EQ(PrefillAttentionWorkspaceBytes(p), 0u);
  EXPECT_EQ(LaunchPrefillAttention(p, nullptr), cudaErrorInvalidValue);
  p.num_heads = 8;
  p.kv.row_stride = 3;  // below head_dim
  EXPECT_EQ(PrefillAttentionWorkspaceBytes(p), 0u);
  EXPECT_EQ(LaunchPrefillAttention(p, nullptr), cudaErrorInvalidValue);
}

// f32 prefill attention of n new tokens (queries q, (n, num_heads, head_dim)) over `kv`, the
// first at start_position, with scale 1/8; returns the output.
std::vector<float> PrefillF32(const RaggedKv<float>& kv, const std::vector<float>& q, int64_t n,
                              int num_heads, int64_t start_position) {
  DeviceArray<float> d_q(q), d_out(q.size());
  PrefillAttentionParams<float> p;
  p.q = d_q.get();
  p.kv = kv;
  p.n = n;
  p.num_heads = num_heads;
  p.scale = 0.125f;
  p.start_position = start_position;
  p.out = d_out.get();
  Finish(LaunchPrefillAttention(p, nullptr));
  return d_out.ToHost();
}

// A NaN in one key (a numerical blow-up, damaged rows) must not hang the kernels: they branch
// on warp-wide maxima around warp-wide operations, and lanes that disagreed about a NaN would
// part there (a deadlock on the CUDA emulator, undefined on a GPU). Head 0's entry 5 holds the
// NaN, and every query of its group sees it. The other group's outputs must equal the
// reference; what the NaN group's come out as is left unspecified (the CPU's are NaN).
TEST_F(KernelsAttentionTest, AttentionOverANanKeyFinishesAndLeavesOtherHeadsRight) {
  const int hd = 64, n = 12, num_heads = 4, group = 2;
  std::vector<HeadKv> heads = RandomHeads<float>({40 + n, 30 + n}, hd, 1000, 310);
  for (int64_t t = 0; t < n; ++t) {  // the new tokens at consecutive positions in both heads
    for (HeadKv& h : heads) h.positions[h.size() - n + t] = 1000 - (n - 1) + t;
  }
  for (HeadKv& h : heads) {  // and the prefix strictly before them
    for (int64_t j = h.size() - n - 1; j >= 0; --j) h.positions[j] = h.positions[j + 1] - 1;
  }
  heads[0].keys[5 * hd + 3] = std::numeric_limits<float>::quiet_NaN();
  DeviceKv<float> kv(heads, hd);
  // The `rows` rows of `out` (the last of them the newest token) against the reference, for
  // the query heads of head 1's group.
  auto check = [&](const std::vector<float>& out, const std::vector<float>& q, int rows) {
    for (int t = 0; t < rows; ++t) {
      for (int h = group; h < num_heads; ++h) {
        const size_t at = (static_cast<size_t>(t) * num_heads + h) * hd;
        const float* o = &out[at];
        std::vector<double> want(hd);
        const HeadKv& head = heads[1];
        ReferenceAttend(head, hd, &q[at], head.size() - rows + t, 0, 0, want.data());
        for (int d = 0; d < hd; ++d) {
          EXPECT_NEAR(o[d], want[d], 1e-4) << "row " << t << " head " << h << " dim " << d;
        }
      }
    }
  };
  {
    const std::vector<float> q = RandomNormal(static_cast<size_t>(n) * num_heads * hd, 311);
    check(PrefillF32(kv.view(), q, n, num_heads, 1000 - (n - 1)), q, n);
  }
  {
    const std::vector<float> q = RandomNormal(static_cast<size_t>(num_heads) * hd, 312);
    DeviceArray<float> d_q(q), d_out(q.size());
    DecodeAttentionParams<float> p;
    p.q = d_q.get();
    p.kv = kv.view();
    p.num_heads = num_heads;
    p.scale = 0.125f;
    p.q_position = 1001;
    p.split_size = 16;
    p.out = d_out.get();
    const size_t ws_bytes =
        DecodeAttentionWorkspaceBytes(num_heads, hd, p.kv.max_length, p.split_size);
    DeviceArray<char> ws(ws_bytes);
    Finish(LaunchDecodeAttention(p, ws.get(), ws_bytes, nullptr));
    check(d_out.ToHost(), q, 1);
  }
}

TEST_F(KernelsAttentionTest, PrefillAttentionIsCausalOverNewTokens) {
  // Changing the last new token's K/V must leave every earlier token's output untouched.
  const int hd = 64, n = 12;
  std::vector<HeadKv> heads = RandomHeads<float>({20 + n}, hd, 1000, 300);
  const std::vector<float> q = RandomNormal(n * 2 * hd, 301);
  std::vector<std::vector<float>> outs;
  for (int variant = 0; variant < 2; ++variant) {
    if (variant == 1) {
      for (int d = 0; d < hd; ++d) {
        heads[0].keys[(heads[0].size() - 1) * hd + d] += 3.f;
        heads[0].values[(heads[0].size() - 1) * hd + d] -= 5.f;
      }
    }
    DeviceKv<float> kv(heads, hd);
    outs.push_back(PrefillF32(kv.view(), q, n, 2, 0));
  }
  const size_t last_token = static_cast<size_t>(n - 1) * 2 * hd;
  EXPECT_TRUE(std::equal(outs[0].begin(), outs[0].begin() + last_token, outs[1].begin()));
  EXPECT_FALSE(
      std::equal(outs[0].begin() + last_token, outs[0].end(), outs[1].begin() + last_token));
}

// ---------------------------------------------------------------------------------------------
// SnapKV

struct SnapKvCase {
  int num_heads, num_kv_heads, head_dim, w;
  std::vector<int> lengths;
  int budget, kernel;
  Pooling pooling;
  int sliding_window;
  bool tied_keys;  // keys drawn from 4 distinct rows: many exact score ties
};

std::vector<SnapKvCase> SnapKvCases() {
  return {
      {8, 2, 64, 8, {300, 40}, 64, 7, Pooling::kMax, 0, false},  // head 1 within budget
      {32,
       8,
       128,
       32,
       {2000, 1025, 1024, 5000, 33, 3000, 1500, 4096},
       1024,
       7,
       Pooling::kMax,
       0,
       false},
      {32,
       8,
       128,
       32,
       {2000, 1025, 1024, 5000, 33, 3000, 1500, 4096},
       1024,
       5,
       Pooling::kAvg,
       0,
       false},
      {8, 4, 64, 16, {600, 101, 100, 450}, 100, 7, Pooling::kMax, 200, false},  // window
      {4, 2, 64, 8, {500, 400}, 50, 3, Pooling::kMax, 0, true},                 // ties
      {4, 2, 64, 8, {500, 400}, 50, 1, Pooling::kAvg, 0, true},                 // ties, no pooling
      {8, 4, 8, 4, {100, 50, 7, 200}, 20, 7, Pooling::kMax, 0, false},          // stories260K dims
  };
}

template <typename T>
void CheckSnapKv() {
  uint32_t seed = 400;
  for (const SnapKvCase& c : SnapKvCases()) {
    SCOPED_TRACE(::testing::Message()
                 << "heads=" << c.num_heads << "/" << c.num_kv_heads << " head_dim=" << c.head_dim
                 << " w=" << c.w << " budget=" << c.budget << " kernel=" << c.kernel
                 << " avg=" << (c.pooling == Pooling::kAvg) << " window=" << c.sliding_window
                 << " ties=" << c.tied_keys);
    std::vector<HeadKv> heads = RandomHeads<T>(c.lengths, c.head_dim, 20000, seed);
    if (c.tied_keys) {
      for (HeadKv& h : heads) {
        for (int64_t j = 0; j < h.size(); ++j) {
          std::copy_n(&h.keys[(j % 4) * c.head_dim], c.head_dim, &h.keys[j * c.head_dim]);
        }
      }
    }
    const std::vector<float> queries =
        RandomNormal(static_cast<size_t>(c.num_heads) * c.w * c.head_dim, seed + 55, 1.5f);
    seed += 1000;

    SnapKvOptions options;
    options.window = c.w;
    options.kernel = c.kernel;
    options.pooling = c.pooling;
    options.budget = c.budget;
    std::vector<const HeadKv*> head_ptrs;
    for (const HeadKv& h : heads) head_ptrs.push_back(&h);
    const std::vector<std::vector<int64_t>> want =
        SelectSnapKv(options, queries.data(), c.num_heads, c.w, head_ptrs, c.sliding_window);

    DeviceKv<T> kv(heads, c.head_dim);
    const int32_t max_length = kv.view().max_length;
    DeviceArray<float> d_queries(queries);
    DeviceArray<int32_t> d_keep(static_cast<size_t>(c.num_kv_heads) * c.budget),
        d_counts(c.num_kv_heads);
    DeviceArray<double> d_scores(static_cast<size_t>(c.num_kv_heads) * max_length);
    SnapKvParams<T> p;
    p.queries = d_queries.get();
    p.num_heads = c.num_heads;
    p.w = c.w;
    p.kv = kv.view();
    p.kernel = c.kernel;
    p.pooling = c.pooling == Pooling::kMax ? SnapKvPool::kMax : SnapKvPool::kAvg;
    p.budget = c.budget;
    p.sliding_window = c.sliding_window;
    p.keep = d_keep.get();
    p.keep_counts = d_counts.get();
    p.scores = d_scores.get();
    const size_t ws_bytes = SnapKvWorkspaceBytes(c.num_heads, c.num_kv_heads, c.w, max_length);
    DeviceArray<char> ws(ws_bytes);
    Finish(LaunchSnapKv(p, ws.get(), ws_bytes, nullptr));

    const std::vector<int32_t> keep = d_keep.ToHost(), counts = d_counts.ToHost();
    const std::vector<double> scores = d_scores.ToHost();
    for (int g = 0; g < c.num_kv_heads; ++g) {
      SCOPED_TRACE(::testing::Message() << "kv head " << g << " length " << c.lengths[g]);
      ASSERT_EQ(counts[g], static_cast<int32_t>(want[g].size()));
      const std::vector<int64_t> got(keep.begin() + static_cast<int64_t>(g) * c.budget,
                                     keep.begin() + static_cast<int64_t>(g) * c.budget + counts[g]);
      EXPECT_EQ(got, want[g]);
      if (c.lengths[g] <= c.budget) continue;
      // The scores behind the choice agree to f64 rounding (only the summation order differs).
      const std::vector<double> cpu =
          SnapKvScores(options, queries.data(), c.num_heads, c.w, head_ptrs, g, c.sliding_window);
      double worst = 0, top = 0;
      for (size_t j = 0; j < cpu.size(); ++j) {
        worst = std::max(worst, std::abs(scores[g * static_cast<size_t>(max_length) + j] - cpu[j]));
        top = std::max(top, std::abs(cpu[j]));
      }
      EXPECT_LE(worst, 1e-12 * top);
    }
  }
}

TEST_F(KernelsAttentionTest, SnapKvF32PicksSamePositionsAsCpu) { CheckSnapKv<float>(); }

TEST_F(KernelsAttentionTest, SnapKvBf16KeysPickSamePositionsAsCpu) { CheckSnapKv<__nv_bfloat16>(); }

TEST_F(KernelsAttentionTest, SnapKvRejectsBudgetNotAboveWindow) {
  SnapKvParams<float> p;
  p.num_heads = 4;
  p.kv.num_kv_heads = 2;
  p.kv.head_dim = 64;
  p.w = 32;
  p.budget = 32;
  int32_t dummy = 0;
  p.keep = &dummy;
  p.keep_counts = &dummy;
  EXPECT_EQ(LaunchSnapKv(p, nullptr, 0, nullptr), cudaErrorInvalidValue);
}

// ---------------------------------------------------------------------------------------------
// Digests

TEST_F(KernelsAttentionTest, DigestsAndScoresEqualCpuBitForBit) {
  const int B = 16, kvh = 4, hd = 64, num_heads = 8, n = 20, w = 5;
  const std::vector<int> filled = {16, 16, 16, 16, 16, 16, 16, 7, 1};
  const int num_blocks = static_cast<int>(filled.size());
  std::vector<KvBlock> blocks;
  std::vector<float> all_keys;
  for (int b = 0; b < num_blocks; ++b) {
    KvBlock block = MakeEmptyBlock(b, B, kvh, hd);
    const std::vector<float> k = RandomNormal(static_cast<size_t>(B) * kvh * hd, 500 + b);
    std::copy(k.begin(), k.begin() + static_cast<int64_t>(filled[b]) * kvh * hd,
              block.keys.begin());
    block.filled = filled[b];
    // Unfilled slots hold garbage the digest must ignore.
    for (size_t i = static_cast<size_t>(filled[b]) * kvh * hd; i < block.keys.size(); ++i) {
      block.keys[i] = 1e6f;
    }
    all_keys.insert(all_keys.end(), block.keys.begin(), block.keys.end());
    blocks.push_back(std::move(block));
  }
  std::vector<float> want_digests;
  for (const KvBlock& b : blocks) {
    const std::vector<float> d = ComputeDigest(b, kvh, hd);
    want_digests.insert(want_digests.end(), d.begin(), d.end());
  }
  const std::vector<float> q = RandomNormal(static_cast<size_t>(n) * num_heads * hd, 600);
  const int group = num_heads / kvh;
  std::vector<float> want_scores(static_cast<size_t>(kvh) * num_blocks);
  for (int g = 0; g < kvh; ++g) {
    for (int b = 0; b < num_blocks; ++b) {
      const float* digest = &want_digests[(static_cast<size_t>(b) * kvh + g) * 2 * hd];
      float best = -std::numeric_limits<float>::infinity();
      for (int h = g * group; h < (g + 1) * group; ++h) {  // as Session::Recall
        for (int64_t i = n - w; i < n; ++i) {
          best = std::max(best, DigestScore(&q[(i * num_heads + h) * hd], digest, hd));
        }
      }
      want_scores[static_cast<size_t>(g) * num_blocks + b] = best;
    }
  }

  DeviceArray<float> d_keys(all_keys), d_digests(want_digests.size()), d_q(q),
      d_scores(want_scores.size());
  DeviceArray<int32_t> d_filled(std::vector<int32_t>(filled.begin(), filled.end()));
  DigestInput in;
  in.keys = d_keys.get();
  in.filled = d_filled.get();
  in.num_blocks = num_blocks;
  in.block_size = B;
  in.num_kv_heads = kvh;
  in.head_dim = hd;
  in.block_stride = static_cast<int64_t>(B) * kvh * hd;
  in.slot_stride = static_cast<int64_t>(kvh) * hd;
  in.head_stride = hd;
  Finish(LaunchComputeDigests(in, d_digests.get(), nullptr));
  EXPECT_EQ(d_digests.ToHost(), want_digests);

  Finish(LaunchDigestScores(d_q.get() + static_cast<size_t>(n - w) * num_heads * hd, w,
                            static_cast<int64_t>(num_heads) * hd, num_heads, kvh, hd,
                            d_digests.get(), num_blocks, d_scores.get(), nullptr));
  const std::vector<float> got_scores = d_scores.ToHost();
  EXPECT_EQ(got_scores, want_scores);
  // Hence the same recall choice: the top 3 blocks per head, ties to the lower index.
  for (int g = 0; g < kvh; ++g) {
    auto top = [&](const std::vector<float>& s) {
      std::vector<int> order(num_blocks);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return s[g * num_blocks + a] > s[g * num_blocks + b]; });
      order.resize(3);
      return order;
    };
    EXPECT_EQ(top(got_scores), top(want_scores)) << g;
  }
}

// ---------------------------------------------------------------------------------------------
// KV gather

TEST_F(KernelsAttentionTest, GatherKvCopiesKeptEntriesOfEachHead) {
  const int hd = 128;
  const std::vector<int> lengths = {0, 1, 300, 77};
  const std::vector<HeadKv> heads = RandomHeads<float>(lengths, hd, 9000, 700);
  // Keep lists: none, the only entry, a random third, all of them.
  std::vector<std::vector<int32_t>> keep_lists(lengths.size());
  keep_lists[1] = {0};
  std::mt19937 rng(701);
  for (int32_t j = 0; j < 300; ++j) {
    if (rng() % 3 == 0) keep_lists[2].push_back(j);
  }
  keep_lists[3].resize(77);
  std::iota(keep_lists[3].begin(), keep_lists[3].end(), 0);
  int32_t max_keep = 0;
  for (const auto& k : keep_lists) max_keep = std::max<int32_t>(max_keep, k.size());
  std::vector<int32_t> keep(lengths.size() * max_keep, -1), counts;
  for (size_t g = 0; g < keep_lists.size(); ++g) {
    std::copy(keep_lists[g].begin(), keep_lists[g].end(), keep.begin() + g * max_keep);
    counts.push_back(static_cast<int32_t>(keep_lists[g].size()));
  }

  DeviceKv<float> src(heads, hd);
  std::vector<std::unique_ptr<DeviceArray<float>>> dst_k, dst_v;
  std::vector<std::unique_ptr<DeviceArray<int64_t>>> dst_p;
  std::vector<float*> k_ptrs, v_ptrs;
  std::vector<int64_t*> p_ptrs;
  for (size_t g = 0; g < lengths.size(); ++g) {
    dst_k.push_back(std::make_unique<DeviceArray<float>>(static_cast<size_t>(max_keep) * hd));
    dst_v.push_back(std::make_unique<DeviceArray<float>>(static_cast<size_t>(max_keep) * hd));
    dst_p.push_back(std::make_unique<DeviceArray<int64_t>>(max_keep));
    k_ptrs.push_back(dst_k.back()->get());
    v_ptrs.push_back(dst_v.back()->get());
    p_ptrs.push_back(dst_p.back()->get());
  }
  DeviceArray<float*> d_k_ptrs(k_ptrs), d_v_ptrs(v_ptrs);
  DeviceArray<int64_t*> d_p_ptrs(p_ptrs);
  DeviceArray<int32_t> d_keep(keep), d_counts(counts), d_lengths(lengths.size());
  KvGatherParams<float> p;
  p.src = src.view();
  p.dst_keys = d_k_ptrs.get();
  p.dst_values = d_v_ptrs.get();
  p.dst_positions = d_p_ptrs.get();
  p.keep = d_keep.get();
  p.keep_stride = max_keep;
  p.keep_counts = d_counts.get();
  p.max_keep = max_keep;
  p.dst_lengths = d_lengths.get();
  Finish(LaunchGatherKv(p, nullptr));

  EXPECT_EQ(d_lengths.ToHost(), counts);
  for (size_t g = 0; g < lengths.size(); ++g) {
    SCOPED_TRACE(::testing::Message() << "kv head " << g);
    const std::vector<float> k = dst_k[g]->ToHost(), v = dst_v[g]->ToHost();
    const std::vector<int64_t> pos = dst_p[g]->ToHost();
    for (size_t i = 0; i < keep_lists[g].size(); ++i) {
      const int64_t j = keep_lists[g][i];
      EXPECT_EQ(pos[i], heads[g].positions[j]);
      EXPECT_TRUE(std::equal(&k[i * hd], &k[i * hd] + hd, &heads[g].keys[j * hd])) << i;
      EXPECT_TRUE(std::equal(&v[i * hd], &v[i * hd] + hd, &heads[g].values[j * hd])) << i;
    }
  }
}

}  // namespace
}  // namespace kvmem
