#include <cstdint>

#include "kernels/rope.cuh"

namespace kvmem {
namespace {

constexpr int kThreads = 128;

// One block per token: the block first computes the token's cos/sin table (half entries) in
// shared memory, then rotates every (head, pair).
__global__ void RopeRotateHalfKernel(float* __restrict__ x, int heads, int head_dim,
                                     const int64_t* __restrict__ positions,
                                     const double* __restrict__ inv_freq) {
  extern __shared__ float cos_sin[];  // (2, half): cos then sin
  const int half = head_dim / 2;
  const int64_t t = blockIdx.x;
  const double pos = static_cast<double>(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    double s, c;
    sincos(pos * inv_freq[i], &s, &c);
    cos_sin[i] = static_cast<float>(c);
    cos_sin[half + i] = static_cast<float>(s);
  }
  __syncthreads();
  float* xt = x + t * heads * head_dim;
  for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
    const int h = j / half, i = j % half;
    float* v = xt + h * head_dim;
    const float c = cos_sin[i], s = cos_sin[half + i];
    const float x1 = v[i], x2 = v[i + half];
    v[i] = x1 * c - x2 * s;
    v[i + half] = x2 * c + x1 * s;
  }
}

}  // namespace

cudaError_t LaunchRopeRotateHalf(float* x, int64_t n, int heads, int head_dim,
                                 const int64_t* positions, const double* inv_freq,
                                 cudaStream_t stream) {
  if (n < 0 || n > INT32_MAX || heads <= 0 || head_dim <= 0 || head_dim % 2 != 0) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  const size_t shared = sizeof(float) * head_dim;  // cos and sin, half entries each
  RopeRotateHalfKernel<<<static_cast<unsigned>(n), kThreads, shared, stream>>>(x, heads, head_dim,
                                                                               positions, inv_freq);
  return cudaGetLastError();
}

}  // namespace kvmem
