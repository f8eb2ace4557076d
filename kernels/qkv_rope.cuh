// The step between the fused QKV projection and attention: split each token's projected row
// into its query, key and value heads, add the biases, rotate queries and keys (RoPE,
// rotate-half) and round to the KV type.
#ifndef KVMEM_KERNELS_QKV_ROPE_CUH_
#define KVMEM_KERNELS_QKV_ROPE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

template <typename T>
struct QkvRopeParams {
  // (n, (num_heads + 2 * num_kv_heads) * head_dim) f32, device: row t = [q_t, k_t, v_t].
  const float* qkv = nullptr;
  // Default: null (no bias). ((num_heads + 2 * num_kv_heads) * head_dim) f32, device.
  const float* bias = nullptr;
  // Default: 0. Tokens; token t sits at absolute position start_position + t.
  int64_t n = 0;
  int64_t start_position = 0;
  // Default: null. When set, (1) device: read instead of start_position (a captured CUDA
  // graph replays with the position written there before each launch).
  const int64_t* start_position_device = nullptr;
  int num_heads = 0;
  int num_kv_heads = 0;
  // Default: 0. Even, in [2, 256].
  int head_dim = 0;
  // (head_dim / 2) device: ModelConfig::RopeInverseFrequencies(). As in engine/cpu_ops.cc's
  // ApplyRope the angle is position * inv_freq[i] in f64, its cos and sin rounded to f32, and
  // the rotation is done in f32 without FMA contraction.
  const double* inv_freq = nullptr;
  // (n, num_heads, head_dim) f32, device, out: rotated queries (observation windows, recall).
  float* q = nullptr;
  // Default: null. (n, num_heads, head_dim) T, device, out: the same queries rounded to T.
  T* q_t = nullptr;
  // (n, num_kv_heads, head_dim) T, device, out: rotated keys and values.
  T* k = nullptr;
  T* v = nullptr;
};

// cudaErrorInvalidValue for bad sizes; otherwise the launch error. n == 0 launches nothing.
// Instantiated for T = float, __nv_bfloat16 and __half.
template <typename T>
cudaError_t LaunchQkvRope(const QkvRopeParams<T>& p, cudaStream_t stream);

extern template cudaError_t LaunchQkvRope<float>(const QkvRopeParams<float>&, cudaStream_t);
extern template cudaError_t LaunchQkvRope<__nv_bfloat16>(const QkvRopeParams<__nv_bfloat16>&,
                                                         cudaStream_t);
extern template cudaError_t LaunchQkvRope<__half>(const QkvRopeParams<__half>&, cudaStream_t);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_QKV_ROPE_CUH_
