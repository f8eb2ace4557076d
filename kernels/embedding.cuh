// Embedding gather: token ids -> rows of the embedding table.
#ifndef KVMEM_KERNELS_EMBEDDING_CUH_
#define KVMEM_KERNELS_EMBEDDING_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// out (n, dim) row t = table (vocab, dim) row ids[t]; all device pointers, row-major, dense.
// An id outside [0, vocab) yields a row of NaN rather than reading out of bounds, so a bad id
// shows up downstream instead of corrupting memory. n == 0 launches nothing.
// Returns the launch error (cudaSuccess when the kernel was queued on `stream`).
cudaError_t LaunchEmbeddingGather(const float* table, int64_t vocab, int64_t dim,
                                  const int32_t* ids, int64_t n, float* out, cudaStream_t stream);

// The same gather from a bf16 or f16 table, widened to f32 rows.
cudaError_t LaunchEmbeddingGather(const __nv_bfloat16* table, int64_t vocab, int64_t dim,
                                  const int32_t* ids, int64_t n, float* out, cudaStream_t stream);
cudaError_t LaunchEmbeddingGather(const __half* table, int64_t vocab, int64_t dim,
                                  const int32_t* ids, int64_t n, float* out, cudaStream_t stream);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_EMBEDDING_CUH_
