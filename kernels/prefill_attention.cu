#include <algorithm>
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

// Tensor-core path (16-bit T, head_dim D in {16, 32, 64, 128}), FlashAttention-2 style.
// Grid (ceil(n * group / kFaRows), num_kv_heads, splits), kFaWarps * 32 threads; rows are
// numbered as in PrefillKernel and warp w owns rows w * 16 .. w * 16 + 15. Split z covers
// entries [z * chunk, (z + 1) * chunk) (chunk a multiple of kFaTile). K/V tiles of kFaTile
// entries are staged in shared memory by cp.async, two deep, so the next tile's copy overlaps
// this tile's math. Per tile a warp computes S = Q K^T with mma.sync m16n8k16 (Q in registers
// for the whole pass, K by ldmatrix), the online softmax on the accumulators in registers (the
// four lanes of a quad share a row), then O += P V with P taken straight from S's registers
// (rounded to T) and V by ldmatrix.trans. With one split the output is written normalised;
// with several, each split writes its unnormalised f32 rows and (max, sum) for the combine.
constexpr int kFaWarps = 4;
constexpr int kFaRows = kFaWarps * 16;  // query rows per block
constexpr int kFaTile = 64;             // entries per K/V tile
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
__host__ __device__ constexpr int FaStride() {
  return D + 8;  // elements per staged row: 16 bytes of pad keep ldmatrix conflict-free
}
template <int D>
constexpr size_t FaSharedBytes() {
  return size_t{2} * 2 * kFaTile * FaStride<D>() * 2;  // 2 stages x (K, V) x rows x 2 bytes
}

#if defined(KVMEM_CUDA_EMULATOR)
// The same operations on the CUDA emulator (kernels/emu/emulator.h).
__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, int bytes) {
  cuda_emu::CopyAsync(dst, src, bytes);
}
__device__ __forceinline__ void CopyAsyncCommit() { cuda_emu::CopyAsyncCommit(); }
template <int kPending>
__device__ __forceinline__ void CopyAsyncWait() {
  cuda_emu::CopyAsyncWait(kPending);
}
__device__ __forceinline__ void LoadMatrixX4(uint32_t (&r)[4], const void* p) {
  cuda_emu::LoadMatrixX4(r, p, false);
}
__device__ __forceinline__ void LoadMatrixX4Trans(uint32_t (&r)[4], const void* p) {
  cuda_emu::LoadMatrixX4(r, p, true);
}
template <typename T>
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  cuda_emu::Mma16816(c, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
}
#else
__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global -> shared without staging in registers; bytes == 0 writes zeros.
__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(dst)),
               "l"(src), "r"(bytes));
}
__device__ __forceinline__ void CopyAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CopyAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void LoadMatrixX4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(p)));
}
__device__ __forceinline__ void LoadMatrixX4Trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(p)));
}

// c (16x8, f32) += a (16x16) b (16x8), both T; fragment layouts as in the PTX ISA.
template <typename T>
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
#endif  // KVMEM_CUDA_EMULATOR

