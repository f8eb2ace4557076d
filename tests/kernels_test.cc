// Parity of every CUDA kernel with its CPU reference op (engine/cpu_ops.h) on random inputs.
// Every output buffer is poisoned with NaN before the launch, so an element the kernel fails to
// write fails the comparison. In-place outputs cannot be poisoned; there the inputs are chosen
// so that an unwritten element differs from its reference value. Skips without a CUDA device.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu_ops.h"
#include "engine/host_convert.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"
#include "kernels/convert.cuh"
#include "kernels/cuda_check.cuh"
#include "kernels/embedding.cuh"
#include "kernels/gemv.cuh"
#include "kernels/head_major.cuh"
#include "kernels/kv_append.cuh"
#include "kernels/qkv_rope.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/swiglu.cuh"
#include "tests/cuda_test_util.h"

namespace kvmem {
namespace {

using testing::CountNan;
using testing::DeviceArray;
using testing::RandomNormal;
using testing::RelativeError;

std::vector<__nv_bfloat16> ToBf16(const std::vector<float>& v) {
  std::vector<__nv_bfloat16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    __nv_bfloat16_raw raw;
    raw.x = FloatToBFloat16(v[i]);
    out[i] = raw;
  }
  return out;
}

std::vector<float> FromBf16(const std::vector<__nv_bfloat16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = BFloat16ToFloat(static_cast<__nv_bfloat16_raw>(v[i]).x);
  }
  return out;
}

class KernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!CudaDeviceAvailable(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  }

  // Waits for the stream and fails the test on a launch or execution error.
  void Finish(cudaError_t launch) {
    ASSERT_EQ(launch, cudaSuccess) << KVMEM_CUDA_ERROR_MESSAGE(launch, launch);
    const cudaError_t err = cudaStreamSynchronize(stream_);
    ASSERT_EQ(err, cudaSuccess) << KVMEM_CUDA_ERROR_MESSAGE(err, cudaStreamSynchronize);
  }

  cudaStream_t stream_ = nullptr;  // the default stream
};

TEST_F(KernelsTest, EmbeddingGatherCopiesTableRowsOfIds) {
  const int64_t vocab = 512, dim = 67, n = 33;
  const std::vector<float> table = RandomNormal(vocab * dim, 1);
  std::mt19937 rng(2);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % vocab);
  ids[0] = 0;
  ids[1] = vocab - 1;
  ids[2] = ids[3];  // a repeated id

  std::vector<float> want(n * dim);
  for (int64_t t = 0; t < n; ++t) {
    std::memcpy(&want[t * dim], &table[ids[t] * dim], dim * sizeof(float));
  }
  DeviceArray<float> d_table(table), d_out(n * dim);
  DeviceArray<int32_t> d_ids(ids);
  Finish(LaunchEmbeddingGather(d_table.get(), vocab, dim, d_ids.get(), n, d_out.get(), stream_));
  const std::vector<float> got = d_out.ToHost();
  EXPECT_EQ(CountNan(got), 0);
  EXPECT_EQ(got, want);  // a gather is exact
}

TEST_F(KernelsTest, EmbeddingGatherWritesNanRowForOutOfRangeId) {
  const int64_t vocab = 16, dim = 40;
  const std::vector<float> table = RandomNormal(vocab * dim, 3);
  const std::vector<int32_t> ids = {5, static_cast<int32_t>(vocab), -1, 7};
  DeviceArray<float> d_table(table), d_out(ids.size() * dim);
  DeviceArray<int32_t> d_ids(ids);
  KVMEM_CUDA_CHECK(cudaMemset(d_out.get(), 0, ids.size() * dim * sizeof(float)));
  Finish(LaunchEmbeddingGather(d_table.get(), vocab, dim, d_ids.get(), ids.size(), d_out.get(),
                               stream_));
  const std::vector<float> got = d_out.ToHost();
  for (int64_t i = 0; i < dim; ++i) {
    EXPECT_EQ(got[0 * dim + i], table[5 * dim + i]);
    EXPECT_TRUE(std::isnan(got[1 * dim + i])) << i;
    EXPECT_TRUE(std::isnan(got[2 * dim + i])) << i;
    EXPECT_EQ(got[3 * dim + i], table[7 * dim + i]);
  }
}

