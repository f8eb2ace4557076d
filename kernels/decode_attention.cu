#include <cmath>
#include <cstdint>

#include "kernels/decode_attention.cuh"
#include "kernels/kernel_utils.cuh"

namespace kvmem {
namespace {

using kernel_utils::FromFloat;
using kernel_utils::ToFloat;
using kernel_utils::WarpMax;
using kernel_utils::WarpSum;

constexpr int kWarps = 4;             // warps per block; each walks every kWarps-th entry
constexpr int kMaxGroupPerBlock = 8;  // query heads of one KV head sharing a block's K/V reads
constexpr int kDefaultSplit = 256;
constexpr int kMaxHeadDim = 256;

int SplitSize(int split_size) { return split_size > 0 ? split_size : kDefaultSplit; }
int NumSplits(int32_t max_length, int split_size) {
  return max_length <= 0 ? 1 : (max_length + SplitSize(split_size) - 1) / SplitSize(split_size);
}

// Grid (splits, num_kv_heads, ceil(group / kMaxGroupPerBlock)), kWarps * 32 threads.
// Lane l holds dimensions l, l + 32, ... (kDimsPerLane of them) of each query, key, value and
// accumulator row, so every key and value row is read as coalesced 32-lane accesses, once for
// all the block's query heads. Each warp keeps an online softmax (running max m, running sum l,
// unnormalised output) per query head; the warps are merged in shared memory at the end.
// With one split the block writes the normalised output; otherwise its (m, l, output) partial.
template <typename T, int kDimsPerLane>
__global__ void __launch_bounds__(kWarps * 32)
    DecodeSplitKernel(DecodeAttentionParams<T> p, int split_size, float* partial_out,
                      float* partial_ml) {
  constexpr int kDims = kDimsPerLane * 32;
  __shared__ float s_m[kWarps][kMaxGroupPerBlock];
  __shared__ float s_l[kWarps][kMaxGroupPerBlock];
  __shared__ float s_acc[kWarps][kMaxGroupPerBlock][kDims];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int split = blockIdx.x, g = blockIdx.y;
  const int group = p.num_heads / p.kv.num_kv_heads;
  const int h0 = g * group + blockIdx.z * kMaxGroupPerBlock;
  const int nh = min(kMaxGroupPerBlock, group - static_cast<int>(blockIdx.z) * kMaxGroupPerBlock);
  const int hd = p.kv.head_dim;
  const int64_t stride = p.kv.row_stride;  // set by the launcher
  const int32_t len = min(p.kv.lengths[g], p.kv.max_length);
  const int64_t begin = static_cast<int64_t>(split) * split_size;
  const int64_t end = min(static_cast<int64_t>(len), begin + split_size);
  const T* keys = p.kv.keys[g];
  const T* values = p.kv.values[g];
  const int64_t* positions = p.sliding_window > 0 ? p.kv.positions[g] : nullptr;

  float q[kMaxGroupPerBlock][kDimsPerLane];
  float m[kMaxGroupPerBlock], l[kMaxGroupPerBlock], acc[kMaxGroupPerBlock][kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kMaxGroupPerBlock; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + 32 * c;
      q[i][c] = i < nh && d < hd ? ToFloat(p.q[static_cast<int64_t>(h0 + i) * hd + d]) : 0.f;
      acc[i][c] = 0.f;
    }
  }

  for (int64_t j = begin + warp; j < end; j += kWarps) {
    if (positions != nullptr && p.q_position - positions[j] >= p.sliding_window) continue;
    float k[kDimsPerLane], v[kDimsPerLane];
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + 32 * c;
      k[c] = d < hd ? ToFloat(keys[j * stride + d]) : 0.f;
      v[c] = d < hd ? ToFloat(values[j * stride + d]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kMaxGroupPerBlock; ++i) {
      if (i >= nh) break;
      float dot = 0.f;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) dot += q[i][c] * k[c];
      const float s = WarpSum(dot) * p.scale;
      const float m_new = fmaxf(m[i], s);
      const float alpha = expf(m[i] - m_new);  // 0 while m[i] is -inf
      const float w = expf(s - m_new);
      l[i] = l[i] * alpha + w;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) acc[i][c] = acc[i][c] * alpha + w * v[c];
      m[i] = m_new;
    }
  }

#pragma unroll
  for (int i = 0; i < kMaxGroupPerBlock; ++i) {
    if (lane == 0) {
      s_m[warp][i] = m[i];
      s_l[warp][i] = l[i];
    }
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) s_acc[warp][i][lane + 32 * c] = acc[i][c];
  }
  __syncthreads();

  const int num_splits = gridDim.x;
  for (int idx = threadIdx.x; idx < nh * hd; idx += blockDim.x) {
    const int i = idx / hd, d = idx % hd;
    float big = -INFINITY;
    for (int w = 0; w < kWarps; ++w) big = fmaxf(big, s_m[w][i]);
    float sum = 0.f, out = 0.f;
    if (big != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) {
        const float f = expf(s_m[w][i] - big);
        sum += s_l[w][i] * f;
        out += s_acc[w][i][d] * f;
      }
    }
    const int h = h0 + i;
    if (num_splits == 1) {
      p.out[static_cast<int64_t>(h) * hd + d] = FromFloat<T>(sum > 0.f ? out / sum : 0.f);
    } else {
      partial_out[(static_cast<int64_t>(h) * num_splits + split) * hd + d] = out;
      if (d == 0) {
        partial_ml[(static_cast<int64_t>(h) * num_splits + split) * 2] = big;
        partial_ml[(static_cast<int64_t>(h) * num_splits + split) * 2 + 1] = sum;
      }
    }
  }
}

