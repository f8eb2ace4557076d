#include <cstdint>

#include "kernels/rmsnorm.cuh"

namespace kvmem {
namespace {

// A multiple of 32, at most 1024; kThreads / 32 warps per block. A decode step normalises one
// row: 256 threads each walking 16 elements of an 8B row, one dependent load after another,
// took 12.5 us on an H100; 1024 threads with the loads unrolled take a few.
constexpr int kThreads = 1024;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ void FromFloat(float v, float* out) { *out = v; }
__device__ __forceinline__ void FromFloat(float v, __nv_bfloat16* out) {
  *out = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void FromFloat(float v, __half* out) { *out = __float2half_rn(v); }

// Sum of `v` over the block; every thread gets the result.
__device__ float BlockSum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? warp_sums[lane] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One block of kThreads per row. Each thread re-reads only the x elements it wrote itself.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    AddRmsNormKernel(T* __restrict__ x, const T* residual, const T* __restrict__ weight,
                     int64_t dim, float eps, T* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * dim;
  T* xr = x + row;
  const T* rr = residual + row;
  T* outr = out + row;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    T stored;
    FromFloat(ToFloat(xr[i]) + ToFloat(rr[i]), &stored);
    xr[i] = stored;
    const float v = ToFloat(stored);
    sum_sq += v * v;
  }
  const float scale = rsqrtf(BlockSum(sum_sq) / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    FromFloat(ToFloat(xr[i]) * scale * ToFloat(weight[i]), &outr[i]);
  }
}

// Sum of `v` over the block in f64; every thread gets the result.
__device__ double BlockSumF64(double v) {
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename TOut>
__global__ void __launch_bounds__(kThreads)
    ResidualRmsNormKernel(float* __restrict__ x, const float* __restrict__ residual,
                          const float* __restrict__ bias, const float* __restrict__ weight,
                          int64_t dim, double eps, TOut* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * dim;
  float* xr = x + row;
  double sum_sq = 0.0;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    float v = xr[i];
    if (residual != nullptr) {
      const float r = bias != nullptr ? __fadd_rn(residual[row + i], bias[i]) : residual[row + i];
      v = __fadd_rn(v, r);
      xr[i] = v;
    } else if (bias != nullptr) {
      v = __fadd_rn(v, bias[i]);
      xr[i] = v;
    }
    sum_sq += static_cast<double>(v) * v;
  }
  const double total = BlockSumF64(sum_sq);
  const float scale = static_cast<float>(1.0 / sqrt(total / static_cast<double>(dim) + eps));
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    FromFloat(__fmul_rn(__fmul_rn(xr[i], scale), weight[i]), &out[row + i]);
  }
}

}  // namespace

template <typename TOut>
cudaError_t LaunchResidualRmsNorm(float* x, const float* residual, const float* bias,
                                  const float* weight, int64_t n, int64_t dim, double eps,
                                  TOut* out, cudaStream_t stream) {
  if (n < 0 || dim <= 0 || n > INT32_MAX) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  ResidualRmsNormKernel<TOut>
      <<<static_cast<unsigned>(n), kThreads, 0, stream>>>(x, residual, bias, weight, dim, eps, out);
  return cudaGetLastError();
}

template cudaError_t LaunchResidualRmsNorm<float>(float*, const float*, const float*, const float*,
                                                  int64_t, int64_t, double, float*, cudaStream_t);
template cudaError_t LaunchResidualRmsNorm<__nv_bfloat16>(float*, const float*, const float*,
                                                          const float*, int64_t, int64_t, double,
                                                          __nv_bfloat16*, cudaStream_t);
template cudaError_t LaunchResidualRmsNorm<__half>(float*, const float*, const float*, const float*,
                                                   int64_t, int64_t, double, __half*, cudaStream_t);

template <typename T>
cudaError_t LaunchAddRmsNorm(T* x, const T* residual, const T* weight, int64_t n, int64_t dim,
                             float eps, T* out, cudaStream_t stream) {
  if (n < 0 || dim <= 0 || n > INT32_MAX) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  AddRmsNormKernel<T>
      <<<static_cast<unsigned>(n), kThreads, 0, stream>>>(x, residual, weight, dim, eps, out);
  return cudaGetLastError();
}

template cudaError_t LaunchAddRmsNorm<float>(float*, const float*, const float*, int64_t, int64_t,
                                             float, float*, cudaStream_t);
template cudaError_t LaunchAddRmsNorm<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*,
                                                     const __nv_bfloat16*, int64_t, int64_t, float,
                                                     __nv_bfloat16*, cudaStream_t);
template cudaError_t LaunchAddRmsNorm<__half>(__half*, const __half*, const __half*, int64_t,
                                              int64_t, float, __half*, cudaStream_t);

}  // namespace kvmem