struct NormShape {
  int64_t n, dim;
};
// Widths below, at and above one warp and one block, and not multiples of either.
constexpr NormShape kNormShapes[] = {{1, 8}, {3, 64}, {5, 1000}, {2, 4099}};

TEST_F(KernelsTest, AddRmsNormF32MatchesCpu) {
  const float eps = 1e-5f;
  for (const NormShape& s : kNormShapes) {
    SCOPED_TRACE(::testing::Message() << "n=" << s.n << " dim=" << s.dim);
    const std::vector<float> x = RandomNormal(s.n * s.dim, 10);
    const std::vector<float> residual = RandomNormal(s.n * s.dim, 11);
    const std::vector<float> weight = RandomNormal(s.dim, 12, 1.f, 0.1f);

    std::vector<float> want_x = x;
    for (size_t i = 0; i < want_x.size(); ++i) want_x[i] += residual[i];
    std::vector<float> want(s.n * s.dim);
    RmsNorm(want_x.data(), weight.data(), s.n, s.dim, eps, want.data());

    DeviceArray<float> d_x(x), d_res(residual), d_w(weight), d_out(s.n * s.dim);
    Finish(
        LaunchAddRmsNorm(d_x.get(), d_res.get(), d_w.get(), s.n, s.dim, eps, d_out.get(), stream_));
    const std::vector<float> got_x = d_x.ToHost(), got = d_out.ToHost();
    EXPECT_EQ(got_x, want_x);  // one f32 add per element, same as the CPU
    EXPECT_EQ(CountNan(got), 0);
    EXPECT_LT(RelativeError(got, want), 1e-5);
  }
}

TEST_F(KernelsTest, AddRmsNormBf16MatchesCpu) {
  const float eps = 1e-5f;
  for (const NormShape& s : kNormShapes) {
    SCOPED_TRACE(::testing::Message() << "n=" << s.n << " dim=" << s.dim);
    const auto x = ToBf16(RandomNormal(s.n * s.dim, 20));
    const auto residual = ToBf16(RandomNormal(s.n * s.dim, 21));
    const auto weight = ToBf16(RandomNormal(s.dim, 22, 1.f, 0.1f));

    // The reference runs in f32 on the bf16 inputs.
    std::vector<float> want_x = FromBf16(x);
    const std::vector<float> res_f = FromBf16(residual), weight_f = FromBf16(weight);
    for (size_t i = 0; i < want_x.size(); ++i) want_x[i] += res_f[i];
    std::vector<float> want(s.n * s.dim);
    RmsNorm(want_x.data(), weight_f.data(), s.n, s.dim, eps, want.data());

    DeviceArray<__nv_bfloat16> d_x(x), d_res(residual), d_w(weight), d_out(s.n * s.dim);
    Finish(
        LaunchAddRmsNorm(d_x.get(), d_res.get(), d_w.get(), s.n, s.dim, eps, d_out.get(), stream_));
    const std::vector<float> got_x = FromBf16(d_x.ToHost()), got = FromBf16(d_out.ToHost());
    EXPECT_EQ(CountNan(got), 0);
    EXPECT_LT(RelativeError(got_x, want_x), 1e-2);
    EXPECT_LT(RelativeError(got, want), 1e-2);
  }
}

