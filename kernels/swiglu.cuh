// SwiGLU activation of the Llama MLP.
#ifndef KVMEM_KERNELS_SWIGLU_CUH_
#define KVMEM_KERNELS_SWIGLU_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// gate (n) = silu(gate) * up (n), elementwise in place on f32 device memory, as SwiGlu in
// engine/cpu_ops.h; callers pass n = tokens * intermediate for (tokens, intermediate) buffers.
// n == 0 launches nothing.
// Returns the launch error (cudaSuccess when the kernel was queued on `stream`).
cudaError_t LaunchSwiGlu(float* gate, const float* up, int64_t n, cudaStream_t stream);

// The CUDA backend's form, over the output of one GEMM against the gate and up weights stacked:
//   gate_up (n, 2 * inter) f32, row t = [gate_t, up_t];  bias (2 * inter) f32 or null;
//   out (n, inter) = silu(gate + bias[:inter]) * (up + bias[inter:]), computed in f32 as
// SwiGlu does, then rounded to TOut (the down projection's input type).
// n == 0 launches nothing. Instantiated for TOut = float, __nv_bfloat16 and __half.
template <typename TOut>
cudaError_t LaunchSwiGluRows(const float* gate_up, const float* bias, int64_t n, int64_t inter,
                             TOut* out, cudaStream_t stream);

extern template cudaError_t LaunchSwiGluRows<float>(const float*, const float*, int64_t, int64_t,
                                                    float*, cudaStream_t);
extern template cudaError_t LaunchSwiGluRows<__nv_bfloat16>(const float*, const float*, int64_t,
                                                            int64_t, __nv_bfloat16*, cudaStream_t);
extern template cudaError_t LaunchSwiGluRows<__half>(const float*, const float*, int64_t, int64_t,
                                                     __half*, cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_SWIGLU_CUH_
