// KV compaction after a selection: each KV head keeps a list of its entries.
#ifndef KVMEM_KERNELS_KV_GATHER_CUH_
#define KVMEM_KERNELS_KV_GATHER_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/ragged_kv.cuh"

namespace kvmem {

// For every KV head g and i < keep_counts[g], with j = keep[g * keep_stride + i]:
//   dst_keys[g][i] = src.keys[g][j], dst_values[g][i] = src.values[g][j] (head_dim elements;
//   dst rows dst_row_stride apart, 0 meaning head_dim), and, when both src.positions and
//   dst_positions are set, dst_positions[g][i] = src.positions[g][j];
// dst_lengths[g] = keep_counts[g] when dst_lengths is set. Indices must lie in
// [0, src.lengths[g]) (as LaunchSnapKv's keep lists do; they need not be sorted).
// The destination must not overlap the source: this is a gather into a new buffer, not an
// in-place compaction (parallel in-place moves would race with their own reads).
// One warp per kept row, lanes striding over head_dim: coalesced reads and writes.
template <typename T>
struct KvGatherParams {
  RaggedKv<T> src;
  // (num_kv_heads) device pointers each to room for max_keep rows.
  T* const* dst_keys = nullptr;
  T* const* dst_values = nullptr;
  // Default: null (positions not copied).
  int64_t* const* dst_positions = nullptr;
  // Default: 0 (head_dim).
  int64_t dst_row_stride = 0;
  // (num_kv_heads, keep_stride) device.
  const int32_t* keep = nullptr;
  int64_t keep_stride = 0;
  // (num_kv_heads) device, each in [0, max_keep].
  const int32_t* keep_counts = nullptr;
  // Default: 0. Host-side bound on every keep_counts[g]; sizes the grid.
  int32_t max_keep = 0;
  // Default: null. (num_kv_heads) device, out.
  int32_t* dst_lengths = nullptr;
};

// cudaErrorInvalidValue for a non-positive head_dim or head count, or negative sizes;
// otherwise the launch error. Instantiated for T = float, __nv_bfloat16 and __half.
template <typename T>
cudaError_t LaunchGatherKv(const KvGatherParams<T>& p, cudaStream_t stream);

extern template cudaError_t LaunchGatherKv<float>(const KvGatherParams<float>&, cudaStream_t);
extern template cudaError_t LaunchGatherKv<__nv_bfloat16>(const KvGatherParams<__nv_bfloat16>&,
                                                          cudaStream_t);
extern template cudaError_t LaunchGatherKv<__half>(const KvGatherParams<__half>&, cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_KV_GATHER_CUH_
