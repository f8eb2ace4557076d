#include <algorithm>
#include <cstdint>

#include "kernels/head_major.cuh"

namespace kvmem {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this

// One thread per `Vec` of consecutive elements of a head's row; Vec is float4 when head_dim
// is a multiple of 4 and both pointers are 16-byte aligned, else float.
template <typename Vec>
__global__ void RowsToHeadMajorKernel(const Vec* __restrict__ in, int64_t rows, int num_heads,
                                      int vecs_per_head, Vec* __restrict__ out) {
  const int64_t total = rows * num_heads * vecs_per_head;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += stride) {
    const int64_t d = o % vecs_per_head;
    const int64_t i = (o / vecs_per_head) % rows;
    const int64_t h = o / (vecs_per_head * rows);
    out[o] = in[(i * num_heads + h) * vecs_per_head + d];
  }
}

template <typename Vec>
void Launch(const float* in, int64_t rows, int num_heads, int vecs_per_head, float* out,
            cudaStream_t stream) {
  const int64_t total = rows * num_heads * vecs_per_head;
  const int64_t blocks = std::min(kMaxBlocks, (total + kThreads - 1) / kThreads);
  RowsToHeadMajorKernel<Vec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<const Vec*>(in), rows, num_heads, vecs_per_head,
      reinterpret_cast<Vec*>(out));
}

}  // namespace

cudaError_t LaunchRowsToHeadMajor(const float* in, int64_t rows, int num_heads, int head_dim,
                                  float* out, cudaStream_t stream) {
  if (rows < 0 || num_heads <= 0 || head_dim <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const bool aligned = reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (head_dim % 4 == 0 && aligned) {
    Launch<float4>(in, rows, num_heads, head_dim / 4, out, stream);
  } else {
    Launch<float>(in, rows, num_heads, head_dim, out, stream);
  }
  return cudaGetLastError();
}

}  // namespace kvmem
