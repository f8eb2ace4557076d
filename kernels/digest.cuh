// Block digests for recall (Quest): per-dimension min and max of a block's keys per KV head,
// and the digest score, an upper bound of q . k over the block.
#ifndef KVMEM_KERNELS_DIGEST_CUH_
#define KVMEM_KERNELS_DIGEST_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvmem {

// Keys of num_blocks blocks of block_size positions and num_kv_heads heads (device, f32):
// element d of the key at slot s of block b for head g is
//   keys[b * block_stride + s * slot_stride + g * head_stride + d].
// KvBlock layout (B, num_kv_heads, head_dim) back to back is block_stride = B * kvh * hd,
// slot_stride = kvh * hd, head_stride = hd.
struct DigestInput {
  const float* keys = nullptr;
  // Default: null (every block full). (num_blocks) device: slots written per block, in [0, B].
  const int32_t* filled = nullptr;
  // Default: 0.
  int num_blocks = 0;
  // Default: 0. B.
  int block_size = 0;
  // Default: 0.
  int num_kv_heads = 0;
  // Default: 0.
  int head_dim = 0;
  // Default: 0. Strides in elements, as above.
  int64_t block_stride = 0;
  int64_t slot_stride = 0;
  int64_t head_stride = 0;
};

// digests (num_blocks, num_kv_heads, 2, head_dim) f32, device, out: [0] = min and [1] = max
// over the filled slots, bit-identical to ComputeDigest in engine/kv_store.h block by block
// (a block with nothing filled gets +inf / -inf). One thread per (block, head, dimension).
// cudaErrorInvalidValue for negative sizes; otherwise the launch error.
cudaError_t LaunchComputeDigests(const DigestInput& in, float* digests, cudaStream_t stream);

// scores (num_kv_heads, num_blocks) f32, device, out:
//   scores[g][b] = max over query heads h of group g and rows i < w of
//                  sum_d max(q_d min_d, q_d max_d),  q = queries + i * q_row_stride + h * head_dim
// with the sum in the CPU's element order and no FMA: bit-identical to the loop over
// DigestScore in Session::Recall, so ranking on the host picks the same blocks.
// queries: (w, ...) f32 device rows (e.g. the last w of the turn's (n, num_heads, head_dim)
// queries: q_row_stride = num_heads * head_dim). digests as written by LaunchComputeDigests.
// One thread per (head, block); w == 0 gives -inf everywhere.
// cudaErrorInvalidValue for bad head counts or negative sizes; otherwise the launch error.
cudaError_t LaunchDigestScores(const float* queries, int w, int64_t q_row_stride, int num_heads,
                               int num_kv_heads, int head_dim, const float* digests, int num_blocks,
                               float* scores, cudaStream_t stream);

}  // namespace kvmem

#endif  // KVMEM_KERNELS_DIGEST_CUH_