// Two floats as a T pair in one register, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kFaWarps * 32, 2)
    PrefillFlashKernel(PrefillAttentionParams<T> p, int64_t chunk, float* part_o, float* part_ml) {
  constexpr int kStride = FaStride<D>();
  constexpr int kSteps = D / 16;  // k-steps of S = Q K^T
  constexpr int kDimTiles = D / 8;
  extern __shared__ __align__(128) uint8_t smem_fa[];
  T* s_k = reinterpret_cast<T*>(smem_fa);  // [2][kFaTile][kStride]
  T* s_v = s_k + 2 * kFaTile * kStride;    // [2][kFaTile][kStride]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int gid = lane / 4, tig = lane % 4;  // the fragment's row group and column pair
  const int g = blockIdx.y;
  const int group = p.num_heads / p.kv.num_kv_heads;
  const int64_t rows = p.n * group;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFaRows;
  const int64_t stride = p.kv.row_stride;  // set by the launcher
  const int64_t len =
      min(static_cast<int64_t>(p.kv.lengths[g]), static_cast<int64_t>(p.kv.max_length));
  const int64_t prefix = len - p.n;
  const T* keys = p.kv.keys[g];
  const T* values = p.kv.values[g];

  // Entries this block attends in this split: [begin, end).
  const int64_t block_last = prefix + (min(rows, row0 + kFaRows) - 1) / group;
  const int64_t begin = static_cast<int64_t>(blockIdx.z) * chunk;
  const int64_t end = min(begin + chunk, block_last + 1);

  // This lane's two rows (gid and gid + 8 of the warp's 16) and their last visible entries.
  const int64_t wrow0 = row0 + warp * 16;
  const int64_t r_lo = wrow0 + gid, r_hi = r_lo + 8;
  const int64_t vis_lo = r_lo < rows ? prefix + r_lo / group : -1;
  const int64_t vis_hi = r_hi < rows ? prefix + r_hi / group : -1;
  const int64_t warp_last = wrow0 < rows ? prefix + (min(rows, wrow0 + 16) - 1) / group : -1;

  // Q fragments for the whole pass (zeros for rows past the end).
  auto q_pair = [&](int64_t r, int d) -> uint32_t {
    if (r >= rows) return 0u;
    const int64_t t = r / group;
    const int h = g * group + static_cast<int>(r % group);
    return *reinterpret_cast<const uint32_t*>(p.q + (t * p.num_heads + h) * D + d);
  };
  uint32_t qf[kSteps][4];
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks) {
    qf[ks][0] = q_pair(r_lo, ks * 16 + tig * 2);
    qf[ks][1] = q_pair(r_hi, ks * 16 + tig * 2);
    qf[ks][2] = q_pair(r_lo, ks * 16 + 8 + tig * 2);
    qf[ks][3] = q_pair(r_hi, ks * 16 + 8 + tig * 2);
  }

  float o[kDimTiles][4];
#pragma unroll
  for (int j = 0; j < kDimTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;  // l: this lane's share
  const float scale = p.scale * kLog2e;  // logits in log2 units: exp2 below

  // Stages entries [k0, k0 + kFaTile) into buffer `stage`, zeros past `end`.
  auto stage_tile = [&](int stage, int64_t k0) {
    constexpr int kChunks = kFaTile * D / 8;  // 16-byte pieces per matrix
    for (int c = threadIdx.x; c < kChunks; c += kFaWarps * 32) {
      const int row = c / (D / 8), col = c % (D / 8) * 8;
      const int64_t e = k0 + row;
      const bool in = e < end;
      const int64_t src = (in ? e : 0) * stride + col;
      const int dst = (stage * kFaTile + row) * kStride + col;
      CopyAsync16(s_k + dst, keys + src, in ? 16 : 0);
      CopyAsync16(s_v + dst, values + src, in ? 16 : 0);
    }
  };

  if (begin < end) stage_tile(0, begin);
  CopyAsyncCommit();
  int stage = 0;
  for (int64_t k0 = begin; k0 < end; k0 += kFaTile, stage ^= 1) {
    if (k0 + kFaTile < end) stage_tile(stage ^ 1, k0 + kFaTile);
    CopyAsyncCommit();   // possibly empty: keeps one group per tile
    CopyAsyncWait<1>();  // this tile's copies are done (the next tile's may be in flight)
    __syncthreads();
    if (k0 <= warp_last) {  // warp-uniform
      const T* tk = s_k + stage * kFaTile * kStride;
      const T* tv = s_v + stage * kFaTile * kStride;
      // S (16 x kFaTile) = Q K^T, as kFaTile / 8 accumulators of 16 x 8.
      float sc[kFaTile / 8][4];
#pragma unroll
      for (int j = 0; j < kFaTile / 8; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
        for (int j = 0; j < kFaTile / 8; j += 2) {
          // Matrices: entries j*8.. and (j+1)*8.., dims ks*16 + 0..7 and + 8..15.
          const int mi = lane / 8;
          const int entry = (j + mi / 2) * 8 + lane % 8;
          uint32_t b[4];
          LoadMatrixX4(b, tk + entry * kStride + ks * 16 + (mi % 2) * 8);
          Mma16816<T>(sc[j], qf[ks], b[0], b[1]);
          Mma16816<T>(sc[j + 1], qf[ks], b[2], b[3]);
        }
      }
      // Mask, then the online softmax of rows lo (sc[.][0..1]) and hi (sc[.][2..3]).
      float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
      for (int j = 0; j < kFaTile / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t e = k0 + j * 8 + tig * 2 + (c & 1);
          const bool live = e <= (c < 2 ? vis_lo : vis_hi);
          sc[j][c] = live ? sc[j][c] * scale : -INFINITY;
        }
        mx_lo = fmaxf(mx_lo, fmaxf(sc[j][0], sc[j][1]));
        mx_hi = fmaxf(mx_hi, fmaxf(sc[j][2], sc[j][3]));
      }
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(kFullMask, mx_lo, 1));
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(kFullMask, mx_lo, 2));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(kFullMask, mx_hi, 1));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(kFullMask, mx_hi, 2));
      const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
      // A row with nothing visible yet keeps m = -inf and weights 0 (its alpha is 0, harmless:
      // its O and l are still 0).
      const float base_lo = new_lo == -INFINITY ? 0.f : new_lo;
      const float base_hi = new_hi == -INFINITY ? 0.f : new_hi;
      const float alpha_lo = exp2f(m_lo - base_lo), alpha_hi = exp2f(m_hi - base_hi);
      m_lo = new_lo;
      m_hi = new_hi;
      float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
      for (int j = 0; j < kFaTile / 8; ++j) {
        sc[j][0] = exp2f(sc[j][0] - base_lo);
        sc[j][1] = exp2f(sc[j][1] - base_lo);
        sc[j][2] = exp2f(sc[j][2] - base_hi);
        sc[j][3] = exp2f(sc[j][3] - base_hi);
        sum_lo += sc[j][0] + sc[j][1];
        sum_hi += sc[j][2] + sc[j][3];
      }
      l_lo = l_lo * alpha_lo + sum_lo;
      l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
      for (int j = 0; j < kDimTiles; ++j) {
        o[j][0] *= alpha_lo;
        o[j][1] *= alpha_lo;
        o[j][2] *= alpha_hi;
        o[j][3] *= alpha_hi;
      }
      // O (16 x D) += P (16 x kFaTile) V (kFaTile x D); P's A fragment for entries
      // kk*16 .. kk*16 + 15 is S's accumulators 2kk and 2kk + 1.
