#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/kernel_utils.cuh"
#include "kernels/prefill_attention.cuh"

namespace kvmem {
namespace {

using kernel_utils::FromFloat;
using kernel_utils::kFullMask;
using kernel_utils::ToFloat;
using kernel_utils::WarpMax;
using kernel_utils::WarpSum;

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kTile = 32;                     // entries per K/V tile: one per lane
constexpr int kMaxHeadDim = 256;

size_t SharedBytes(int hd) {
  // q rows (kRows, hd); keys (kTile, hd + 1), padded so lane j reading row j is conflict-free;
  // values (kTile, hd); the tile's positions.
  return (static_cast<size_t>(kRows) * hd + kTile * (hd + 1) + kTile * hd) * sizeof(float) +
         kTile * sizeof(int64_t);
}

// Grid (ceil(n * group / kRows), num_kv_heads), kWarps * 32 threads. Row r of KV head g is new
// token r / group of query head g * group + r % group; warp w owns rows w * kRowsPerWarp + i.
// Per key tile: lane j scores entry k0 + j against each of the warp's rows (dot from shared
// memory), the warp updates that row's online softmax, and lane l accumulates output
// dimensions l, l + 32, ... with the tile's weights broadcast by shuffles.
template <typename T, int kDimsPerLane>
__global__ void __launch_bounds__(kWarps * 32) PrefillKernel(PrefillAttentionParams<T> p) {
  extern __shared__ float4 smem_f4[];
  const int hd = p.kv.head_dim;
  float* s_q = reinterpret_cast<float*>(smem_f4);
  float* s_k = s_q + kRows * hd;
  float* s_v = s_k + kTile * (hd + 1);
  int64_t* s_pos = reinterpret_cast<int64_t*>(s_v + kTile * hd);  // 8-byte aligned: see launch

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = blockIdx.y;
  const int group = p.num_heads / p.kv.num_kv_heads;
  const int64_t rows = p.n * group;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t stride = p.kv.row_stride;  // set by the launcher
  const int64_t len = min(p.kv.lengths[g], p.kv.max_length);
  const int64_t prefix = len - p.n;
  const T* keys = p.kv.keys[g];
  const T* values = p.kv.values[g];
  const int64_t* positions = p.sliding_window > 0 ? p.kv.positions[g] : nullptr;

  for (int idx = threadIdx.x; idx < kRows * hd; idx += blockDim.x) {
    const int64_t r = row0 + idx / hd;
    const int d = idx % hd;
    float v = 0.f;
    if (r < rows) {
      const int64_t t = r / group;
      const int h = g * group + static_cast<int>(r % group);
      v = ToFloat(p.q[(t * p.num_heads + h) * hd + d]);
    }
    s_q[idx] = v;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) acc[i][c] = 0.f;
  }

