// Host-side conversion of f32 rows to a device element type, rounding as the device does (to
// nearest even), fast enough for uploads: a page-in converts every hot value of a session.
// CUDA builds only (it needs cuda_bf16.h / cuda_fp16.h for the element types).
#ifndef KVMEM_ENGINE_HOST_CONVERT_H_
#define KVMEM_ENGINE_HOST_CONVERT_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "engine/kv_blocks.h"

namespace kvmem {

// dst[i] = src[i] rounded to T, for i in [0, n).
inline void RowsFromFloat(const float* src, int64_t n, float* dst) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
inline void RowsFromFloat(const float* src, int64_t n, __nv_bfloat16* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t bits = Bf16Rne(src[i]);
    std::memcpy(&dst[i], &bits, sizeof(bits));
  }
}
inline void RowsFromFloat(const float* src, int64_t n, __half* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = __float2half_rn(src[i]);
}

}  // namespace kvmem

#endif  // KVMEM_ENGINE_HOST_CONVERT_H_
