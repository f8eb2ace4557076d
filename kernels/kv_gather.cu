#include <cstdint>

#include "kernels/kv_gather.cuh"

namespace kvmem {
namespace {

constexpr int kWarps = 8;  // rows per block

// Grid (ceil(max_keep / kWarps), num_kv_heads); warp w copies kept row blockIdx.x * kWarps + w.
template <typename T>
__global__ void GatherKvKernel(KvGatherParams<T> p) {
  const int g = blockIdx.y;
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.dst_lengths != nullptr) {
    p.dst_lengths[g] = p.keep_counts[g];
  }
  if (i >= p.keep_counts[g]) return;
  const int64_t j = p.keep[g * p.keep_stride + i];
  const int hd = p.src.head_dim;
  const T* ks = p.src.keys[g] + j * p.src.row_stride;
  const T* vs = p.src.values[g] + j * p.src.row_stride;
  T* kd = p.dst_keys[g] + i * p.dst_row_stride;
  T* vd = p.dst_values[g] + i * p.dst_row_stride;
  for (int d = lane; d < hd; d += 32) {
    kd[d] = ks[d];
    vd[d] = vs[d];
  }
  if (lane == 0 && p.dst_positions != nullptr && p.src.positions != nullptr) {
    p.dst_positions[g][i] = p.src.positions[g][j];
  }
}

}  // namespace

template <typename T>
cudaError_t LaunchGatherKv(const KvGatherParams<T>& p, cudaStream_t stream) {
  if (p.src.head_dim <= 0 || p.src.num_kv_heads <= 0 || p.max_keep < 0 || p.keep_stride < 0 ||
      p.src.row_stride < 0 || p.dst_row_stride < 0) {
    return cudaErrorInvalidValue;
  }
  KvGatherParams<T> dense = p;
  if (dense.src.row_stride == 0) dense.src.row_stride = p.src.head_dim;
  if (dense.dst_row_stride == 0) dense.dst_row_stride = p.src.head_dim;
  const int64_t blocks = (p.max_keep + kWarps - 1) / kWarps;
  // At least one block per head so dst_lengths is written even when nothing is kept.
  const dim3 grid(static_cast<unsigned>(blocks > 0 ? blocks : 1), p.src.num_kv_heads);
  GatherKvKernel<T><<<grid, kWarps * 32, 0, stream>>>(dense);
  return cudaGetLastError();
}

template cudaError_t LaunchGatherKv<float>(const KvGatherParams<float>&, cudaStream_t);
template cudaError_t LaunchGatherKv<__nv_bfloat16>(const KvGatherParams<__nv_bfloat16>&,
                                                   cudaStream_t);
template cudaError_t LaunchGatherKv<__half>(const KvGatherParams<__half>&, cudaStream_t);

}  // namespace kvmem