#pragma unroll
      for (int kk = 0; kk < kFaTile / 16; ++kk) {
        uint32_t pa[4];
        pa[0] = PackPair<T>(sc[2 * kk][0], sc[2 * kk][1]);
        pa[1] = PackPair<T>(sc[2 * kk][2], sc[2 * kk][3]);
        pa[2] = PackPair<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        pa[3] = PackPair<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
        for (int dn = 0; dn < kDimTiles; dn += 2) {
          // Matrices: entries kk*16 + 0..7 and + 8..15, dims dn*8.. and (dn+1)*8.. .
          const int mi = lane / 8;
          const int entry = kk * 16 + (mi % 2) * 8 + lane % 8;
          uint32_t b[4];
          LoadMatrixX4Trans(b, tv + entry * kStride + (dn + mi / 2) * 8);
          Mma16816<T>(o[dn], pa, b[0], b[1]);
          Mma16816<T>(o[dn + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  CopyAsyncWait<0>();

  l_lo += __shfl_xor_sync(kFullMask, l_lo, 1);
  l_lo += __shfl_xor_sync(kFullMask, l_lo, 2);
  l_hi += __shfl_xor_sync(kFullMask, l_hi, 1);
  l_hi += __shfl_xor_sync(kFullMask, l_hi, 2);
  auto write_row = [&](int64_t r, float m, float l, int c0) {
    if (r >= rows) return;
    if (part_o == nullptr) {
      const int64_t t = r / group;
      const int h = g * group + static_cast<int>(r % group);
      T* out = p.out + (t * p.num_heads + h) * D;
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int j = 0; j < kDimTiles; ++j) {
        *reinterpret_cast<uint32_t*>(out + j * 8 + tig * 2) =
            PackPair<T>(o[j][c0] * inv, o[j][c0 + 1] * inv);
      }
    } else {
      const int64_t slot = (static_cast<int64_t>(blockIdx.z) * p.kv.num_kv_heads + g) * rows + r;
      float* out = part_o + slot * D;
#pragma unroll
      for (int j = 0; j < kDimTiles; ++j) {
        *reinterpret_cast<float2*>(out + j * 8 + tig * 2) = make_float2(o[j][c0], o[j][c0 + 1]);
      }
      if (tig == 0) *reinterpret_cast<float2*>(part_ml + slot * 2) = make_float2(m, l);
    }
  };
  write_row(r_lo, m_lo, l_lo, 0);
  write_row(r_hi, m_hi, l_hi, 2);
}

// Grid (n * group, num_kv_heads), D threads: merges the splits of one row (max in log2 units,
// unnormalised sums) into the output.
template <typename T, int D>
__global__ void PrefillCombineKernel(PrefillAttentionParams<T> p, int splits, const float* part_o,
                                     const float* part_ml) {
  const int g = blockIdx.y;
  const int group = p.num_heads / p.kv.num_kv_heads;
  const int64_t rows = p.n * group;
  const int64_t r = blockIdx.x;
  const int d = threadIdx.x;
  float big = -INFINITY;
  for (int z = 0; z < splits; ++z) {
    const int64_t slot = (static_cast<int64_t>(z) * p.kv.num_kv_heads + g) * rows + r;
    if (part_ml[slot * 2 + 1] > 0.f) big = fmaxf(big, part_ml[slot * 2]);
  }
  float acc = 0.f, sum = 0.f;
  for (int z = 0; z < splits && big != -INFINITY; ++z) {
    const int64_t slot = (static_cast<int64_t>(z) * p.kv.num_kv_heads + g) * rows + r;
    const float l = part_ml[slot * 2 + 1];
    if (l <= 0.f) continue;  // a split this row sees nothing of: its O was never computed
    const float w = exp2f(part_ml[slot * 2] - big);
    acc += w * part_o[slot * D + d];
    sum += w * l;
  }
  const int64_t t = r / group;
  const int h = g * group + static_cast<int>(r % group);
  p.out[(t * p.num_heads + h) * D + d] = FromFloat<T>(sum > 0.f ? acc / sum : 0.f);
}

// Splits along the entries for grids too small to fill the device: enough blocks for about
// three per multiprocessor, each split at least 4 tiles.
int FlashSplits(int64_t n, int num_heads, int num_kv_heads, int32_t max_length) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    sms = 132;
  }
  const int64_t group = num_heads / num_kv_heads;
  const int64_t blocks = (n * group + kFaRows - 1) / kFaRows * num_kv_heads;
  const int64_t want = (3 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
  const int64_t most = std::max<int64_t>(1, max_length / (4 * kFaTile));
  return static_cast<int>(std::clamp<int64_t>(want, 1, std::min<int64_t>(most, 64)));
}

template <int D>
size_t FlashWorkspaceBytes(int splits, int64_t rows, int num_kv_heads) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(splits) * num_kv_heads * rows * (D + 2) * sizeof(float);
}

