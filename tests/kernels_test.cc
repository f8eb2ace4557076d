// Parity of every CUDA kernel with its CPU reference op (engine/cpu_ops.h) on random inputs.
// Every output buffer is poisoned with NaN before the launch, so an element the kernel fails to
// write fails the comparison. In-place outputs cannot be poisoned; there the inputs are chosen
// so that an unwritten element differs from its reference value. Skips without a CUDA device.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu_ops.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"
#include "kernels/cuda_check.cuh"
#include "kernels/embedding.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/swiglu.cuh"

namespace kvmem {
namespace {

// A device array of T, freed on destruction; CUDA failures abort (test setup is an invariant).
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    KVMEM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), bytes()));
    KVMEM_CUDA_CHECK(cudaMemset(ptr_, 0xff, bytes()));  // all-ones bits: NaN for f32 and bf16
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    KVMEM_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return ptr_; }
  std::vector<T> ToHost() const {
    std::vector<T> host(n_);
    KVMEM_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  size_t bytes() const { return n_ * sizeof(T); }
  size_t n_;
  T* ptr_ = nullptr;
};

std::vector<float> RandomNormal(size_t n, uint32_t seed, float mean = 0.f, float stddev = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// ||a - b|| / ||b||; NaN when a holds a NaN, which fails every `<` comparison.
double RelativeError(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    norm += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(diff) / std::sqrt(norm);
}

int64_t CountNan(const std::vector<float>& v) {
  int64_t nan = 0;
  for (float x : v) nan += std::isnan(x) ? 1 : 0;
  return nan;
}

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
    SCOPED_TRACE(testing::Message() << "n=" << s.n << " dim=" << s.dim);
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
    SCOPED_TRACE(testing::Message() << "n=" << s.n << " dim=" << s.dim);
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

TEST_F(KernelsTest, RopeRotateHalfMatchesCpu) {
  struct RopeShape {
    int64_t n;
    int heads, head_dim;
  };
  for (const RopeShape& s : {RopeShape{1, 1, 2}, RopeShape{6, 8, 64}, RopeShape{5, 3, 128}}) {
    SCOPED_TRACE(testing::Message()
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
    SCOPED_TRACE(testing::Message() << "n=" << n);
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

}  // namespace
}  // namespace kvmem
