// Rotary position embedding, rotate-half layout (Hugging Face Llama).
#ifndef KVMEM_KERNELS_ROPE_CUH_
#define KVMEM_KERNELS_ROPE_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// In place on x (n, heads, head_dim) f32, dense row-major: token t is rotated by its own
// position positions[t] (n entries, any order, so ragged or non-contiguous positions work).
// For pair i in [0, head_dim / 2): angle = positions[t] * inv_freq[i], computed with cos and
// sin in double and then cast to f32, exactly as ApplyRope in engine/cpu_ops.h; then
//   (x[i], x[i + half]) <- (x[i] c - x[i + half] s, x[i + half] c + x[i] s).
// inv_freq (head_dim / 2) is ModelConfig::RopeInverseFrequencies() copied to the device.
// head_dim must be even and positive; n == 0 launches nothing.
// Returns the launch error (cudaSuccess when the kernel was queued on `stream`).
cudaError_t LaunchRopeRotateHalf(float* x, int64_t n, int heads, int head_dim,
                                 const int64_t* positions, const double* inv_freq,
                                 cudaStream_t stream);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_ROPE_CUH_
