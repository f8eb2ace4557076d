// Helpers shared by the CUDA kernel tests.
#ifndef KVMEM_TESTS_CUDA_TEST_UTIL_H_
#define KVMEM_TESTS_CUDA_TEST_UTIL_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"

#include "kernels/cuda_check.cuh"

namespace kvmem {
namespace testing {

// A device array of T, freed on destruction; CUDA failures abort (test setup is an invariant).
// Filled with all-ones bits (NaN for f32, bf16 and f64) until written.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    KVMEM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<size_t>(bytes(), 1)));
    KVMEM_CUDA_CHECK(cudaMemset(ptr_, 0xff, bytes()));
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    KVMEM_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return n_; }
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

inline std::vector<float> RandomNormal(size_t n, uint32_t seed, float mean = 0.f, float stddev = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// ||a - b|| / ||b|| (||a - b|| when b is all zeros); NaN when a holds a NaN, which fails every
// `<` comparison. Ref is float or double.
template <typename Ref>
double RelativeError(const std::vector<float>& a, const std::vector<Ref>& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    diff += d * d;
    norm += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return norm > 0 ? std::sqrt(diff) / std::sqrt(norm) : std::sqrt(diff);
}

inline int64_t CountNan(const std::vector<float>& v) {
  return std::count_if(v.begin(), v.end(), [](float x) { return std::isnan(x); });
}

}  // namespace testing
}  // namespace kvmem

#endif  // KVMEM_TESTS_CUDA_TEST_UTIL_H_