// y = W x against a double reference on the same (bf16-exact) inputs, through both the 16-byte
// path and the element-by-element one (a row size that is not a multiple of 16 bytes, or a
// misaligned x).
TEST_F(KernelsTest, GemvMatchesDoubleReference) {
  struct GemvShape {
    int64_t out, in;
    int x_offset;  // elements x starts past an aligned allocation
  };
  const GemvShape shapes[] = {{1, 8, 0},       {37, 64, 0},    {1000, 4096, 0},
                              {129, 14336, 0}, {33, 100, 0},   {7, 4096, 1},
                              {3, 1, 0},       {4097, 256, 0}, {16, 0, 0}};
  uint32_t seed = 900;
  for (const GemvShape& s : shapes) {
    SCOPED_TRACE(::testing::Message() << "out=" << s.out << " in=" << s.in << " x+" << s.x_offset);
    const auto w = ToBf16(RandomNormal(s.out * s.in, seed++));
    const auto x = ToBf16(RandomNormal(s.in + s.x_offset, seed++));
    const std::vector<float> wf = FromBf16(w), xf = FromBf16(x);
    std::vector<double> want(s.out);
    for (int64_t o = 0; o < s.out; ++o) {
      for (int64_t i = 0; i < s.in; ++i) {
        want[o] += static_cast<double>(wf[o * s.in + i]) * xf[s.x_offset + i];
      }
    }
    DeviceArray<__nv_bfloat16> d_w(w), d_x(x);
    DeviceArray<float> d_y(s.out);  // poisoned: every row must be written
    Finish(LaunchGemv(d_w.get(), s.out, s.in, d_x.get() + s.x_offset, d_y.get(), stream_));
    const std::vector<float> got = d_y.ToHost();
    ASSERT_EQ(CountNan(got), 0);
    double num = 0, den = 0;
    for (int64_t o = 0; o < s.out; ++o) {
      num += (got[o] - want[o]) * (got[o] - want[o]);
      den += want[o] * want[o];
    }
    EXPECT_LE(std::sqrt(num), 1e-5 * std::sqrt(den) + 1e-30) << "relative L2 error";
  }
  EXPECT_EQ(LaunchGemv<float>(nullptr, -1, 4, nullptr, nullptr, stream_), cudaErrorInvalidValue);
}

TEST_F(KernelsTest, RopeRotateHalfMatchesCpu) {
  struct RopeShape {
    int64_t n;
    int heads, head_dim;
  };
  for (const RopeShape& s : {RopeShape{1, 1, 2}, RopeShape{6, 8, 64}, RopeShape{5, 3, 128}}) {
    SCOPED_TRACE(::testing::Message()
                 << "n=" << s.n << " heads=" << s.heads << " head_dim=" << s.head_dim);
    const int half = s.head_dim / 2;
    std::vector<double> inv_freq(half);  // Llama's theta = 500000 frequencies
    for (int i = 0; i < half; ++i) inv_freq[i] = std::pow(500000.0, -2.0 * i / s.head_dim);
    // Non-contiguous, unsorted, large positions; none is 0, so every element must move.
    std::mt19937 rng(30);
    std::vector<int64_t> positions(s.n);
    for (int64_t& p : positions) p = 1 + static_cast<int64_t>(rng() % 200000);
    const int64_t row = static_cast<int64_t>(s.heads) * s.head_dim;
    const std::vector<float> x = RandomNormal(s.n * row, 31);

    std::vector<float> want = x;
    for (int64_t t = 0; t < s.n; ++t) {
      ApplyRope(&want[t * row], s.heads, s.head_dim, positions[t], inv_freq.data());
    }
    DeviceArray<float> d_x(x);
    DeviceArray<int64_t> d_pos(positions);
    DeviceArray<double> d_freq(inv_freq);
    Finish(LaunchRopeRotateHalf(d_x.get(), s.n, s.heads, s.head_dim, d_pos.get(), d_freq.get(),
                                stream_));
    const std::vector<float> got = d_x.ToHost();
    EXPECT_EQ(CountNan(got), 0);
    EXPECT_LT(RelativeError(got, want), 1e-5);
  }
}

TEST_F(KernelsTest, RopeRejectsOddHeadDim) {
  EXPECT_EQ(LaunchRopeRotateHalf(nullptr, 1, 1, 3, nullptr, nullptr, stream_),
            cudaErrorInvalidValue);
}

