// Prefill attention: a turn's n new tokens attend, per query head, to their KV head's ragged
// entries (hot prefix and recalled blocks) plus the new tokens causally.
#ifndef KVMEM_KERNELS_PREFILL_ATTENTION_CUH_
#define KVMEM_KERNELS_PREFILL_ATTENTION_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

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
  // Default: true. For 16-bit T, head_dim a multiple of 16 up to 128 and no sliding window,
  // scores and the weighted sum run on tensor cores (WMMA, f32 accumulation; the softmax
  // weights are rounded to T before they multiply V, as FlashAttention does). false, and every
  // other case, runs the CUDA-core kernel.
  bool tensor_cores = true;
};

// Queues the attention on `stream`: one block per (16 query rows, KV head) on CUDA cores, or
// per (64 query rows, KV head) on tensor cores, a query row being a (new token, query head of
// the group) pair, so a K/V tile staged in shared memory serves every query head of the group. Key tiles run up to the block's last visible entry; a sliding window
// masks but does not skip tiles. n == 0 launches nothing.
// cudaErrorInvalidValue for a head_dim outside [1, 256], a num_heads that is not a positive
// multiple of num_kv_heads, or n < 0; otherwise the launch error.
// Instantiated for T = float, __nv_bfloat16 and __half.
template <typename T>
cudaError_t LaunchPrefillAttention(const PrefillAttentionParams<T>& p, cudaStream_t stream);

extern template cudaError_t LaunchPrefillAttention<float>(const PrefillAttentionParams<float>&,
                                                          cudaStream_t);
extern template cudaError_t LaunchPrefillAttention<__nv_bfloat16>(
    const PrefillAttentionParams<__nv_bfloat16>&, cudaStream_t);
extern template cudaError_t LaunchPrefillAttention<__half>(const PrefillAttentionParams<__half>&,
                                                           cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_PREFILL_ATTENTION_CUH_
