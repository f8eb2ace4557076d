#include <cstdint>
#include <type_traits>

#include "kernels/gemv.cuh"
#include "kernels/kernel_utils.cuh"

namespace kvmem {
namespace {

using kernel_utils::ToFloat;
using kernel_utils::WarpSum;

constexpr int kWarps = 8;   // warps per block
constexpr int kRows = 2;    // output rows per warp
constexpr int kUnroll = 4;  // 16-byte loads per row in flight per lane

// Sum of the products of the elements of two 16-byte vectors of T, in f32.
template <typename T>
__device__ __forceinline__ float Dot16(const uint4& a, const uint4& b) {
  const T* x = reinterpret_cast<const T*>(&a);
  const T* y = reinterpret_cast<const T*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < static_cast<int>(16 / sizeof(T)); ++i) s += ToFloat(x[i]) * ToFloat(y[i]);
  return s;
}

// Grid ceil(out / (kWarps * kRows)), kWarps * 32 threads: warp w of block b owns rows
// (b * kWarps + w) * kRows + r; lane l reads 16-byte pieces l, l + 32, ... of each row, kUnroll
// pieces of every row loaded before any is used, then the warp sums its lanes.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    GemvVectorKernel(const T* w, int64_t out, int64_t in, const T* x, float* y) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRows;
  if (row0 >= out) return;  // warp-uniform
  constexpr int kVec = 16 / sizeof(T);
  const int64_t pieces = in / kVec;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const uint4* wv[kRows];  // a row past the end repeats the last one, read but unused
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    wv[r] = reinterpret_cast<const uint4*>(w + min(row0 + r, out - 1) * in);
  }
  float acc[kRows] = {};
  for (int64_t p0 = lane; p0 < pieces; p0 += 32 * kUnroll) {
    uint4 wp[kRows][kUnroll], xp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = p0 + u * 32;
      if (p < pieces) {
        xp[u] = __ldg(xv + p);
#pragma unroll
        for (int r = 0; r < kRows; ++r) wp[r][u] = __ldcs(wv[r] + p);  // streamed: read once
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (p0 + u * 32 < pieces) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += Dot16<T>(wp[r][u], xp[u]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float s = WarpSum(acc[r]);
    if (lane == 0 && row0 + r < out) y[row0 + r] = s;
  }
}

// Any size or alignment: one warp per row, element by element.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    GemvScalarKernel(const T* w, int64_t out, int64_t in, const T* x, float* y) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= out) return;
  const T* wr = w + row * in;
  float acc = 0.f;
  for (int64_t i = lane; i < in; i += 32) acc += ToFloat(wr[i]) * ToFloat(x[i]);
  acc = WarpSum(acc);
  if (lane == 0) y[row] = acc;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

template <typename T>
cudaError_t LaunchGemv(const T* w, int64_t out_features, int64_t in_features, const T* x, float* y,
                       cudaStream_t stream) {
  if (out_features < 0 || in_features < 0) return cudaErrorInvalidValue;
  if (out_features == 0) return cudaSuccess;
  const bool vector = (in_features * sizeof(T)) % 16 == 0 && Aligned16(w) && Aligned16(x);
  const int64_t rows_per_block = vector ? kWarps * kRows : kWarps;
  const int64_t blocks = (out_features + rows_per_block - 1) / rows_per_block;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  if (vector) {
    GemvVectorKernel<T><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
        w, out_features, in_features, x, y);
  } else {
    GemvScalarKernel<T><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
        w, out_features, in_features, x, y);
  }
  return cudaGetLastError();
}

template cudaError_t LaunchGemv<float>(const float*, int64_t, int64_t, const float*, float*,
                                       cudaStream_t);
template cudaError_t LaunchGemv<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t,
                                               const __nv_bfloat16*, float*, cudaStream_t);
template cudaError_t LaunchGemv<__half>(const __half*, int64_t, int64_t, const __half*, float*,
                                        cudaStream_t);

}  // namespace kvmem