TEST_F(KernelsTest, SwiGluMatchesCpu) {
  for (int64_t n : {int64_t{1}, int64_t{255}, int64_t{100003}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const std::vector<float> gate = RandomNormal(n, 40, 0.f, 3.f);
    const std::vector<float> up = RandomNormal(n, 41);
    std::vector<float> want = gate;
    SwiGlu(want.data(), up.data(), n);

    DeviceArray<float> d_gate(gate), d_up(up);
    Finish(LaunchSwiGlu(d_gate.get(), d_up.get(), n, stream_));
    const std::vector<float> got = d_gate.ToHost();
    EXPECT_EQ(CountNan(got), 0);
    EXPECT_LT(RelativeError(got, want), 1e-5);
  }
}

TEST_F(KernelsTest, RowsToHeadMajorReordersEveryRowHeadByHead) {
  // head_dim 128 and 8 take the float4 path; 6 and the offset input the element-by-element one.
  struct Shape {
    int64_t rows;
    int heads, head_dim, in_offset;
  };
  for (const Shape& sh : {Shape{32, 32, 128, 0}, Shape{5, 4, 8, 0}, Shape{3, 7, 6, 0},
                          Shape{9, 4, 8, 1}, Shape{1, 3, 16, 0}}) {
    SCOPED_TRACE(::testing::Message() << "rows=" << sh.rows << " heads=" << sh.heads
                                      << " head_dim=" << sh.head_dim << " offset=" << sh.in_offset);
    const size_t count = static_cast<size_t>(sh.rows) * sh.heads * sh.head_dim;
    const std::vector<float> in = RandomNormal(count + sh.in_offset, 50);
    std::vector<float> want(count);
    for (int64_t i = 0; i < sh.rows; ++i) {
      for (int h = 0; h < sh.heads; ++h) {
        for (int d = 0; d < sh.head_dim; ++d) {
          want[(h * sh.rows + i) * sh.head_dim + d] =
              in[sh.in_offset + (i * sh.heads + h) * sh.head_dim + d];
        }
      }
    }
    DeviceArray<float> d_in(in), d_out(count);
    Finish(LaunchRowsToHeadMajor(d_in.get() + sh.in_offset, sh.rows, sh.heads, sh.head_dim,
                                 d_out.get(), stream_));
    EXPECT_EQ(d_out.ToHost(), want);
  }
  DeviceArray<float> d(8);
  EXPECT_EQ(LaunchRowsToHeadMajor(d.get(), 0, 2, 4, d.get(), stream_), cudaSuccess);
  EXPECT_EQ(LaunchRowsToHeadMajor(d.get(), -1, 2, 4, d.get(), stream_), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchRowsToHeadMajor(d.get(), 1, 0, 4, d.get(), stream_), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchRowsToHeadMajor(d.get(), 1, 2, 0, d.get(), stream_), cudaErrorInvalidValue);
}

TEST_F(KernelsTest, SwiGluRowsMatchesCpuOnStackedGateAndUp) {
  const int64_t n = 7, inter = 300;
  const std::vector<float> gate_up = RandomNormal(n * 2 * inter, 42, 0.f, 2.f);
  const std::vector<float> bias = RandomNormal(2 * inter, 43);
  std::vector<float> want(n * inter);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float> g(inter), u(inter);
    for (int64_t j = 0; j < inter; ++j) {
      g[j] = gate_up[t * 2 * inter + j] + bias[j];
      u[j] = gate_up[t * 2 * inter + inter + j] + bias[inter + j];
    }
    SwiGlu(g.data(), u.data(), inter);
    std::copy(g.begin(), g.end(), want.begin() + t * inter);
  }
  DeviceArray<float> d_in(gate_up), d_bias(bias), d_out(n * inter);
  Finish(LaunchSwiGluRows(d_in.get(), d_bias.get(), n, inter, d_out.get(), stream_));
  EXPECT_LT(RelativeError(d_out.ToHost(), want), 1e-6);
  DeviceArray<__nv_bfloat16> d_out16(n * inter);
  Finish(LaunchSwiGluRows(d_in.get(), d_bias.get(), n, inter, d_out16.get(), stream_));
  EXPECT_LT(RelativeError(FromBf16(d_out16.ToHost()), want), 1e-2);
}

