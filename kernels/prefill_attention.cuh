// Prefill attention: a turn's n new tokens attend, per query head, to their KV head's ragged
// entries (hot prefix and recalled blocks) plus the new tokens causally.
#ifndef KVMEM_KERNELS_PREFILL_ATTENTION_CUH_
#define KVMEM_KERNELS_PREFILL_ATTENTION_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/ragged_kv.cuh"

namespace kvmem {

// The new tokens' K/V are the last n entries of every KV head (append them first), as in
// CpuBackend::Attend: with L = kv.lengths[g], new token t (0 <= t < n) of query head h
// (g = h / group) attends to entries 0 .. L - n + t, i.e. the whole prefix and new tokens 0..t:
//   out[t][h] = softmax_j(scale * q[t][h] . k_j) v_j.
// Every lengths[g] must be >= n. Logits, softmax and sums run in f32 whatever T is.
template <typename T>
struct PrefillAttentionParams {
  // (n, num_heads, head_dim) dense, device.
  const T* q = nullptr;
  // The layer's KV, new tokens included.
  RaggedKv<T> kv;
  // Default: 0. New tokens.
  int64_t n = 0;
  // Default: 0. Query heads; a positive multiple of kv.num_kv_heads.
  int num_heads = 0;
  // Default: 0. Logit scale, normally 1 / sqrt(head_dim).
  float scale = 0.f;
  // Default: 0 (off). When > 0, token t masks entries with
  // start_position + t - position >= sliding_window (kv.positions must then be set).
  int sliding_window = 0;
  // Default: 0. Absolute position of new token 0; read only with a sliding window.
  int64_t start_position = 0;
  // (n, num_heads, head_dim) dense, device.
  T* out = nullptr;
  // Default: true. For 16-bit T, head_dim 16, 32, 64 or 128, no sliding window and a
  // row_stride that is a multiple of 8, scores and the weighted sum run on tensor cores
  // (mma.sync, f32 accumulation; the softmax weights are rounded to T before they multiply V,
  // as FlashAttention does). Every head's keys and values must then start 16-byte aligned
  // (cudaMalloc'd memory does). false, and every other case, runs the CUDA-core kernel.
  bool tensor_cores = true;
  // Default: null. Device scratch of workspace_bytes, at least
  // PrefillAttentionWorkspaceBytes(*this) for the tensor-core kernel to split long heads
  // across blocks when the rows alone cannot fill the device (short turns onto long hot sets);
  // with less it runs unsplit. Only read and written by the launched kernels.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Scratch the tensor-core kernel uses to split `p`'s entries (0 when it would not split or
// does not take the call). Reads only the host-side fields of p (shapes, max_length), and the
// current device's multiprocessor count: launch on the device the size was asked on, or the
// kernel may find the scratch short and run unsplit (correct, slower).
template <typename T>
size_t PrefillAttentionWorkspaceBytes(const PrefillAttentionParams<T>& p);

// Queues the attention on `stream`: on CUDA cores one block per (16 query rows, KV head); on
// tensor cores one per (64 query rows, KV head, split of the entries), then a combine of the
// splits. A query row is a (new token, query head of the group) pair, so a K/V tile staged in
// shared memory serves every query head of the group. Key tiles run up to the block's last
// visible entry; a sliding window masks but does not skip tiles. n == 0 launches nothing.
// cudaErrorInvalidValue for a head_dim outside [1, 256], a num_heads that is not a positive
// multiple of num_kv_heads, or n < 0; otherwise the launch error.
// Instantiated for T = float, __nv_bfloat16 and __half.
template <typename T>
cudaError_t LaunchPrefillAttention(const PrefillAttentionParams<T>& p, cudaStream_t stream);

extern template size_t PrefillAttentionWorkspaceBytes<float>(const PrefillAttentionParams<float>&);
extern template size_t PrefillAttentionWorkspaceBytes<__nv_bfloat16>(
    const PrefillAttentionParams<__nv_bfloat16>&);
extern template size_t PrefillAttentionWorkspaceBytes<__half>(
    const PrefillAttentionParams<__half>&);
extern template cudaError_t LaunchPrefillAttention<float>(const PrefillAttentionParams<float>&,
                                                          cudaStream_t);
extern template cudaError_t LaunchPrefillAttention<__nv_bfloat16>(
    const PrefillAttentionParams<__nv_bfloat16>&, cudaStream_t);
extern template cudaError_t LaunchPrefillAttention<__half>(const PrefillAttentionParams<__half>&,
                                                           cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_PREFILL_ATTENTION_CUH_