// One block per query head; thread d merges dimension d over the splits.
template <typename T>
__global__ void DecodeCombineKernel(int num_splits, int head_dim, const float* partial_out,
                                    const float* partial_ml, T* out) {
  const int64_t h = blockIdx.x;
  const float* ml = partial_ml + h * num_splits * 2;
  float big = -INFINITY;
  for (int s = 0; s < num_splits; ++s) big = fmaxf(big, ml[2 * s]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.f, acc = 0.f;
    if (big != -INFINITY) {
      for (int s = 0; s < num_splits; ++s) {
        const float f = expf(ml[2 * s] - big);  // 0 for an empty split (m = -inf)
        sum += ml[2 * s + 1] * f;
        acc += partial_out[(h * num_splits + s) * head_dim + d] * f;
      }
    }
    out[h * head_dim + d] = FromFloat<T>(sum > 0.f ? acc / sum : 0.f);
  }
}

template <typename T, int kDimsPerLane>
cudaError_t Launch(const DecodeAttentionParams<T>& p, int split_size, int num_splits,
                   float* partial_out, float* partial_ml, cudaStream_t stream) {
  const int group = p.num_heads / p.kv.num_kv_heads;
  DecodeAttentionParams<T> dense = p;
  if (dense.kv.row_stride == 0) dense.kv.row_stride = p.kv.head_dim;
  const dim3 grid(num_splits, p.kv.num_kv_heads,
                  (group + kMaxGroupPerBlock - 1) / kMaxGroupPerBlock);
  DecodeSplitKernel<T, kDimsPerLane>
      <<<grid, kWarps * 32, 0, stream>>>(dense, split_size, partial_out, partial_ml);
  if (num_splits > 1) {
    DecodeCombineKernel<T><<<p.num_heads, 128, 0, stream>>>(num_splits, p.kv.head_dim, partial_out,
                                                            partial_ml, p.out);
  }
  return cudaGetLastError();
}

}  // namespace

size_t DecodeAttentionWorkspaceBytes(int num_heads, int head_dim, int32_t max_length,
                                     int split_size) {
  const int splits = NumSplits(max_length, split_size);
  if (splits <= 1) return 0;
  return static_cast<size_t>(num_heads) * splits * (head_dim + 2) * sizeof(float);
}

template <typename T>
cudaError_t LaunchDecodeAttention(const DecodeAttentionParams<T>& p, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream) {
  const int hd = p.kv.head_dim;
  if (hd <= 0 || hd > kMaxHeadDim || p.kv.num_kv_heads <= 0 || p.num_heads <= 0 ||
      p.num_heads % p.kv.num_kv_heads != 0 || p.split_size < 0 || p.kv.max_length < 0 ||
      p.kv.row_stride < 0 || (p.kv.row_stride > 0 && p.kv.row_stride < hd)) {
    return cudaErrorInvalidValue;
  }
  const int split_size = SplitSize(p.split_size);
  const int num_splits = NumSplits(p.kv.max_length, p.split_size);
  if (workspace_bytes <
      DecodeAttentionWorkspaceBytes(p.num_heads, hd, p.kv.max_length, p.split_size)) {
    return cudaErrorInvalidValue;
  }
  float* partial_out = static_cast<float*>(workspace);
  float* partial_ml =
      num_splits > 1 ? partial_out + static_cast<int64_t>(p.num_heads) * num_splits * hd : nullptr;
  if (hd <= 32) return Launch<T, 1>(p, split_size, num_splits, partial_out, partial_ml, stream);
  if (hd <= 64) return Launch<T, 2>(p, split_size, num_splits, partial_out, partial_ml, stream);
  if (hd <= 128) return Launch<T, 4>(p, split_size, num_splits, partial_out, partial_ml, stream);
  return Launch<T, 8>(p, split_size, num_splits, partial_out, partial_ml, stream);
}

template cudaError_t LaunchDecodeAttention<float>(const DecodeAttentionParams<float>&, void*,
                                                  size_t, cudaStream_t);
template cudaError_t LaunchDecodeAttention<__nv_bfloat16>(
    const DecodeAttentionParams<__nv_bfloat16>&, void*, size_t, cudaStream_t);
template cudaError_t LaunchDecodeAttention<__half>(const DecodeAttentionParams<__half>&, void*,
                                                   size_t, cudaStream_t);

}  // namespace kvmem
