// Element type conversion on the device (weights at load time, activations between ops).
#ifndef KVMEM_KERNELS_CONVERT_CUH_
#define KVMEM_KERNELS_CONVERT_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// out[i] = in[i] converted (bf16 rounding to nearest even) for i < count. in and out must not
// overlap. count == 0 launches nothing. Instantiated for (float, __nv_bfloat16), (float, __half),
// (__nv_bfloat16, float), (__half, float) and (float, float).
template <typename TIn, typename TOut>
cudaError_t LaunchConvert(const TIn* in, TOut* out, int64_t count, cudaStream_t stream);

extern template cudaError_t LaunchConvert<float, __nv_bfloat16>(const float*, __nv_bfloat16*,
                                                                int64_t, cudaStream_t);
extern template cudaError_t LaunchConvert<float, __half>(const float*, __half*, int64_t,
                                                         cudaStream_t);
extern template cudaError_t LaunchConvert<__nv_bfloat16, float>(const __nv_bfloat16*, float*,
                                                                int64_t, cudaStream_t);
extern template cudaError_t LaunchConvert<__half, float>(const __half*, float*, int64_t,
                                                         cudaStream_t);
extern template cudaError_t LaunchConvert<float, float>(const float*, float*, int64_t,
                                                        cudaStream_t);

// out[i] = a value drawn uniformly from [-scale, scale) by a counter-based hash of (seed, i):
// the same seed gives the same values on any launch shape. count == 0 launches nothing.
// Instantiated for float, __nv_bfloat16 and __half. (Benchmarks fill random-weight models with it.)
template <typename T>
cudaError_t LaunchFillUniform(T* out, int64_t count, uint64_t seed, float scale,
                              cudaStream_t stream);

extern template cudaError_t LaunchFillUniform<float>(float*, int64_t, uint64_t, float,
                                                     cudaStream_t);
extern template cudaError_t LaunchFillUniform<__nv_bfloat16>(__nv_bfloat16*, int64_t, uint64_t,
                                                             float, cudaStream_t);
extern template cudaError_t LaunchFillUniform<__half>(__half*, int64_t, uint64_t, float,
                                                      cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_CONVERT_CUH_