TEST_F(KernelsTest, ResidualRmsNormAddsBiasedResidualThenNorms) {
  for (const NormShape& s : kNormShapes) {
    SCOPED_TRACE(::testing::Message() << "n=" << s.n << " dim=" << s.dim);
    const std::vector<float> x = RandomNormal(s.n * s.dim, 50);
    const std::vector<float> residual = RandomNormal(s.n * s.dim, 51);
    const std::vector<float> bias = RandomNormal(s.dim, 52);
    const std::vector<float> weight = RandomNormal(s.dim, 53, 1.f, 0.1f);
    std::vector<float> want_x = x;
    for (int64_t i = 0; i < s.n * s.dim; ++i) want_x[i] += residual[i] + bias[i % s.dim];
    std::vector<float> want(s.n * s.dim);
    RmsNorm(want_x.data(), weight.data(), s.n, s.dim, 1e-5, want.data());

    DeviceArray<float> d_x(x), d_res(residual), d_bias(bias), d_w(weight), d_out(s.n * s.dim);
    Finish(LaunchResidualRmsNorm(d_x.get(), d_res.get(), d_bias.get(), d_w.get(), s.n, s.dim, 1e-5,
                                 d_out.get(), stream_));
    EXPECT_EQ(d_x.ToHost(), want_x);
    EXPECT_LT(RelativeError(d_out.ToHost(), want), 1e-6);
    // Without a residual x is left alone and only normed, here into bf16.
    DeviceArray<float> d_x2(x);
    DeviceArray<__nv_bfloat16> d_out16(s.n * s.dim);
    Finish(LaunchResidualRmsNorm(d_x2.get(), static_cast<const float*>(nullptr),
                                 static_cast<const float*>(nullptr), d_w.get(), s.n, s.dim, 1e-5,
                                 d_out16.get(), stream_));
    std::vector<float> want2(s.n * s.dim);
    RmsNorm(x.data(), weight.data(), s.n, s.dim, 1e-5, want2.data());
    EXPECT_EQ(d_x2.ToHost(), x);
    EXPECT_LT(RelativeError(FromBf16(d_out16.ToHost()), want2), 1e-2);
  }
}

TEST_F(KernelsTest, QkvRopeSplitsBiasesAndRotatesLikeCpu) {
  const int64_t n = 5, start = 1000;
  const int heads = 4, kv_heads = 2, hd = 64;
  const int qd = heads * hd, kvd = kv_heads * hd, row = qd + 2 * kvd;
  const std::vector<float> qkv = RandomNormal(n * row, 60);
  const std::vector<float> bias = RandomNormal(row, 61);
  std::vector<double> inv_freq(hd / 2);
  for (int i = 0; i < hd / 2; ++i) inv_freq[i] = std::pow(10000.0, -2.0 * i / hd);
  std::vector<float> want_q(n * qd), want_k(n * kvd), want_v(n * kvd);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float> r(qkv.begin() + t * row, qkv.begin() + (t + 1) * row);
    for (int j = 0; j < row; ++j) r[j] += bias[j];
    ApplyRope(r.data(), heads, hd, start + t, inv_freq.data());
    ApplyRope(r.data() + qd, kv_heads, hd, start + t, inv_freq.data());
    std::copy(r.begin(), r.begin() + qd, want_q.begin() + t * qd);
    std::copy(r.begin() + qd, r.begin() + qd + kvd, want_k.begin() + t * kvd);
    std::copy(r.begin() + qd + kvd, r.end(), want_v.begin() + t * kvd);
  }
  DeviceArray<float> d_qkv(qkv), d_bias(bias), d_q(n * qd), d_k(n * kvd), d_v(n * kvd);
  DeviceArray<double> d_freq(inv_freq);
  QkvRopeParams<float> p;
  p.qkv = d_qkv.get();
  p.bias = d_bias.get();
  p.n = n;
  p.start_position = start;
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = hd;
  p.inv_freq = d_freq.get();
  p.q = d_q.get();
  p.k = d_k.get();
  p.v = d_v.get();
  Finish(LaunchQkvRope(p, stream_));
  EXPECT_LT(RelativeError(d_q.ToHost(), want_q), 1e-6);
  EXPECT_LT(RelativeError(d_k.ToHost(), want_k), 1e-6);
  EXPECT_EQ(d_v.ToHost(), want_v);  // one f32 add, as on the CPU
}

