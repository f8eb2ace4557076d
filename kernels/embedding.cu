#include <cmath>

#include "kernels/embedding.cuh"
#include "kernels/kernel_utils.cuh"

namespace kvmem {
namespace {

// One block per token; threads stride over the row.
template <typename T>
__global__ void EmbeddingGatherKernel(const T* __restrict__ table, int64_t vocab, int64_t dim,
                                      const int32_t* __restrict__ ids, float* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  float* row = out + t * dim;
  if (id < 0 || id >= vocab) {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) row[i] = NAN;
    return;
  }
  const T* src = table + static_cast<int64_t>(id) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) row[i] = kernel_utils::ToFloat(src[i]);
}

template <typename T>
cudaError_t Gather(const T* table, int64_t vocab, int64_t dim, const int32_t* ids, int64_t n,
                   float* out, cudaStream_t stream) {
  if (n < 0 || dim < 0 || n > INT32_MAX) return cudaErrorInvalidValue;
  if (n == 0 || dim == 0) return cudaSuccess;
  EmbeddingGatherKernel<T>
      <<<static_cast<unsigned>(n), 256, 0, stream>>>(table, vocab, dim, ids, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchEmbeddingGather(const float* table, int64_t vocab, int64_t dim,
                                  const int32_t* ids, int64_t n, float* out, cudaStream_t stream) {
  return Gather(table, vocab, dim, ids, n, out, stream);
}

cudaError_t LaunchEmbeddingGather(const __nv_bfloat16* table, int64_t vocab, int64_t dim,
                                  const int32_t* ids, int64_t n, float* out, cudaStream_t stream) {
  return Gather(table, vocab, dim, ids, n, out, stream);
}

cudaError_t LaunchEmbeddingGather(const __half* table, int64_t vocab, int64_t dim,
                                  const int32_t* ids, int64_t n, float* out, cudaStream_t stream) {
  return Gather(table, vocab, dim, ids, n, out, stream);
}

}  // namespace kvmem
