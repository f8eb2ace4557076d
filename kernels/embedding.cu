#include "kernels/embedding.cuh"

#include <cmath>

namespace kvmem {
namespace {

// One block per token; threads stride over the row.
__global__ void EmbeddingGatherKernel(const float* __restrict__ table, int64_t vocab, int64_t dim,
                                      const int32_t* __restrict__ ids, float* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  float* row = out + t * dim;
  if (id < 0 || id >= vocab) {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) row[i] = NAN;
    return;
  }
  const float* src = table + static_cast<int64_t>(id) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) row[i] = src[i];
}

}  // namespace

cudaError_t LaunchEmbeddingGather(const float* table, int64_t vocab, int64_t dim,
                                  const int32_t* ids, int64_t n, float* out, cudaStream_t stream) {
  if (n < 0 || dim < 0 || n > INT32_MAX) return cudaErrorInvalidValue;
  if (n == 0 || dim == 0) return cudaSuccess;
  EmbeddingGatherKernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(table, vocab, dim, ids, out);
  return cudaGetLastError();
}

}  // namespace kvmem
