// Decode attention: one new query token per query head over the layer's ragged per-head KV,
// split along the sequence (flash-decoding) so long contexts fill the GPU.
#ifndef KVMEM_KERNELS_DECODE_ATTENTION_CUH_
#define KVMEM_KERNELS_DECODE_ATTENTION_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/ragged_kv.cuh"

namespace kvmem {

// out[h] = softmax_j(scale * q[h] . k_j) v_j over every entry j of KV head g = h / group
// (group = num_heads / kv.num_kv_heads), the query's own entry included (append it first).
// Logits, softmax and the weighted sum run in f32 whatever T is. A head with no visible entry
// gets an all-zero output.
template <typename T>
struct DecodeAttentionParams {
  // (num_heads, head_dim) dense, device.
  const T* q = nullptr;
  // The layer's KV; kv.head_dim is the query's head_dim too.
  RaggedKv<T> kv;
  // Default: 0. Query heads; a positive multiple of kv.num_kv_heads.
  int num_heads = 0;
  // Default: 0. Logit scale, normally 1 / sqrt(head_dim).
  float scale = 0.f;
  // Default: 0 (off). When > 0, entries with q_position - position >= sliding_window are masked
  // (kv.positions must then be set).
  int sliding_window = 0;
  // Default: 0. The query's absolute position; read only with a sliding window.
  int64_t q_position = 0;
  // Default: null. When set (device), the query's position is read from here instead of
  // q_position, so that a captured graph takes each step's position from its inputs.
  const int64_t* q_position_device = nullptr;
  // Default: 0 (256). Entries per split: one thread block per (split, KV head, up to 8 query
  // heads of its group); a combine kernel merges the splits when there is more than one.
  int split_size = 0;
  // (num_heads, head_dim) dense, device. Written for every head.
  T* out = nullptr;
};

// Bytes of device workspace LaunchDecodeAttention needs for these sizes (0 with one split).
size_t DecodeAttentionWorkspaceBytes(int num_heads, int head_dim, int32_t max_length,
                                     int split_size);

// Queues the attention on `stream`. workspace: device memory of at least
// DecodeAttentionWorkspaceBytes(p.num_heads, p.kv.head_dim, p.kv.max_length, p.split_size)
// bytes, 16-byte aligned, not in use by other work on the stream meanwhile.
// cudaErrorInvalidValue for a head_dim outside [1, 256], a num_heads that is not a positive
// multiple of num_kv_heads, a negative split size or max_length, or a short workspace; otherwise
// the launch error. Instantiated for T = float, __nv_bfloat16 and __half.
template <typename T>
cudaError_t LaunchDecodeAttention(const DecodeAttentionParams<T>& p, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);

extern template cudaError_t LaunchDecodeAttention<float>(const DecodeAttentionParams<float>&, void*,
                                                         size_t, cudaStream_t);
extern template cudaError_t LaunchDecodeAttention<__nv_bfloat16>(
    const DecodeAttentionParams<__nv_bfloat16>&, void*, size_t, cudaStream_t);
extern template cudaError_t LaunchDecodeAttention<__half>(const DecodeAttentionParams<__half>&,
                                                          void*, size_t, cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_DECODE_ATTENTION_CUH_
