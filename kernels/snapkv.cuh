// SnapKV selection on the device: window scoring, pooling and per-KV-head top-k, picking the
// same entries as SelectSnapKv in engine/snapkv.h (see there for the method).
#ifndef KVMEM_KERNELS_SNAPKV_CUH_
#define KVMEM_KERNELS_SNAPKV_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/ragged_kv.cuh"

namespace kvmem {

enum class SnapKvPool : int { kMax = 0, kAvg = 1 };

// Matches engine/snapkv.cc operation by operation where it decides the ranking: each logit is
// the f32 dot product in the CPU's element order without FMA contraction (bit-identical), then
// softmax, votes, group average and pooling in f64, so the pooled scores agree with the CPU's
// to about 1e-15 relative (summation order differs) and exact ties stay exact ties.
template <typename T>
struct SnapKvParams {
  // (num_heads, w, head_dim) dense f32, device: the post-RoPE queries of each KV head's last w
  // entries (the observation window).
  const float* queries = nullptr;
  // Default: 0. Query heads; a positive multiple of kv.num_kv_heads.
  int num_heads = 0;
  // Default: 0. Window rows; every head with more than `budget` entries has at least w.
  int w = 0;
  // The layer's KV; values are not read, positions only with a sliding window.
  RaggedKv<T> kv;
  // Default: 7. Pooling kernel in entries, positive and odd.
  int kernel = 7;
  // Default: kMax.
  SnapKvPool pooling = SnapKvPool::kMax;
  // Default: 0. Entries kept per head; must exceed w.
  int budget = 0;
  // Default: 0 (off). As in SnapKvScores: masks keys at distance >= sliding_window.
  int sliding_window = 0;
  // (num_kv_heads, budget) device, out: head g's kept entry indices ascending in
  // keep[g * budget, g * budget + keep_counts[g]); keep_counts[g] = min(budget, lengths[g]).
  int32_t* keep = nullptr;
  int32_t* keep_counts = nullptr;
  // Default: null. When set, (num_kv_heads, max_length) device, out: the pooled score of each
  // candidate of each head that had more than `budget` entries (the rest untouched).
  double* scores = nullptr;
  // Default: true. false queues the scoring and pooling only (scores must then be set), so
  // LaunchSnapKvTopK can pick for many layers in one launch.
  bool top_k = true;
};

// Bytes of device workspace LaunchSnapKv needs for these sizes.
size_t SnapKvWorkspaceBytes(int num_heads, int num_kv_heads, int w, int32_t max_length);

// Queues the selection on `stream` (five kernels: row softmax statistics per key tile, keeping
// each q . k product, their merge, votes from the kept products, pooling, then top-k unless
// top_k is false). The kept products make the workspace num_heads * w * max_length * 4 bytes
// larger: 128 MiB at 8B shape with w = 32 over 32K entries. workspace: at
// least SnapKvWorkspaceBytes(...) bytes of device memory, 16-byte aligned, not in use by other
// work on the stream meanwhile.
// The top-k is a radix select over the order-preserving 64-bit image of the f64 scores (8
// passes of 8-bit histograms by one 1024-thread block per head) followed by an index-ordered
// compaction, so it is exact for any candidate count, ties going to the lower index; it runs
// one block per KV head, fine for hot sets of up to ~10^5 entries per head.
// cudaErrorInvalidValue for a head_dim outside [1, 256], bad head counts, w <= 0, a budget not
// above w, an even or non-positive kernel, or a short workspace; otherwise the launch error.
// Instantiated for T = float, __nv_bfloat16 and __half keys.
template <typename T>
cudaError_t LaunchSnapKv(const SnapKvParams<T>& p, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

// The top-k alone, from p.scores (pooled scores as LaunchSnapKv with top_k = false wrote them):
// p.kv may describe the heads of several layers as one (lengths and keep contiguous across
// them, scores at stride max_length). Reads lengths, max_length, w, budget; writes keep and
// keep_counts. cudaErrorInvalidValue without scores, keep or keep_counts, or for w <= 0 or a
// budget not above w.
template <typename T>
cudaError_t LaunchSnapKvTopK(const SnapKvParams<T>& p, cudaStream_t stream);

extern template cudaError_t LaunchSnapKvTopK<float>(const SnapKvParams<float>&, cudaStream_t);
extern template cudaError_t LaunchSnapKvTopK<__nv_bfloat16>(const SnapKvParams<__nv_bfloat16>&,
                                                            cudaStream_t);
extern template cudaError_t LaunchSnapKvTopK<__half>(const SnapKvParams<__half>&, cudaStream_t);
extern template cudaError_t LaunchSnapKv<float>(const SnapKvParams<float>&, void*, size_t,
                                                cudaStream_t);
extern template cudaError_t LaunchSnapKv<__nv_bfloat16>(const SnapKvParams<__nv_bfloat16>&, void*,
                                                        size_t, cudaStream_t);
extern template cudaError_t LaunchSnapKv<__half>(const SnapKvParams<__half>&, void*, size_t,
                                                 cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_SNAPKV_CUH_
