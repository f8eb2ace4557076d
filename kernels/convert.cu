#include <algorithm>
#include <cstdint>

#include "kernels/convert.cuh"
#include "kernels/kernel_utils.cuh"

namespace kvmem {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this

template <typename TIn, typename TOut>
__global__ void ConvertKernel(const TIn* __restrict__ in, TOut* __restrict__ out, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    out[i] = kernel_utils::FromFloat<TOut>(kernel_utils::ToFloat(in[i]));
  }
}

// SplitMix64 finaliser: a well-mixed 64-bit hash of the counter.
__device__ __forceinline__ uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename T>
__global__ void FillUniformKernel(T* __restrict__ out, int64_t count, uint64_t seed, float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    const uint64_t bits = Mix(seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i));
    const float unit = static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    out[i] = kernel_utils::FromFloat<T>((2.f * unit - 1.f) * scale);
  }
}

}  // namespace

template <typename T>
cudaError_t LaunchFillUniform(T* out, int64_t count, uint64_t seed, float scale,
                              cudaStream_t stream) {
  if (count < 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  const int64_t blocks = std::min(kMaxBlocks, (count + kThreads - 1) / kThreads);
  FillUniformKernel<T>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(out, count, seed, scale);
  return cudaGetLastError();
}

template cudaError_t LaunchFillUniform<float>(float*, int64_t, uint64_t, float, cudaStream_t);
template cudaError_t LaunchFillUniform<__nv_bfloat16>(__nv_bfloat16*, int64_t, uint64_t, float,
                                                      cudaStream_t);
template cudaError_t LaunchFillUniform<__half>(__half*, int64_t, uint64_t, float, cudaStream_t);

template <typename TIn, typename TOut>
cudaError_t LaunchConvert(const TIn* in, TOut* out, int64_t count, cudaStream_t stream) {
  if (count < 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  const int64_t blocks = std::min(kMaxBlocks, (count + kThreads - 1) / kThreads);
  ConvertKernel<TIn, TOut><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(in, out, count);
  return cudaGetLastError();
}

template cudaError_t LaunchConvert<float, __nv_bfloat16>(const float*, __nv_bfloat16*, int64_t,
                                                         cudaStream_t);
template cudaError_t LaunchConvert<float, __half>(const float*, __half*, int64_t, cudaStream_t);
template cudaError_t LaunchConvert<__nv_bfloat16, float>(const __nv_bfloat16*, float*, int64_t,
                                                         cudaStream_t);
template cudaError_t LaunchConvert<__half, float>(const __half*, float*, int64_t, cudaStream_t);
template cudaError_t LaunchConvert<float, float>(const float*, float*, int64_t, cudaStream_t);

}  // namespace kvmem
