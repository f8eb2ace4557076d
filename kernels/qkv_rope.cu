#include <cstdint>

#include "kernels/kernel_utils.cuh"
#include "kernels/qkv_rope.cuh"

namespace kvmem {
namespace {

constexpr int kThreads = 128;
// Heads rotated per block. One block per token did a decode step's 40 heads of an 8B layer in
// 17.6 us on an H100 (a single block); splitting a token over blocks spreads that out.
constexpr int kHeadsPerBlock = 8;

// Grid (tokens, head chunks): the token's cos/sin table first (shared memory, every block of
// the token computes it), then each (head, rotation pair) of the chunk's query and key heads,
// and the block's share of the value elements.
template <typename T>
__global__ void QkvRopeKernel(QkvRopeParams<T> p) {
  extern __shared__ float cos_sin[];  // (2, half): cos then sin
  const int half = p.head_dim / 2;
  const int64_t t = blockIdx.x;
  const int64_t start =
      p.start_position_device != nullptr ? *p.start_position_device : p.start_position;
  const double pos = static_cast<double>(start + t);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    double s, c;
    sincos(pos * p.inv_freq[i], &s, &c);
    cos_sin[i] = static_cast<float>(c);
    cos_sin[half + i] = static_cast<float>(s);
  }
  __syncthreads();
  const int qd = p.num_heads * p.head_dim, kvd = p.num_kv_heads * p.head_dim;
  const float* row = p.qkv + t * (qd + 2 * kvd);
  // Rotation pairs of this block's heads (query heads first, then key heads).
  const int h_begin = static_cast<int>(blockIdx.y) * kHeadsPerBlock;
  const int h_end = min(p.num_heads + p.num_kv_heads, h_begin + kHeadsPerBlock);
  const int pairs = (h_end - h_begin) * half;
  for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
    const int h = h_begin + j / half, i = j % half;
    const int col = h * p.head_dim;  // query heads first, key heads right after them
    float x1 = row[col + i], x2 = row[col + i + half];
    if (p.bias != nullptr) {
      x1 = __fadd_rn(x1, p.bias[col + i]);
      x2 = __fadd_rn(x2, p.bias[col + i + half]);
    }
    const float c = cos_sin[i], s = cos_sin[half + i];
    const float y1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    const float y2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    if (h < p.num_heads) {
      float* q = p.q + t * qd + col;
      q[i] = y1;
      q[i + half] = y2;
      if (p.q_t != nullptr) {
        T* qt = p.q_t + t * qd + col;
        qt[i] = kernel_utils::FromFloat<T>(y1);
        qt[i + half] = kernel_utils::FromFloat<T>(y2);
      }
    } else {
      T* k = p.k + t * kvd + (col - qd);
      k[i] = kernel_utils::FromFloat<T>(y1);
      k[i + half] = kernel_utils::FromFloat<T>(y2);
    }
  }
  for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < kvd; j += blockDim.x * gridDim.y) {
    float x = row[qd + kvd + j];
    if (p.bias != nullptr) x = __fadd_rn(x, p.bias[qd + kvd + j]);
    p.v[t * kvd + j] = kernel_utils::FromFloat<T>(x);
  }
}

}  // namespace

template <typename T>
cudaError_t LaunchQkvRope(const QkvRopeParams<T>& p, cudaStream_t stream) {
  if (p.n < 0 || p.n > INT32_MAX || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim < 2 ||
      p.head_dim > 256 || p.head_dim % 2 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.n == 0) return cudaSuccess;
  const size_t shared = sizeof(float) * p.head_dim;
  const int chunks = (p.num_heads + p.num_kv_heads + kHeadsPerBlock - 1) / kHeadsPerBlock;
  QkvRopeKernel<T><<<dim3(static_cast<unsigned>(p.n), chunks), kThreads, shared, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t LaunchQkvRope<float>(const QkvRopeParams<float>&, cudaStream_t);
template cudaError_t LaunchQkvRope<__nv_bfloat16>(const QkvRopeParams<__nv_bfloat16>&,
                                                  cudaStream_t);
template cudaError_t LaunchQkvRope<__half>(const QkvRopeParams<__half>&, cudaStream_t);

}  // namespace kvmem
