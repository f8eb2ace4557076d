// Writing new entries into a layer's ragged per-head KV: the turn's own tokens after their
// projection (AppendKv), and rows uploaded from host memory (restored, recalled) wherever
// they belong (ScatterKvRows).
#ifndef KVMEM_KERNELS_KV_APPEND_CUH_
#define KVMEM_KERNELS_KV_APPEND_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// For every KV head g and token t < n, with row = lengths[g] - n + t:
//   keys[g][row] = k[t][g], values[g][row] = v[t][g] (head_dim elements; rows dense),
//   positions[g][row] = start_position + t.
// lengths are the heads' lengths after the append (each >= n), as the attention kernels read
// them. All pointers, and the pointers in the arrays, are device pointers.
template <typename T>
struct AppendKvParams {
  T* const* keys = nullptr;             // (num_kv_heads)
  T* const* values = nullptr;           // (num_kv_heads)
  int64_t* const* positions = nullptr;  // (num_kv_heads)
  const int32_t* lengths = nullptr;     // (num_kv_heads)
  const T* k = nullptr;                 // (n, num_kv_heads, head_dim)
  const T* v = nullptr;                 // (n, num_kv_heads, head_dim)
  int64_t n = 0;
  int64_t start_position = 0;
  // Default: null. When set, (1) device: read instead of start_position (CUDA graphs).
  const int64_t* start_position_device = nullptr;
  int num_kv_heads = 0;
  int head_dim = 0;
};

template <typename T>
cudaError_t LaunchAppendKv(const AppendKvParams<T>& p, cudaStream_t stream);

// Row r < rows of (keys, values, positions), rows of head_dim elements uploaded from the host's
// cache (already in T), goes to dst_keys[r], dst_values[r] and dst_positions[r].
// Destinations must not overlap one another or the sources.
//
// With src_keys and src_values set, row r is read from src_keys[r] and src_values[r] instead:
// any address the device can read, such as pinned host memory holding the session's blocks
// (engine/block_memory.h), which the kernel then reads over the bus in place. keys and values
// are unused then. Rows whose addresses and byte length are multiples of 16 move in 16-byte
// pieces, the rest element by element.
template <typename T>
struct ScatterKvRowsParams {
  const T* keys = nullptr;                  // (rows, head_dim)
  const T* values = nullptr;                // (rows, head_dim)
  const T* const* src_keys = nullptr;       // (rows) or null
  const T* const* src_values = nullptr;     // (rows) or null
  const int64_t* positions = nullptr;       // (rows)
  T* const* dst_keys = nullptr;             // (rows)
  T* const* dst_values = nullptr;           // (rows)
  int64_t* const* dst_positions = nullptr;  // (rows)
  int64_t rows = 0;
  int head_dim = 0;
};

template <typename T>
cudaError_t LaunchScatterKvRows(const ScatterKvRowsParams<T>& p, cudaStream_t stream);

// Both: cudaErrorInvalidValue for non-positive head sizes, negative counts, or (scatter) only one
// of src_keys and src_values set; otherwise the launch error. Nothing is launched for zero
// rows. Instantiated for float, __nv_bfloat16 and __half.
extern template cudaError_t LaunchAppendKv<float>(const AppendKvParams<float>&, cudaStream_t);
extern template cudaError_t LaunchAppendKv<__nv_bfloat16>(const AppendKvParams<__nv_bfloat16>&,
                                                          cudaStream_t);
extern template cudaError_t LaunchAppendKv<__half>(const AppendKvParams<__half>&, cudaStream_t);
extern template cudaError_t LaunchScatterKvRows<float>(const ScatterKvRowsParams<float>&,
                                                       cudaStream_t);
extern template cudaError_t LaunchScatterKvRows<__nv_bfloat16>(
    const ScatterKvRowsParams<__nv_bfloat16>&, cudaStream_t);
extern template cudaError_t LaunchScatterKvRows<__half>(const ScatterKvRowsParams<__half>&,
                                                        cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_KV_APPEND_CUH_
