// Device helpers shared by the kernels' .cu files (never included by host-compiled code):
// element conversion and warp reductions.
#ifndef KVMEM_KERNELS_KERNEL_UTILS_CUH_
#define KVMEM_KERNELS_KERNEL_UTILS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace kvmem {
namespace kernel_utils {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}

// Butterfly reductions: every lane of the (full) warp gets the result.
template <typename V>
__device__ __forceinline__ V WarpSum(V v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}
// Every lane gets the same value, NaN when any lane holds one: kernels branch on the result
// around warp-wide operations, so lanes that disagreed (a NaN kept by some lanes and not by
// others) would part at those operations, which hangs a GPU.
template <typename V>
__device__ __forceinline__ V WarpMax(V v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const V o = __shfl_xor_sync(kFullMask, v, offset);
    v = (v < o || o != o) ? o : v;
  }
  return v;
}

// q . k over head_dim elements in order, one product and one add per element, both rounded
// (no FMA contraction): bit-identical to the CPU reference's plain `dot += q[d] * k[d]` loop.
__device__ __forceinline__ float SequentialDot(const float* q, const float* k, int head_dim) {
  float dot = 0.f;
  for (int d = 0; d < head_dim; ++d) dot = __fadd_rn(dot, __fmul_rn(q[d], k[d]));
  return dot;
}

}  // namespace kernel_utils
}  // namespace kvmem

#endif  // KVMEM_KERNELS_KERNEL_UTILS_CUH_