template <typename T, int D>
cudaError_t LaunchFlash(const PrefillAttentionParams<T>& p, cudaStream_t stream) {
  PrefillAttentionParams<T> dense = p;
  if (dense.kv.row_stride == 0) dense.kv.row_stride = D;
  const int64_t group = p.num_heads / p.kv.num_kv_heads;
  const int64_t rows = p.n * group;
  const int64_t row_blocks = (rows + kFaRows - 1) / kFaRows;
  if (row_blocks > INT32_MAX || rows > INT32_MAX) return cudaErrorInvalidValue;
  int splits = FlashSplits(p.n, p.num_heads, p.kv.num_kv_heads, p.kv.max_length);
  size_t ws = FlashWorkspaceBytes<D>(splits, rows, p.kv.num_kv_heads);
  if (ws > p.workspace_bytes || p.workspace == nullptr) {
    splits = 1;
    ws = 0;
  }
  const int64_t span = std::max<int64_t>(p.kv.max_length, 1);
  const int64_t chunk = splits == 1
                            ? span + kFaTile
                            : ((span + splits - 1) / splits + kFaTile - 1) / kFaTile * kFaTile;
  float* part_o = splits == 1 ? nullptr : static_cast<float*>(p.workspace);
  float* part_ml =
      splits == 1 ? nullptr : part_o + static_cast<size_t>(splits) * p.kv.num_kv_heads * rows * D;
  constexpr size_t smem = FaSharedBytes<D>();
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(PrefillFlashKernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  PrefillFlashKernel<T, D><<<dim3(static_cast<unsigned>(row_blocks), p.kv.num_kv_heads, splits),
                             kFaWarps * 32, smem, stream>>>(dense, chunk, part_o, part_ml);
  if (splits == 1) return cudaGetLastError();
  PrefillCombineKernel<T, D>
      <<<dim3(static_cast<unsigned>(rows), p.kv.num_kv_heads), D, 0, stream>>>(dense, splits,
                                                                               part_o, part_ml);
  return cudaGetLastError();
}

// Whether the tensor-core kernel takes this call, and its head_dim.
template <typename T>
bool UsesFlash(const PrefillAttentionParams<T>& p) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    const int hd = p.kv.head_dim;
    return p.tensor_cores && p.sliding_window <= 0 && p.kv.row_stride % 8 == 0 &&
           (hd == 16 || hd == 32 || hd == 64 || hd == 128);
  }
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
    if (UsesFlash(p)) {
      switch (hd) {
        case 16:
          return LaunchFlash<T, 16>(p, stream);
        case 32:
          return LaunchFlash<T, 32>(p, stream);
        case 64:
          return LaunchFlash<T, 64>(p, stream);
        default:
          return LaunchFlash<T, 128>(p, stream);
      }
    }
  }
  if (hd <= 32) return Launch<T, 1>(p, stream);
  if (hd <= 64) return Launch<T, 2>(p, stream);
  if (hd <= 128) return Launch<T, 4>(p, stream);
  return Launch<T, 8>(p, stream);
}