TEST_F(KernelsTest, AppendAndScatterWriteRowsWhereTheHeadsSayAndConvertBackExactly) {
  const int kv_heads = 3, hd = 40;
  const int64_t n = 4, start = 77;
  const std::vector<int32_t> lengths = {n, n + 5, n + 2};  // after the append
  std::vector<float*> keys, values;
  std::vector<int64_t*> positions;
  std::vector<std::unique_ptr<DeviceArray<float>>> bufs;
  std::vector<std::unique_ptr<DeviceArray<int64_t>>> pos_bufs;
  for (int g = 0; g < kv_heads; ++g) {
    bufs.push_back(std::make_unique<DeviceArray<float>>(16 * hd));
    bufs.push_back(std::make_unique<DeviceArray<float>>(16 * hd));
    pos_bufs.push_back(std::make_unique<DeviceArray<int64_t>>(16));
    keys.push_back(bufs[2 * g]->get());
    values.push_back(bufs[2 * g + 1]->get());
    positions.push_back(pos_bufs[g]->get());
  }
  const std::vector<float> k = RandomNormal(n * kv_heads * hd, 70);
  const std::vector<float> v = RandomNormal(n * kv_heads * hd, 71);
  DeviceArray<float> d_k(k), d_v(v);
  DeviceArray<float*> d_keys(keys), d_values(values);
  DeviceArray<int64_t*> d_positions(positions);
  DeviceArray<int32_t> d_lengths(lengths);
  AppendKvParams<float> ap;
  ap.keys = d_keys.get();
  ap.values = d_values.get();
  ap.positions = d_positions.get();
  ap.lengths = d_lengths.get();
  ap.k = d_k.get();
  ap.v = d_v.get();
  ap.n = n;
  ap.start_position = start;
  ap.num_kv_heads = kv_heads;
  ap.head_dim = hd;
  Finish(LaunchAppendKv(ap, stream_));
  for (int g = 0; g < kv_heads; ++g) {
    const std::vector<float> hk = bufs[2 * g]->ToHost(), hv = bufs[2 * g + 1]->ToHost();
    const std::vector<int64_t> hp = pos_bufs[g]->ToHost();
    for (int64_t t = 0; t < n; ++t) {
      const int64_t r = lengths[g] - n + t;
      EXPECT_EQ(hp[r], start + t);
      for (int d = 0; d < hd; ++d) {
        EXPECT_EQ(hk[r * hd + d], k[(t * kv_heads + g) * hd + d]);
        EXPECT_EQ(hv[r * hd + d], v[(t * kv_heads + g) * hd + d]);
      }
    }
  }
  // Scatter bf16 rows (rounded on the host, as the backend packs them) to arbitrary
  // destinations, then widen them back: bf16 -> f32 -> bf16 is exact, so the host's copy of a
  // device row reproduces the row bit for bit.
  const int64_t rows = 6;
  const std::vector<float> sk = RandomNormal(rows * hd, 72), sv = RandomNormal(rows * hd, 73);
  const std::vector<int64_t> sp = {3, 9, 1, 4, 100, 2};
  DeviceArray<__nv_bfloat16> dst_k(rows * hd), dst_v(rows * hd);
  DeviceArray<int64_t> dst_p(rows);
  std::vector<__nv_bfloat16*> pk, pv;
  std::vector<int64_t*> pp;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t slot = (r * 5) % rows;  // a permutation
    pk.push_back(dst_k.get() + slot * hd);
    pv.push_back(dst_v.get() + slot * hd);
    pp.push_back(dst_p.get() + slot);
  }
  DeviceArray<__nv_bfloat16> d_sk(ToBf16(sk)), d_sv(ToBf16(sv));
  DeviceArray<int64_t> d_sp(sp);
  DeviceArray<__nv_bfloat16*> d_pk(pk), d_pv(pv);
  DeviceArray<int64_t*> d_pp(pp);
  ScatterKvRowsParams<__nv_bfloat16> s;
  s.keys = d_sk.get();
  s.values = d_sv.get();
  s.positions = d_sp.get();
  s.dst_keys = d_pk.get();
  s.dst_values = d_pv.get();
  s.dst_positions = d_pp.get();
  s.rows = rows;
  s.head_dim = hd;
  Finish(LaunchScatterKvRows(s, stream_));
  const std::vector<float> got_k = FromBf16(dst_k.ToHost());
  const std::vector<int64_t> got_p = dst_p.ToHost();
  const std::vector<float> want_k = FromBf16(ToBf16(sk));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t slot = (r * 5) % rows;
    EXPECT_EQ(got_p[slot], sp[r]);
    for (int d = 0; d < hd; ++d) EXPECT_EQ(got_k[slot * hd + d], want_k[r * hd + d]);
  }
  DeviceArray<float> widened(rows * hd);
  DeviceArray<__nv_bfloat16> narrowed(rows * hd);
  Finish(LaunchConvert(dst_k.get(), widened.get(), rows * hd, stream_));
  Finish(LaunchConvert(widened.get(), narrowed.get(), rows * hd, stream_));
  EXPECT_EQ(FromBf16(narrowed.ToHost()), got_k);
}

