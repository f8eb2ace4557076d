// Matrix-vector product for one-token passes (decode steps): y = W x with W row-major in the
// device type, x in the same type and y in f32, as the backend's GEMMs compute for n == 1.
#ifndef KVMEM_KERNELS_GEMV_CUH_
#define KVMEM_KERNELS_GEMV_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// y[o] = sum_i w[o * in_features + i] * x[i] for o < out_features, products and sums in f32.
// w: (out_features, in_features) row-major device; x: (in_features) device; y: (out_features)
// f32 device. Bandwidth bound: every weight is read once, 16 bytes per load where
// in_features * sizeof(T) is a multiple of 16 and w and x are 16-byte aligned (else element by
// element). Safe to capture in a CUDA graph.
// cudaErrorInvalidValue for negative sizes; out_features == 0 launches nothing.
// Instantiated for T = float, __nv_bfloat16 and __half.
template <typename T>
cudaError_t LaunchGemv(const T* w, int64_t out_features, int64_t in_features, const T* x, float* y,
                       cudaStream_t stream);

extern template cudaError_t LaunchGemv<float>(const float*, int64_t, int64_t, const float*, float*,
                                              cudaStream_t);
extern template cudaError_t LaunchGemv<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t,
                                                      const __nv_bfloat16*, float*, cudaStream_t);
extern template cudaError_t LaunchGemv<__half>(const __half*, int64_t, int64_t, const __half*,
                                               float*, cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_GEMV_CUH_
