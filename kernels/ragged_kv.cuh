// The memory contract between host code and the attention, SnapKV and gather kernels for one
// layer's hot KV, which is ragged by construction: every KV head keeps its own entries
// (FlashInfer paged_kv_t style: plain pointers, lengths and strides, nothing owned).
// Plain C++: includable from .cc files compiled by the host compiler.
#ifndef KVMEM_KERNELS_RAGGED_KV_CUH_
#define KVMEM_KERNELS_RAGGED_KV_CUH_

#include <cstdint>

namespace kvmem {

// KV head g holds lengths[g] entries, entry j being key row keys[g] + j * row_stride and value
// row values[g] + j * row_stride (head_dim elements each), at absolute position positions[g][j].
// Entries of a head are in position order; a head's rows need not be near another head's.
// Every pointer is a device pointer, and so are the pointers stored in the arrays.
template <typename T>
struct RaggedKv {
  // (num_kv_heads) pointers, each to (lengths[g], row_stride) keys, RoPE applied.
  const T* const* keys = nullptr;
  // (num_kv_heads) pointers, each to (lengths[g], row_stride) values. Unused by SnapKV scoring.
  const T* const* values = nullptr;
  // (num_kv_heads) pointers, each to (lengths[g]) strictly increasing absolute positions.
  // Read only when a kernel is given a sliding window (or copies positions); else may be null.
  const int64_t* const* positions = nullptr;
  // (num_kv_heads) entries per head, each in [0, max_length].
  const int32_t* lengths = nullptr;
  // Default: 0. KV heads of the layer.
  int num_kv_heads = 0;
  // Default: 0. Elements per key or value row; 1 to 256.
  int head_dim = 0;
  // Default: 0. Elements between consecutive entries of a head; 0 means head_dim (dense rows).
  int64_t row_stride = 0;
  // Default: 0. Host-side bound on every lengths[g]: sizes the grids and workspaces without a
  // device read. A length above it is a broken contract (entries past it are ignored).
  int32_t max_length = 0;
};

}  // namespace kvmem

#endif  // KVMEM_KERNELS_RAGGED_KV_CUH_