// The zero-copy page-in: rows read by address straight from pinned host memory (as the
// session's blocks are, once engine/block_memory.h's pool holds them), in 16-byte pieces where
// aligned and element by element where not.
TEST_F(KernelsTest, ScatterReadsRowsByAddressFromPinnedHostMemory) {
  for (const int hd : {128, 6}) {
    SCOPED_TRACE(hd);
    const int64_t rows = 37;
    // Keys then values of `rows` rows, plus one element so a row can sit misaligned.
    const size_t elems = static_cast<size_t>(2 * rows * hd + 1);
    __nv_bfloat16* host = nullptr;
    ASSERT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&host), elems * sizeof(__nv_bfloat16),
                            cudaHostAllocPortable | cudaHostAllocMapped),
              cudaSuccess);
    const std::vector<float> values = RandomNormal(elems, 74);
    const std::vector<__nv_bfloat16> bits = ToBf16(values);
    std::copy(bits.begin(), bits.end(), host);
    __nv_bfloat16* device_view = nullptr;
    ASSERT_EQ(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_view), host, 0),
              cudaSuccess);
    std::vector<const __nv_bfloat16*> src_k, src_v;
    std::vector<int64_t> src_at;  // element offset of row r's key
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = ((r * 7) % rows) * hd + (r == 5 ? 1 : 0);  // row 5 misaligned
      src_at.push_back(at);
      src_k.push_back(device_view + at);
      src_v.push_back(device_view + rows * hd + at - (r == 5 ? 1 : 0));
    }
    DeviceArray<__nv_bfloat16> dst_k(rows * hd), dst_v(rows * hd);
    DeviceArray<int64_t> dst_p(rows);
    std::vector<__nv_bfloat16*> pk, pv;
    std::vector<int64_t*> pp;
    std::vector<int64_t> positions;
    for (int64_t r = 0; r < rows; ++r) {
      pk.push_back(dst_k.get() + r * hd);
      pv.push_back(dst_v.get() + r * hd);
      pp.push_back(dst_p.get() + r);
      positions.push_back(1000 + 3 * r);
    }
    DeviceArray<const __nv_bfloat16*> d_src_k(src_k), d_src_v(src_v);
    DeviceArray<__nv_bfloat16*> d_pk(pk), d_pv(pv);
    DeviceArray<int64_t*> d_pp(pp);
    DeviceArray<int64_t> d_positions(positions);
    ScatterKvRowsParams<__nv_bfloat16> s;
    s.src_keys = d_src_k.get();
    s.src_values = d_src_v.get();
    s.positions = d_positions.get();
    s.dst_keys = d_pk.get();
    s.dst_values = d_pv.get();
    s.dst_positions = d_pp.get();
    s.rows = rows;
    s.head_dim = hd;
    Finish(LaunchScatterKvRows(s, stream_));
    const std::vector<float> got_k = FromBf16(dst_k.ToHost()), got_v = FromBf16(dst_v.ToHost());
    const std::vector<float> want = FromBf16(bits);
    EXPECT_EQ(dst_p.ToHost(), positions);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t vat = rows * hd + src_at[r] - (r == 5 ? 1 : 0);
      for (int d = 0; d < hd; ++d) {
        ASSERT_EQ(got_k[r * hd + d], want[src_at[r] + d]) << "row " << r << " dim " << d;
        ASSERT_EQ(got_v[r * hd + d], want[vat + d]) << "row " << r << " dim " << d;
      }
    }
    cudaFreeHost(host);
  }
}

