// RMSNorm fused with the residual add that precedes it in every Llama block.
#ifndef KVMEM_KERNELS_RMSNORM_CUH_
#define KVMEM_KERNELS_RMSNORM_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// Row by row over n rows of dim elements (all device pointers, row-major, dense):
//   x (n, dim) += residual (n, dim);  out (n, dim) = x / sqrt(mean(x^2) + eps) * weight (dim).
// The sum is rounded to T and stored in x first; the norm is taken of that stored value, in f32.
// out may alias residual; neither may partially overlap x. n == 0 launches nothing.
// Instantiated for T = float, __nv_bfloat16 and __half.
// Returns the launch error (cudaSuccess when the kernel was queued on `stream`).
template <typename T>
cudaError_t LaunchAddRmsNorm(T* x, const T* residual, const T* weight, int64_t n, int64_t dim,
                             float eps, T* out, cudaStream_t stream);

extern template cudaError_t LaunchAddRmsNorm<float>(float*, const float*, const float*, int64_t,
                                                    int64_t, float, float*, cudaStream_t);
extern template cudaError_t LaunchAddRmsNorm<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*,
                                                            const __nv_bfloat16*, int64_t, int64_t,
                                                            float, __nv_bfloat16*, cudaStream_t);
extern template cudaError_t LaunchAddRmsNorm<__half>(__half*, const __half*, const __half*, int64_t,
                                                     int64_t, float, __half*, cudaStream_t);

// The CUDA backend's form: an f32 residual stream and an output in the GEMMs' input type.
//   x (n, dim) += residual (n, dim) + bias (dim);  out = x / sqrt(mean(x^2) + eps) * weight,
// with residual and bias each optional (null: nothing added), the residual and bias summed
// first as a biased projection's output is in the CPU reference; the sum of squares is taken in
// f64 and the scale rounded to f32 as engine/cpu_ops.cc's RmsNorm does. out must not overlap x,
// residual or bias. n == 0 launches nothing. Instantiated for TOut = float, __nv_bfloat16 and
// __half.
template <typename TOut>
cudaError_t LaunchResidualRmsNorm(float* x, const float* residual, const float* bias,
                                  const float* weight, int64_t n, int64_t dim, double eps,
                                  TOut* out, cudaStream_t stream);

extern template cudaError_t LaunchResidualRmsNorm<float>(float*, const float*, const float*,
                                                         const float*, int64_t, int64_t, double,
                                                         float*, cudaStream_t);
extern template cudaError_t LaunchResidualRmsNorm<__nv_bfloat16>(float*, const float*, const float*,
                                                                 const float*, int64_t, int64_t,
                                                                 double, __nv_bfloat16*,
                                                                 cudaStream_t);
extern template cudaError_t LaunchResidualRmsNorm<__half>(float*, const float*, const float*,
                                                          const float*, int64_t, int64_t, double,
                                                          __half*, cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_RMSNORM_CUH_
