#include <algorithm>
#include <cstdint>

#include "kernels/kernel_utils.cuh"
#include "kernels/swiglu.cuh"

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

template <typename TOut>
__global__ void SwiGluRowsKernel(const float* __restrict__ gate_up, const float* __restrict__ bias,
                                 int64_t n, int64_t inter, TOut* __restrict__ out) {
  const int64_t total = n * inter;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t t = i / inter, j = i % inter;
    float g = gate_up[t * 2 * inter + j];
    float u = gate_up[t * 2 * inter + inter + j];
    if (bias != nullptr) {
      g += bias[j];
      u += bias[inter + j];
    }
    out[i] = kernel_utils::FromFloat<TOut>(g / (1.0f + expf(-g)) * u);
  }
}

}  // namespace

template <typename TOut>
cudaError_t LaunchSwiGluRows(const float* gate_up, const float* bias, int64_t n, int64_t inter,
                             TOut* out, cudaStream_t stream) {
  if (n < 0 || inter < 0) return cudaErrorInvalidValue;
  if (n == 0 || inter == 0) return cudaSuccess;
  const int64_t blocks = std::min(kMaxBlocks, (n * inter + kThreads - 1) / kThreads);
  SwiGluRowsKernel<TOut>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(gate_up, bias, n, inter, out);
  return cudaGetLastError();
}

template cudaError_t LaunchSwiGluRows<float>(const float*, const float*, int64_t, int64_t, float*,
                                             cudaStream_t);
template cudaError_t LaunchSwiGluRows<__nv_bfloat16>(const float*, const float*, int64_t, int64_t,
                                                     __nv_bfloat16*, cudaStream_t);
template cudaError_t LaunchSwiGluRows<__half>(const float*, const float*, int64_t, int64_t, __half*,
                                              cudaStream_t);

cudaError_t LaunchSwiGlu(float* gate, const float* up, int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min(kMaxBlocks, (n + kThreads - 1) / kThreads);
  SwiGluKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(gate, up, n);
  return cudaGetLastError();
}

}  // namespace kvmem
