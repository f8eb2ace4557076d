#include <cmath>
#include <cstdint>

#include "kernels/digest.cuh"

namespace kvmem {
namespace {

constexpr int kThreads = 128;

// Grid (num_blocks * num_kv_heads), kThreads threads striding over the dimensions: each slot's
// key row is read coalesced. Comparisons written as std::min / std::max evaluate them.
__global__ void ComputeDigestsKernel(DigestInput in, float* digests) {
  const int b = blockIdx.x / in.num_kv_heads, g = blockIdx.x % in.num_kv_heads;
  const int filled = in.filled != nullptr ? in.filled[b] : in.block_size;
  const float* keys = in.keys + b * in.block_stride + g * in.head_stride;
  float* lo = digests + (static_cast<int64_t>(b) * in.num_kv_heads + g) * 2 * in.head_dim;
  float* hi = lo + in.head_dim;
  for (int d = threadIdx.x; d < in.head_dim; d += blockDim.x) {
    float mn = INFINITY, mx = -INFINITY;
    for (int s = 0; s < filled; ++s) {
      const float k = keys[s * in.slot_stride + d];
      mn = k < mn ? k : mn;  // std::min(mn, k)
      mx = mx < k ? k : mx;  // std::max(mx, k)
    }
    lo[d] = mn;
    hi[d] = mx;
  }
}

// One thread per (KV head, block); threads of a warp share the queries (broadcast reads).
__global__ void DigestScoresKernel(const float* queries, int w, int64_t q_row_stride, int num_heads,
                                   int num_kv_heads, int head_dim, const float* digests,
                                   int num_blocks, float* scores) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= static_cast<int64_t>(num_kv_heads) * num_blocks) return;
  const int g = static_cast<int>(item / num_blocks), b = static_cast<int>(item % num_blocks);
  const int group = num_heads / num_kv_heads;
  const float* lo = digests + (static_cast<int64_t>(b) * num_kv_heads + g) * 2 * head_dim;
  const float* hi = lo + head_dim;
  float best = -INFINITY;
  for (int h = g * group; h < (g + 1) * group; ++h) {
    for (int i = 0; i < w; ++i) {
      const float* q = queries + i * q_row_stride + static_cast<int64_t>(h) * head_dim;
      float score = 0.f;
      for (int d = 0; d < head_dim; ++d) {
        const float a = __fmul_rn(q[d], lo[d]), c = __fmul_rn(q[d], hi[d]);
        score = __fadd_rn(score, a < c ? c : a);  // std::max(a, c)
      }
      best = best < score ? score : best;  // std::max(best, score)
    }
  }
  scores[item] = best;
}

}  // namespace

cudaError_t LaunchComputeDigests(const DigestInput& in, float* digests, cudaStream_t stream) {
  if (in.num_blocks < 0 || in.block_size < 0 || in.num_kv_heads <= 0 || in.head_dim <= 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t grid = static_cast<int64_t>(in.num_blocks) * in.num_kv_heads;
  if (grid == 0) return cudaSuccess;
  if (grid > INT32_MAX) return cudaErrorInvalidValue;
  ComputeDigestsKernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(in, digests);
  return cudaGetLastError();
}

cudaError_t LaunchDigestScores(const float* queries, int w, int64_t q_row_stride, int num_heads,
                               int num_kv_heads, int head_dim, const float* digests, int num_blocks,
                               float* scores, cudaStream_t stream) {
  if (w < 0 || num_kv_heads <= 0 || num_heads <= 0 || num_heads % num_kv_heads != 0 ||
      head_dim <= 0 || num_blocks < 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t items = static_cast<int64_t>(num_kv_heads) * num_blocks;
  if (items == 0) return cudaSuccess;
  DigestScoresKernel<<<static_cast<unsigned>((items + kThreads - 1) / kThreads), kThreads, 0,
                       stream>>>(queries, w, q_row_stride, num_heads, num_kv_heads, head_dim,
                                 digests, num_blocks, scores);
  return cudaGetLastError();
}

}  // namespace kvmem
