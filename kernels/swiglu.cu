#include "kernels/swiglu.cuh"

#include <algorithm>
#include <cstdint>

namespace kvmem {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this

__global__ void SwiGluKernel(float* __restrict__ gate, const float* __restrict__ up, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

}  // namespace

cudaError_t LaunchSwiGlu(float* gate, const float* up, int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min(kMaxBlocks, (n + kThreads - 1) / kThreads);
  SwiGluKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(gate, up, n);
  return cudaGetLastError();
}

}  // namespace kvmem