  // Entries [0, last] are visible to some row of the block.
  const int64_t last_row = min(rows, row0 + kRows) - 1;
  const int64_t last = prefix + last_row / group;
  for (int64_t k0 = 0; k0 <= last; k0 += kTile) {
    __syncthreads();  // the previous tile (and, first time, s_q writes) are done
    for (int idx = threadIdx.x; idx < kTile * hd; idx += blockDim.x) {
      const int j = idx / hd, d = idx % hd;
      const int64_t e = k0 + j;
      const bool in = e <= last;
      s_k[j * (hd + 1) + d] = in ? ToFloat(keys[e * stride + d]) : 0.f;
      s_v[j * hd + d] = in ? ToFloat(values[e * stride + d]) : 0.f;
    }
    if (positions != nullptr && threadIdx.x < kTile) {
      const int64_t e = k0 + threadIdx.x;
      s_pos[threadIdx.x] = e <= last ? positions[e] : 0;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int local = warp * kRowsPerWarp + i;
      const int64_t r = row0 + local;
      if (r >= rows) break;  // warp-uniform
      const int64_t t = r / group;
      const int64_t visible = prefix + t;  // last visible entry
      if (k0 > visible) continue;          // warp-uniform
      const int64_t e = k0 + lane;
      bool live = e <= visible;
      if (live && positions != nullptr) {
        live = p.start_position + t - s_pos[lane] < p.sliding_window;
      }
      float s = -INFINITY;
      if (live) {
        const float* qr = s_q + local * hd;
        const float* kr = s_k + lane * (hd + 1);
        float dot = 0.f;
        for (int d = 0; d < hd; ++d) dot += qr[d] * kr[d];
        s = dot * p.scale;
      }
      const float m_new = fmaxf(m[i], WarpMax(s));
      if (m_new == -INFINITY) continue;  // nothing visible in this tile or before
      const float alpha = expf(m[i] - m_new);
      const float w = expf(s - m_new);  // 0 for masked entries
      l[i] = l[i] * alpha + WarpSum(w);
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) acc[i][c] *= alpha;
      for (int j = 0; j < kTile; ++j) {
        const float wj = __shfl_sync(kFullMask, w, j);
#pragma unroll
        for (int c = 0; c < kDimsPerLane; ++c) {
          const int d = lane + 32 * c;
          if (d < hd) acc[i][c] += wj * s_v[j * hd + d];
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = row0 + warp * kRowsPerWarp + i;
    if (r >= rows) break;
    const int64_t t = r / group;
    const int h = g * group + static_cast<int>(r % group);
    T* o = p.out + (t * p.num_heads + h) * hd;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < hd) o[d] = FromFloat<T>(l[i] > 0.f ? acc[i][c] / l[i] : 0.f);
    }
  }
}

template <typename T, int kDimsPerLane>
cudaError_t Launch(const PrefillAttentionParams<T>& p, cudaStream_t stream) {
  PrefillAttentionParams<T> dense = p;
  if (dense.kv.row_stride == 0) dense.kv.row_stride = p.kv.head_dim;
  const int64_t group = p.num_heads / p.kv.num_kv_heads;
  const int64_t blocks = (p.n * group + kRows - 1) / kRows;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const size_t smem = SharedBytes(p.kv.head_dim);
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(PrefillKernel<T, kDimsPerLane>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  PrefillKernel<T, kDimsPerLane>
      <<<dim3(static_cast<unsigned>(blocks), p.kv.num_kv_heads), kWarps * 32, smem, stream>>>(
          dense);
  return cudaGetLastError();
}


// Tensor-core path (16-bit T). Grid (ceil(n * group / kMmaRows), num_kv_heads), kMmaWarps * 32
// threads; rows are numbered as in PrefillKernel and warp w owns rows w * 16 .. w * 16 + 15.
// Per tile of kMmaTile entries (staged in shared memory): S = Q K^T by WMMA into shared memory,
// the online softmax of each row by two lanes (32 columns each), the warp's output rows (f32,
// shared memory) rescaled, then O += P V by WMMA.
constexpr int kMmaWarps = 4;
constexpr int kMmaRows = kMmaWarps * 16;  // query rows per block
constexpr int kMmaTile = 64;              // entries per K/V tile

size_t MmaSharedBytes(int hd, size_t elem) {
  return (static_cast<size_t>(kMmaRows) * hd + 2 * kMmaTile * hd) * elem +  // q, k, v
         static_cast<size_t>(kMmaRows) * kMmaTile * sizeof(float) +         // scores
         static_cast<size_t>(kMmaRows) * kMmaTile * elem +                  // weights
         static_cast<size_t>(kMmaRows) * hd * sizeof(float) +               // output rows
         3 * static_cast<size_t>(kMmaRows) * sizeof(float);                 // m, l, alpha
}

template <typename T>
__global__ void __launch_bounds__(kMmaWarps * 32) PrefillMmaKernel(PrefillAttentionParams<T> p) {
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) float4 smem_mma[];  // WMMA pointers need 32-byte alignment
  const int hd = p.kv.head_dim;
  T* s_q = reinterpret_cast<T*>(smem_mma);
  T* s_k = s_q + kMmaRows * hd;
  T* s_v = s_k + kMmaTile * hd;
  float* s_s = reinterpret_cast<float*>(s_v + kMmaTile * hd);
  T* s_p = reinterpret_cast<T*>(s_s + kMmaRows * kMmaTile);
  float* s_o = reinterpret_cast<float*>(s_p + kMmaRows * kMmaTile);
  float* s_m = s_o + kMmaRows * hd;
  float* s_l = s_m + kMmaRows;
  float* s_alpha = s_l + kMmaRows;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = blockIdx.y;
  const int group = p.num_heads / p.kv.num_kv_heads;
  const int64_t rows = p.n * group;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMmaRows;
  const int64_t stride = p.kv.row_stride;  // set by the launcher
  const int64_t len = min(p.kv.lengths[g], p.kv.max_length);
  const int64_t prefix = len - p.n;
  const T* keys = p.kv.keys[g];
  const T* values = p.kv.values[g];
  const T zero = FromFloat<T>(0.f);

  for (int idx = threadIdx.x; idx < kMmaRows * hd; idx += blockDim.x) {
    const int64_t r = row0 + idx / hd;
    const int d = idx % hd;
    T v = zero;
    if (r < rows) {
      const int64_t t = r / group;
      const int h = g * group + static_cast<int>(r % group);
      v = p.q[(t * p.num_heads + h) * hd + d];
    }
    s_q[idx] = v;
    s_o[idx] = 0.f;
  }
  if (threadIdx.x < kMmaRows) {
    s_m[threadIdx.x] = -INFINITY;
    s_l[threadIdx.x] = 0.f;
  }

  // This warp's rows, and the last entry any of them sees.
  const int64_t wrow0 = row0 + warp * 16;
  const bool warp_live = wrow0 < rows;
  const int64_t warp_last = warp_live ? prefix + (min(rows, wrow0 + 16) - 1) / group : -1;
  const int64_t last_row = min(rows, row0 + kMmaRows) - 1;
  const int64_t last = prefix + last_row / group;
  float* w_s = s_s + warp * 16 * kMmaTile;
  T* w_p = s_p + warp * 16 * kMmaTile;
  float* w_o = s_o + warp * 16 * hd;
  const int row = lane / 2, half = lane % 2;  // the softmax's row and column half of a lane
  const int64_t my_r = wrow0 + row;
  const int64_t my_visible = my_r < rows ? prefix + my_r / group : -1;

  for (int64_t k0 = 0; k0 <= last; k0 += kMmaTile) {
    __syncthreads();  // the previous tile (and, first time, the q and o writes) are done
    for (int idx = threadIdx.x; idx < kMmaTile * hd; idx += blockDim.x) {
      const int64_t e = k0 + idx / hd;
      const int d = idx % hd;
      const bool in = e <= last;
      s_k[idx] = in ? keys[e * stride + d] : zero;
      s_v[idx] = in ? values[e * stride + d] : zero;
    }
    __syncthreads();
    if (k0 > warp_last) continue;  // warp-uniform: every row of the warp is past its entries

    // S (16, kMmaTile) = Q (16, hd) K^T.
    for (int jt = 0; jt < kMmaTile / 16; ++jt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kt = 0; kt < hd / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, s_q + warp * 16 * hd + kt * 16, hd);
        wmma::load_matrix_sync(b, s_k + jt * 16 * hd + kt * 16, hd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(w_s + jt * 16, acc, kMmaTile, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax: lanes 2i and 2i + 1 share row i, 32 columns each, visited in an order
    // rotated by lane so the warp's shared-memory accesses fall in distinct banks.
    float sc[32];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int c = half * 32 + ((i + lane) & 31);
      const bool live = k0 + c <= my_visible;
      sc[i] = live ? w_s[row * kMmaTile + c] * p.scale : -INFINITY;
      mx = fmaxf(mx, sc[i]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
    const float m_old = s_m[warp * 16 + row];
    const float m_new = fmaxf(m_old, mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int c = half * 32 + ((i + lane) & 31);
      const float w = m_new == -INFINITY ? 0.f : expf(sc[i] - m_new);
      w_p[row * kMmaTile + c] = FromFloat<T>(w);
      sum += w;
    }
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    const float alpha = m_new == -INFINITY ? 1.f : expf(m_old - m_new);
    __syncwarp();
    if (half == 0) {
      s_l[warp * 16 + row] = s_l[warp * 16 + row] * alpha + sum;
      s_m[warp * 16 + row] = m_new;
      s_alpha[warp * 16 + row] = alpha;
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * hd; idx += 32) w_o[idx] *= s_alpha[warp * 16 + idx / hd];
    __syncwarp();

    // O (16, hd) += P (16, kMmaTile) V (kMmaTile, hd).
    for (int dt = 0; dt < hd / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, w_o + dt * 16, hd, wmma::mem_row_major);
      for (int kt = 0; kt < kMmaTile / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, w_p + kt * 16, kMmaTile);
        wmma::load_matrix_sync(b, s_v + kt * 16 * hd + dt * 16, hd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(w_o + dt * 16, acc, hd, wmma::mem_row_major);
    }
    __syncwarp();
  }

  __syncwarp();
  for (int idx = lane; idx < 16 * hd; idx += 32) {
    const int64_t r = wrow0 + idx / hd;
    if (r >= rows) break;  // rows only grow with idx
    const int d = idx % hd;
    const int64_t t = r / group;
    const int h = g * group + static_cast<int>(r % group);
    const float l = s_l[warp * 16 + idx / hd];
    p.out[(t * p.num_heads + h) * hd + d] = FromFloat<T>(l > 0.f ? w_o[idx] / l : 0.f);
  }
}

template <typename T>
cudaError_t LaunchMma(const PrefillAttentionParams<T>& p, cudaStream_t stream) {
  PrefillAttentionParams<T> dense = p;
  if (dense.kv.row_stride == 0) dense.kv.row_stride = p.kv.head_dim;
  const int64_t group = p.num_heads / p.kv.num_kv_heads;
  const int64_t blocks = (p.n * group + kMmaRows - 1) / kMmaRows;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const size_t smem = MmaSharedBytes(p.kv.head_dim, sizeof(T));
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(PrefillMmaKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  PrefillMmaKernel<T>
      <<<dim3(static_cast<unsigned>(blocks), p.kv.num_kv_heads), kMmaWarps * 32, smem, stream>>>(
          dense);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t LaunchPrefillAttention(const PrefillAttentionParams<T>& p, cudaStream_t stream) {
  const int hd = p.kv.head_dim;
  if (hd <= 0 || hd > kMaxHeadDim || p.kv.num_kv_heads <= 0 || p.num_heads <= 0 ||
      p.num_heads % p.kv.num_kv_heads != 0 || p.n < 0 || p.kv.row_stride < 0 ||
      (p.kv.row_stride > 0 && p.kv.row_stride < hd)) {
    return cudaErrorInvalidValue;
  }
  if (p.n == 0) return cudaSuccess;
  // The int64 positions follow (kRows + 2 * kTile) * hd + kTile floats: an even count, so they
  // are 8-byte aligned.
  static_assert((kRows + 2 * kTile) % 2 == 0 && kTile % 2 == 0, "positions alignment");
  if constexpr (!std::is_same_v<T, float>) {
    if (p.tensor_cores && hd % 16 == 0 && hd <= 128 && p.sliding_window <= 0) {
      return LaunchMma(p, stream);
    }
  }
  if (hd <= 32) return Launch<T, 1>(p, stream);
  if (hd <= 64) return Launch<T, 2>(p, stream);
  if (hd <= 128) return Launch<T, 4>(p, stream);
  return Launch<T, 8>(p, stream);
}

template cudaError_t LaunchPrefillAttention<float>(const PrefillAttentionParams<float>&,
                                                   cudaStream_t);
template cudaError_t LaunchPrefillAttention<__nv_bfloat16>(
    const PrefillAttentionParams<__nv_bfloat16>&, cudaStream_t);
template cudaError_t LaunchPrefillAttention<__half>(const PrefillAttentionParams<__half>&,
                                                    cudaStream_t);

}  // namespace kvmem