TEST_F(KernelsTest, FillUniformIsSeededBoundedAndIndependentOfLaunchShape) {
  const int64_t count = 100000;
  DeviceArray<float> a(count), b(count);
  Finish(LaunchFillUniform(a.get(), count, 5, 0.25f, stream_));
  Finish(LaunchFillUniform(b.get(), count, 5, 0.25f, stream_));
  const std::vector<float> ha = a.ToHost();
  EXPECT_EQ(ha, b.ToHost());
  double mean = 0;
  for (float x : ha) {
    ASSERT_GE(x, -0.25f);
    ASSERT_LT(x, 0.25f);
    mean += x;
  }
  EXPECT_NEAR(mean / count, 0.0, 0.01);
  // A prefix filled alone equals the prefix of the whole fill.
  DeviceArray<float> c(1000);
  Finish(LaunchFillUniform(c.get(), 1000, 5, 0.25f, stream_));
  EXPECT_EQ(c.ToHost(), std::vector<float>(ha.begin(), ha.begin() + 1000));
}

// Host-only (runs without a GPU): the upload path's f32 -> bf16 rounding equals CUDA's own host
// conversion at every rounding boundary of every bf16 value, and for NaN and infinities.
TEST(HostConvertTest, Bf16RoundingEqualsTheCudaHostConversionBitForBit) {
  std::mt19937 rng(3);
  int64_t checked = 0;
  for (uint32_t high = 0; high <= 0xffff; ++high) {
    for (uint32_t low : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu,
                         static_cast<uint32_t>(rng() & 0xffff)}) {
      const uint32_t bits = high << 16 | low;
      float v;
      std::memcpy(&v, &bits, sizeof(v));
      const __nv_bfloat16 want = __float2bfloat16_rn(v);
      uint16_t want_bits;
      std::memcpy(&want_bits, &want, sizeof(want_bits));
      ASSERT_EQ(Bf16Rne(v), want_bits) << std::hex << bits;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 7 * 65536);
  // Whole rows, as the upload path converts them.
  std::vector<float> row(257);
  for (float& x : row) x = std::normal_distribution<float>()(rng);
  std::vector<__nv_bfloat16> got(row.size());
  RowsFromFloat(row.data(), static_cast<int64_t>(row.size()), got.data());
  for (size_t i = 0; i < row.size(); ++i) {
    EXPECT_EQ(__bfloat162float(got[i]), __bfloat162float(__float2bfloat16_rn(row[i]))) << i;
  }
}

}  // namespace
}  // namespace kvmem
