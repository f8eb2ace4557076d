#include <algorithm>
#include <cstdint>

#include "kernels/kv_append.cuh"

namespace kvmem {
namespace {

constexpr int kWarps = 8;  // one warp per row, kWarps rows per block

// Copies a row of n elements with the 32 lanes of a warp: 16 bytes per lane per step where
// both rows are 16-byte aligned and n elements are a multiple of 16 bytes (a decode step's
// scalar copy, one load then one store after another, took 6.8 us on an H100).
template <typename T>
__device__ __forceinline__ void CopyRow(const T* src, T* dst, int n, int lane) {
  const bool wide = (n * sizeof(T)) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (wide) {
    const int pieces = static_cast<int>(n * sizeof(T) / 16);
    for (int i = lane; i < pieces; i += 32) {
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    }
  } else {
    for (int d = lane; d < n; d += 32) dst[d] = src[d];
  }
}

template <typename T>
__global__ void AppendKvKernel(AppendKvParams<T> p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= p.n * p.num_kv_heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t t = item / p.num_kv_heads;
  const int g = static_cast<int>(item % p.num_kv_heads);
  const int64_t row = p.lengths[g] - p.n + t;
  const T* k = p.k + item * p.head_dim;
  const T* v = p.v + item * p.head_dim;
  T* dk = p.keys[g] + row * p.head_dim;
  T* dv = p.values[g] + row * p.head_dim;
  CopyRow(k, dk, p.head_dim, lane);
  CopyRow(v, dv, p.head_dim, lane);
  if (lane == 0) {
    const int64_t start =
        p.start_position_device != nullptr ? *p.start_position_device : p.start_position;
    p.positions[g][row] = start + t;
  }
}

template <typename T>
__global__ void ScatterKvRowsKernel(ScatterKvRowsParams<T> p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= p.rows) return;
  const int lane = threadIdx.x % 32;
  const bool by_address = p.src_keys != nullptr;
  const T* k = by_address ? p.src_keys[r] : p.keys + r * p.head_dim;
  const T* v = by_address ? p.src_values[r] : p.values + r * p.head_dim;
  T* dk = p.dst_keys[r];
  T* dv = p.dst_values[r];
  const size_t bytes = static_cast<size_t>(p.head_dim) * sizeof(T);
  const uintptr_t misaligned =
      (reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v) |
       reinterpret_cast<uintptr_t>(dk) | reinterpret_cast<uintptr_t>(dv) | bytes) &
      15u;
  if (misaligned == 0) {
    // 16 bytes per lane: a bf16 row of 128 is 16 lanes' loads, all in flight at once, which is
    // what reading pinned host memory over the bus needs.
    const int pieces = static_cast<int>(bytes / 16);
    for (int i = lane; i < pieces; i += 32) {
      const uint4 kk = reinterpret_cast<const uint4*>(k)[i];
      const uint4 vv = reinterpret_cast<const uint4*>(v)[i];
      reinterpret_cast<uint4*>(dk)[i] = kk;
      reinterpret_cast<uint4*>(dv)[i] = vv;
    }
  } else {
    for (int d = lane; d < p.head_dim; d += 32) {
      dk[d] = k[d];
      dv[d] = v[d];
    }
  }
  if (lane == 0) *p.dst_positions[r] = p.positions[r];
}

int64_t BlocksFor(int64_t rows) { return (rows + kWarps - 1) / kWarps; }

}  // namespace

template <typename T>
cudaError_t LaunchAppendKv(const AppendKvParams<T>& p, cudaStream_t stream) {
  if (p.n < 0 || p.num_kv_heads <= 0 || p.head_dim <= 0) return cudaErrorInvalidValue;
  const int64_t items = p.n * p.num_kv_heads;
  if (items == 0) return cudaSuccess;
  if (BlocksFor(items) > INT32_MAX) return cudaErrorInvalidValue;
  AppendKvKernel<T><<<static_cast<unsigned>(BlocksFor(items)), kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchScatterKvRows(const ScatterKvRowsParams<T>& p, cudaStream_t stream) {
  if (p.rows < 0 || p.head_dim <= 0) return cudaErrorInvalidValue;
  if ((p.src_keys == nullptr) != (p.src_values == nullptr)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  if (BlocksFor(p.rows) > INT32_MAX) return cudaErrorInvalidValue;
  ScatterKvRowsKernel<T><<<static_cast<unsigned>(BlocksFor(p.rows)), kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t LaunchAppendKv<float>(const AppendKvParams<float>&, cudaStream_t);
template cudaError_t LaunchAppendKv<__nv_bfloat16>(const AppendKvParams<__nv_bfloat16>&,
                                                   cudaStream_t);
template cudaError_t LaunchAppendKv<__half>(const AppendKvParams<__half>&, cudaStream_t);
template cudaError_t LaunchScatterKvRows<float>(const ScatterKvRowsParams<float>&, cudaStream_t);
template cudaError_t LaunchScatterKvRows<__nv_bfloat16>(const ScatterKvRowsParams<__nv_bfloat16>&,
                                                        cudaStream_t);
template cudaError_t LaunchScatterKvRows<__half>(const ScatterKvRowsParams<__half>&, cudaStream_t);

}  // namespace kvmem
