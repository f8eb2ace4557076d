// SwiGLU activation of the Llama MLP.
#ifndef KVMEM_KERNELS_SWIGLU_CUH_
#define KVMEM_KERNELS_SWIGLU_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// gate (n) = silu(gate) * up (n), elementwise in place on f32 device memory, as SwiGlu in
// engine/cpu_ops.h; callers pass n = tokens * intermediate for (tokens, intermediate) buffers.
// n == 0 launches nothing.
// Returns the launch error (cudaSuccess when the kernel was queued on `stream`).
cudaError_t LaunchSwiGlu(float* gate, const float* up, int64_t n, cudaStream_t stream);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_SWIGLU_CUH_
