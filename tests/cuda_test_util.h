// Helpers shared by the CUDA kernel tests.
#ifndef KVMEM_TESTS_CUDA_TEST_UTIL_H_
#define KVMEM_TESTS_CUDA_TEST_UTIL_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <vector>

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

}  // namespace testing
}  // namespace kvmem

#endif  // KVMEM_TESTS_CUDA_TEST_UTIL_H_
