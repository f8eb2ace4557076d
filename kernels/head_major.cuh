// Rows of a (tokens, heads, head_dim) matrix reordered head by head: how the observed queries
// of a pass leave the device, in the layout SnapKV and recall read them
// (ForwardResult::observed_queries), so the host only copies them.
#ifndef KVMEM_KERNELS_HEAD_MAJOR_CUH_
#define KVMEM_KERNELS_HEAD_MAJOR_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// out (num_heads, rows, head_dim) = in (rows, num_heads, head_dim), both dense f32 device
// memory: out[(h * rows + i) * head_dim + d] = in[(i * num_heads + h) * head_dim + d].
// in and out must not overlap. rows == 0 launches nothing. cudaErrorInvalidValue for negative
// sizes or a non-positive head count or head_dim; otherwise the launch error.
cudaError_t LaunchRowsToHeadMajor(const float* in, int64_t rows, int num_heads, int head_dim,
                                  float* out, cudaStream_t stream);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_HEAD_MAJOR_CUH_