template <typename T>
size_t PrefillAttentionWorkspaceBytes(const PrefillAttentionParams<T>& p) {
  // Whatever LaunchPrefillAttention would reject takes no scratch.
  if (!UsesFlash(p) || p.n <= 0 || p.num_heads <= 0 || p.kv.num_kv_heads <= 0 ||
      p.num_heads % p.kv.num_kv_heads != 0 || p.kv.row_stride < 0 ||
      (p.kv.row_stride > 0 && p.kv.row_stride < p.kv.head_dim) ||
      p.n * (p.num_heads / p.kv.num_kv_heads) > INT32_MAX) {
    return 0;
  }
  const int splits = FlashSplits(p.n, p.num_heads, p.kv.num_kv_heads, p.kv.max_length);
  const int64_t rows = p.n * (p.num_heads / p.kv.num_kv_heads);
  switch (p.kv.head_dim) {
    case 16:
      return FlashWorkspaceBytes<16>(splits, rows, p.kv.num_kv_heads);
    case 32:
      return FlashWorkspaceBytes<32>(splits, rows, p.kv.num_kv_heads);
    case 64:
      return FlashWorkspaceBytes<64>(splits, rows, p.kv.num_kv_heads);
    default:
      return FlashWorkspaceBytes<128>(splits, rows, p.kv.num_kv_heads);
  }
}

template size_t PrefillAttentionWorkspaceBytes<float>(const PrefillAttentionParams<float>&);
template size_t PrefillAttentionWorkspaceBytes<__nv_bfloat16>(
    const PrefillAttentionParams<__nv_bfloat16>&);
template size_t PrefillAttentionWorkspaceBytes<__half>(const PrefillAttentionParams<__half>&);
template cudaError_t LaunchPrefillAttention<float>(const PrefillAttentionParams<float>&,
                                                   cudaStream_t);
template cudaError_t LaunchPrefillAttention<__nv_bfloat16>(
    const PrefillAttentionParams<__nv_bfloat16>&, cudaStream_t);
template cudaError_t LaunchPrefillAttention<__half>(const PrefillAttentionParams<__half>&,
                                                    cudaStream_t);

}  // namespace kvmem
