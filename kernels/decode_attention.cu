#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/decode_attention.cuh"
#include "kernels/kernel_utils.cuh"

namespace kvmem {
namespace {

using kernel_utils::FromFloat;
using kernel_utils::kFullMask;
using kernel_utils::ToFloat;
using kernel_utils::WarpMax;
using kernel_utils::WarpSum;

constexpr int kThreads = 128;  // split kernel block
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroupPerBlock = 8;  // query heads of one KV head sharing a block's K/V reads
constexpr int kTileLogits = 1024;     // logits a block holds in shared memory: a tile of
                                      // kTileLogits / kHeads entries
constexpr int kDefaultSplit = 256;
constexpr int kMaxHeadDim = 256;
constexpr int kCombineThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

int SplitSize(int split_size) { return split_size > 0 ? split_size : kDefaultSplit; }
// In 64 bits: a launch bound near INT32_MAX (a captured graph's) must not wrap.
int NumSplits(int32_t max_length, int split_size) {
  if (max_length <= 0) return 1;
  const int64_t split = SplitSize(split_size);
  return static_cast<int>((int64_t{max_length} + split - 1) / split);
}

// kVec consecutive elements of a row as loaded: one T, or 16 bytes as a uint4.
template <typename T, int kVec>
using Packed = std::conditional_t<kVec == 1, T, uint4>;

template <typename T, int kVec>
__device__ __forceinline__ Packed<T, kVec> ZeroPacked() {
  if constexpr (kVec == 1) {
    return FromFloat<T>(0.f);
  } else {
    return make_uint4(0u, 0u, 0u, 0u);
  }
}

// Elements src[0, kVec): one 16-byte load when kAligned (src 16-byte aligned), else kVec
// element loads.
template <typename T, int kVec, bool kAligned>
__device__ __forceinline__ Packed<T, kVec> LoadPacked(const T* src) {
  static_assert(kVec == 1 || kVec * sizeof(T) == 16, "a chunk is one element or 16 bytes");
  if constexpr (kVec == 1) {
    return *src;
  } else if constexpr (kAligned) {
    return __ldg(reinterpret_cast<const uint4*>(src));
  } else if constexpr (sizeof(T) == 4) {
    const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
    return make_uint4(s[0], s[1], s[2], s[3]);
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = s[2 * i] | static_cast<uint32_t>(s[2 * i + 1]) << 16;
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// The two T of a 32-bit word (the first in the low half) as floats.
template <typename T>
__device__ __forceinline__ float2 UnpackPair(uint32_t w) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  } else {
    static_assert(std::is_same_v<T, __half>);
    __half2 h;
    static_assert(sizeof(h) == sizeof(w));
    memcpy(&h, &w, sizeof(w));
    return __half22float2(h);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void Unpack(const Packed<T, kVec>& x, float (&f)[kVec]) {
  if constexpr (kVec == 1) {
    f[0] = ToFloat(x);
  } else {
    const uint32_t w[4] = {x.x, x.y, x.z, x.w};
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(w[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 pair = UnpackPair<T>(w[i]);
        f[2 * i] = pair.x;
        f[2 * i + 1] = pair.y;
      }
    }
  }
}

// Sums v[0, kN) over each aligned group of kWidth lanes (powers of two, kN <= kWidth) with
// kN - 1 + log2(kWidth / kN) shuffles instead of kN * log2(kWidth): while a lane has several
// values, it keeps one half of them and adds its partner's copy of that half. On return v[0] of
// lane l holds the group's sum of value (l % kWidth) * kN / kWidth.
template <int kN, int kWidth>
__device__ __forceinline__ void GroupSumSpread(float* v, int lane) {
  static_assert(kN >= 1 && kN <= kWidth, "one value per lane at least");
  if constexpr (kWidth > 1) {
    constexpr int kOffset = kWidth / 2;
    if constexpr (kN > 1) {
      constexpr int kHalf = kN / 2;
      const bool upper = (lane & kOffset) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, kOffset);
      }
      GroupSumSpread<kHalf, kOffset>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], kOffset);
      GroupSumSpread<1, kOffset>(v, lane);
    }
  }
}

// Per-block layout of the split kernel. A "key group" of kLanes consecutive lanes shares one
// entry; lane t of the group holds row elements [(c * kLanes + t) * kVec, + kVec) for c < kChunks
// (of the query, key, value and output rows alike), so a group reads a row in kChunks coalesced
// kLanes-wide accesses and the block has kThreads / kLanes entries in flight per access.
template <typename T, int kVec, int kLanes, int kChunks>
struct SplitLayout {
  static_assert(kLanes >= 1 && kLanes <= 32 && 32 % kLanes == 0, "key groups tile a warp");
  static constexpr int kGroups = kThreads / kLanes;  // entries per block-wide step
  static constexpr int kPerLane = kChunks * kVec;    // row elements per lane
  static constexpr int kDims = kLanes * kPerLane;    // row elements per group (>= head_dim)
  // Entries each group loads before using any: about 32 registers of rows per lane in flight.
  static constexpr int kRowRegs = kVec == 1 ? kChunks : kChunks * 4;
  static constexpr int kUnroll = kRowRegs >= 32 ? 1 : (32 / kRowRegs > 8 ? 8 : 32 / kRowRegs);
};

// The split kernel's shared memory: at most 8 + 32 + 4 + 1 KB, under the 48 KB of static shared
// memory. Queries and output sums live here between tiles so that registers hold only one of
// them at a time (the key pass needs the queries, the value pass the sums).
template <int kHeads, int kGroups, int kDims>
struct SplitShared {
  static constexpr int kTile = kTileLogits / kHeads;  // entries per tile
  alignas(16) float q[kHeads][kDims];                 // queries scaled to log2 logits, zero-padded
  alignas(16) float acc[kGroups][kHeads][kDims];      // each key group's unnormalised output
  alignas(16) float p[kTile][kHeads];  // the tile's logits (log2 units), then weights
  float m[kHeads];                     // running max logit, log2 units
  float l[kHeads];                     // running sum of 2^(logit - m)
  float alpha[kHeads];                 // the current tile's rescale of the older sums
  bool visible[kTile];  // the tile's entries inside the sliding window (only with a window)
};

// Registers r[0, kVec) to or from shared memory at s, 16 bytes at a time when kVec allows (s then
// 16-byte aligned).
template <int kVec>
__device__ __forceinline__ void StoreShared(float* s, const float* r) {
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int e = 0; e < kVec; e += 4) {
      *reinterpret_cast<float4*>(s + e) = make_float4(r[e], r[e + 1], r[e + 2], r[e + 3]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) s[e] = r[e];
  }
}
template <int kVec>
__device__ __forceinline__ void LoadShared(float* r, const float* s) {
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int e = 0; e < kVec; e += 4) {
      const float4 x = *reinterpret_cast<const float4*>(s + e);
      r[e] = x.x;
      r[e + 1] = x.y;
      r[e + 2] = x.z;
      r[e + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) r[e] = s[e];
  }
}

// One block's share of DecodeSplitKernel (see there); kAligned: every row is 16-byte aligned.
template <typename T, int kVec, int kLanes, int kChunks, int kHeads, bool kAligned>
__device__ __forceinline__ void DecodeSplitBlock(
    const DecodeAttentionParams<T>& p, int split_size, float* partial_out, float* partial_ml,
    SplitShared<kHeads, SplitLayout<T, kVec, kLanes, kChunks>::kGroups,
                SplitLayout<T, kVec, kLanes, kChunks>::kDims>& s) {
  using Layout = SplitLayout<T, kVec, kLanes, kChunks>;
  constexpr int kGroups = Layout::kGroups, kPerLane = Layout::kPerLane, kDims = Layout::kDims;
  // Unaligned rows take kVec element loads per vector, each in its own register: fewer entries.
  constexpr int kUnroll = kAligned ? Layout::kUnroll : (Layout::kUnroll + 3) / 4;
  constexpr int kStep = kGroups * kUnroll;  // entries per block-wide batch of loads
  static_assert((kUnroll & (kUnroll - 1)) == 0 && kUnroll <= kLanes, "GroupSumSpread's shape");
  constexpr int kLanesPerEntry = kLanes / kUnroll;  // lanes holding one logit after reduction
  constexpr int kPair = kHeads >= 2 ? 2 : 1;        // heads sharing one conversion of the keys

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int kg = threadIdx.x / kLanes, t = threadIdx.x % kLanes;
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
  const int64_t q_position =
      positions != nullptr && p.q_position_device != nullptr ? *p.q_position_device : p.q_position;

  // Block-wide setup, first read after the first barrier below.
  if (threadIdx.x < kHeads) {
    s.m[threadIdx.x] = -INFINITY;
    s.l[threadIdx.x] = 0.f;
  }
  const float q_scale = p.scale * kLog2e;  // q . k is then the logit in log2 units: exp2 below
  for (int idx = threadIdx.x; idx < kHeads * kDims; idx += kThreads) {
    const int h = idx / kDims, d = idx % kDims;
    s.q[h][d] =
        h < nh && d < hd ? ToFloat(p.q[static_cast<int64_t>(h0 + h) * hd + d]) * q_scale : 0.f;
  }
  // This thread's slots of s.acc (only it touches them until the final merge).
  const auto acc_slot = [&](int h, int c) { return &s.acc[kg][h][(c * kLanes + t) * kVec]; };
  {
    float zeros[kVec] = {};
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) StoreShared<kVec>(acc_slot(h, c), zeros);
    }
  }

  // Issues the loads of rows [0, kUnroll) of a batch: entry i0 + u * kGroups + kg of the tile at
  // t0 (rows at `base`), zeros and live false past the tile or outside the window.
  const auto load_batch = [&](const T* base, int64_t t0, int n, int i0,
                              Packed<T, kVec>(&x)[kUnroll][kChunks], bool(&live)[kUnroll]) {
    const T* row = base + (t0 + i0 + kg) * stride;
    const int64_t row_step = kGroups * stride;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u, row += row_step) {
      const int i = i0 + u * kGroups + kg;
      live[u] = i < n && (positions == nullptr || s.visible[i]);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int col = (c * kLanes + t) * kVec;
        x[u][c] = ZeroPacked<T, kVec>();
        if (live[u] && col < hd) x[u][c] = LoadPacked<T, kVec, kAligned>(row + col);
      }
    }
  };

  __syncthreads();

  constexpr int kTile = SplitShared<kHeads, kGroups, kDims>::kTile;
#pragma unroll 1
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), end - t0));
    if (positions != nullptr) {
      int any = 0;
      for (int i = threadIdx.x; i < kTile; i += kThreads) {
        const bool vis = i < n && q_position - positions[t0 + i] < p.sliding_window;
        s.visible[i] = vis;
        any |= vis;
      }
      if (!__syncthreads_or(any)) continue;  // the whole tile is outside the window
    }

    // Logits, kPair heads at a time: each lane dots its elements of the batch's keys (converted
    // to f32 once per pair) with the heads' queries (read from shared memory once per batch),
    // then GroupSumSpread leaves entry t / kLanesPerEntry's logit in lane t, which writes it.
#pragma unroll 1
    for (int i0 = 0; i0 < n; i0 += kStep) {
      Packed<T, kVec> k[kUnroll][kChunks];
      bool live[kUnroll];
      load_batch(keys, t0, n, i0, k, live);
      const int i_w = i0 + t / kLanesPerEntry * kGroups + kg;  // the entry this lane writes
      const bool writer = t % kLanesPerEntry == 0 && i_w < n;
      const bool live_w = writer && (positions == nullptr || s.visible[i_w]);
#pragma unroll
      for (int hp = 0; hp < kHeads; hp += kPair) {
        float q[kPair][kPerLane];
#pragma unroll
        for (int j = 0; j < kPair; ++j) {
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            LoadShared<kVec>(&q[j][c * kVec], &s.q[hp + j][(c * kLanes + t) * kVec]);
          }
        }
        float dot[kPair][kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int j = 0; j < kPair; ++j) dot[j][u] = 0.f;
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            float kf[kVec];
            Unpack<T, kVec>(k[u][c], kf);
#pragma unroll
            for (int j = 0; j < kPair; ++j) {
#pragma unroll
              for (int e = 0; e < kVec; ++e) {
                dot[j][u] = fmaf(q[j][c * kVec + e], kf[e], dot[j][u]);
              }
            }
          }
        }
#pragma unroll
        for (int j = 0; j < kPair; ++j) {
          GroupSumSpread<kUnroll, kLanes>(dot[j], lane);
          if (writer) s.p[i_w][hp + j] = live_w ? dot[j][0] : -INFINITY;
        }
      }
    }
    __syncthreads();

    // Softmax statistics, one warp per head: the tile's max joins the running max, the tile's
    // logits become weights 2^(logit - m) and the running sum is rescaled and extended.
    for (int h = warp; h < kHeads; h += kWarps) {
      float big = -INFINITY;
      for (int i = lane; i < n; i += 32) big = fmaxf(big, s.p[i][h]);
      big = WarpMax(big);
      const float m_old = s.m[h];
      const float m_new = fmaxf(m_old, big);
      float sum = 0.f;
      for (int i = lane; i < n; i += 32) {
        // Every logit is -inf when m_new is: weight 0 rather than 2^(-inf + inf) = NaN.
        const float w = m_new == -INFINITY ? 0.f : exp2f(s.p[i][h] - m_new);
        s.p[i][h] = w;
        sum += w;
      }
      sum = WarpSum(sum);
      __syncwarp();  // every lane has read s.m[h] before lane 0 rewrites it
      if (lane == 0) {
        const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_old - m_new);  // 0 if m_old = -inf
        s.alpha[h] = alpha;
        s.l[h] = s.l[h] * alpha + sum;
        s.m[h] = m_new;
      }
    }
    __syncthreads();

    // Weighted values: each lane accumulates its elements of every head's output.
    {
      float acc[kHeads][kPerLane];
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        const float alpha = s.alpha[h];
#pragma unroll
        for (int c = 0; c < kChunks; ++c) LoadShared<kVec>(&acc[h][c * kVec], acc_slot(h, c));
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) acc[h][e] *= alpha;
      }
#pragma unroll 1
      for (int i0 = 0; i0 < n; i0 += kStep) {
        Packed<T, kVec> v[kUnroll][kChunks];
        bool live[kUnroll];
        load_batch(values, t0, n, i0, v, live);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!live[u]) continue;
          const int i = i0 + u * kGroups + kg;
          float w[kHeads];
          LoadShared<kHeads>(w, s.p[i]);
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            float vf[kVec];
            Unpack<T, kVec>(v[u][c], vf);
#pragma unroll
            for (int h = 0; h < kHeads; ++h) {
#pragma unroll
              for (int e = 0; e < kVec; ++e) {
                acc[h][c * kVec + e] = fmaf(w[h], vf[e], acc[h][c * kVec + e]);
              }
            }
          }
        }
      }
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
#pragma unroll
        for (int c = 0; c < kChunks; ++c) StoreShared<kVec>(acc_slot(h, c), &acc[h][c * kVec]);
      }
    }
    __syncthreads();  // the next tile rewrites the weights and the window flags
  }

  // Merge the key groups' sums (they share m) and write this split's share of every head. Every
  // tile (and the setup, when none ran) ended with a barrier: s.acc, s.m and s.l are final.
  const int num_splits = gridDim.x;
  for (int idx = threadIdx.x; idx < nh * hd; idx += kThreads) {
    const int i = idx / hd, d = idx % hd;
    float out = 0.f;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) out += s.acc[gi][i][d];
    const float sum = s.l[i];
    const int64_t h = h0 + i;
    if (num_splits == 1) {
      p.out[h * hd + d] = FromFloat<T>(sum > 0.f ? out / sum : 0.f);
    } else {
      partial_out[(h * num_splits + split) * hd + d] = out;
      if (d == 0) {
        partial_ml[(h * num_splits + split) * 2] = s.m[i];
        partial_ml[(h * num_splits + split) * 2 + 1] = sum;
      }
    }
  }
}

// Grid (splits, num_kv_heads, ceil(group / kMaxGroupPerBlock)), kThreads threads. A block
// attends entries [split * split_size, + split_size) of KV head g for up to kMaxGroupPerBlock
// query heads of its group (kHeads >= that many, rounded up to a power of two), so each key and
// value row is read from memory once per split, with 16-byte loads where the rows allow, in
// tiles of kTile entries:
//   1. key pass: each key group (SplitLayout) takes entries kg, kg + kGroups, ... in batches of
//      kUnroll rows loaded before any is used, and leaves every entry's logit per head (log2
//      units) in shared memory;
//   2. one warp per head turns the tile's logits into weights against the running max;
//   3. value pass: the same walk over the value rows, each lane accumulating weight * value for
//      its elements of every head's output (older tiles' sums rescaled once per tile).
// The key groups' sums are then added in shared memory. With one split the block writes the
// normalised output; otherwise its (m, l, unnormalised output) partial, m in log2 units.
// Registers: up to 128 (4 blocks per multiprocessor), 168 with 8 heads (3 blocks).
template <typename T, int kVec, int kLanes, int kChunks, int kHeads>
__global__ void __launch_bounds__(kThreads, kHeads >= 8 ? 3 : 4)
    DecodeSplitKernel(DecodeAttentionParams<T> p, int split_size, float* partial_out,
                      float* partial_ml) {
  using Layout = SplitLayout<T, kVec, kLanes, kChunks>;
  __shared__ SplitShared<kHeads, Layout::kGroups, Layout::kDims> s;
  if constexpr (kVec == 1) {
    DecodeSplitBlock<T, kVec, kLanes, kChunks, kHeads, true>(p, split_size, partial_out, partial_ml,
                                                             s);
  } else {
    const int g = blockIdx.y;
    const uintptr_t bases =
        reinterpret_cast<uintptr_t>(p.kv.keys[g]) | reinterpret_cast<uintptr_t>(p.kv.values[g]);
    const bool aligned = bases % 16 == 0 && p.kv.row_stride * sizeof(T) % 16 == 0;
    if (aligned) {
      DecodeSplitBlock<T, kVec, kLanes, kChunks, kHeads, true>(p, split_size, partial_out,
                                                               partial_ml, s);
    } else {
      DecodeSplitBlock<T, kVec, kLanes, kChunks, kHeads, false>(p, split_size, partial_out,
                                                                partial_ml, s);
    }
  }
}

// Grid (num_heads), kCombineThreads threads: merges one query head's split partials into
// out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s, M = max_s m_s. An empty split has
// m_s = -inf, l_s = 0 and o_s = 0 and weighs nothing; a head with no visible entry gets zeros.
// Thread (row, col) merges elements [col * kVecC, + kVecC) of splits row, row + rows, ... with
// its own running max (so its loads need no block-wide max first); the rows are then merged the
// same way in shared memory.
template <typename T, int kVecC>
__global__ void __launch_bounds__(kCombineThreads)
    DecodeCombineKernel(int num_splits, int head_dim, const float* partial_out,
                        const float* partial_ml, T* out) {
  __shared__ float s_m[kCombineThreads];            // per row: its max, log2 units
  __shared__ float s_l[kCombineThreads];            // per row: its sum of 2^(m_s - max) l_s
  __shared__ float s_acc[kCombineThreads * kVecC];  // (rows, head_dim) unnormalised outputs
  const int64_t h = blockIdx.x;
  const float* ml = partial_ml + h * num_splits * 2;
  const float* po = partial_out + h * num_splits * head_dim;
  const int cols = head_dim / kVecC;
  const int rows = kCombineThreads / cols;
  const int row = threadIdx.x / cols, col = threadIdx.x % cols;

  if (row < rows) {
    float big = -INFINITY, sum = 0.f, acc[kVecC] = {};
#pragma unroll 8
    for (int sp = row; sp < num_splits; sp += rows) {
      const float m = ml[2 * sp], l = ml[2 * sp + 1];
      float x[kVecC];
      if constexpr (kVecC == 4) {
        const float4 x4 = *reinterpret_cast<const float4*>(
            po + static_cast<int64_t>(sp) * head_dim + col * kVecC);
        x[0] = x4.x;
        x[1] = x4.y;
        x[2] = x4.z;
        x[3] = x4.w;
      } else {
        x[0] = po[static_cast<int64_t>(sp) * head_dim + col];
      }
      // Selects rather than exp2(-inf - -inf): an empty split, or a first one, scales by 0.
      const float big_new = fmaxf(big, m);
      const float a = big == -INFINITY ? 0.f : exp2f(big - big_new);
      const float b = m == -INFINITY ? 0.f : exp2f(m - big_new);
      sum = sum * a + l * b;
#pragma unroll
      for (int e = 0; e < kVecC; ++e) acc[e] = acc[e] * a + x[e] * b;
      big = big_new;
    }
    if (col == 0) {
      s_m[row] = big;
      s_l[row] = sum;
    }
#pragma unroll
    for (int e = 0; e < kVecC; ++e) s_acc[row * head_dim + col * kVecC + e] = acc[e];
  }
  __syncthreads();

  float big = -INFINITY;
  for (int r = 0; r < rows; ++r) big = fmaxf(big, s_m[r]);
  for (int d = threadIdx.x; d < head_dim; d += kCombineThreads) {
    float sum = 0.f, o = 0.f;
    for (int r = 0; r < rows; ++r) {
      const float w = s_m[r] == -INFINITY ? 0.f : exp2f(s_m[r] - big);
      sum += w * s_l[r];
      o += w * s_acc[r * head_dim + d];
    }
    out[h * head_dim + d] = FromFloat<T>(sum > 0.f ? o / sum : 0.f);
  }
}

template <typename T, int kVec, int kLanes, int kChunks, int kHeads>
cudaError_t LaunchSplit(const DecodeAttentionParams<T>& p, int split_size, int num_splits,
                        float* partial_out, float* partial_ml, cudaStream_t stream) {
  const int group = p.num_heads / p.kv.num_kv_heads;
  const dim3 grid(num_splits, p.kv.num_kv_heads,
                  (group + kMaxGroupPerBlock - 1) / kMaxGroupPerBlock);
  DecodeSplitKernel<T, kVec, kLanes, kChunks, kHeads>
      <<<grid, kThreads, 0, stream>>>(p, split_size, partial_out, partial_ml);
  return cudaGetLastError();
}

// kHeads: the block's query heads rounded up to a power of two.
template <typename T, int kVec, int kLanes, int kChunks>
cudaError_t DispatchHeads(const DecodeAttentionParams<T>& p, int split_size, int num_splits,
                          float* partial_out, float* partial_ml, cudaStream_t stream) {
  const int heads = std::min(p.num_heads / p.kv.num_kv_heads, kMaxGroupPerBlock);
  if (heads == 1) {
    return LaunchSplit<T, kVec, kLanes, kChunks, 1>(p, split_size, num_splits, partial_out,
                                                    partial_ml, stream);
  }
  if (heads == 2) {
    return LaunchSplit<T, kVec, kLanes, kChunks, 2>(p, split_size, num_splits, partial_out,
                                                    partial_ml, stream);
  }
  if (heads <= 4) {
    return LaunchSplit<T, kVec, kLanes, kChunks, 4>(p, split_size, num_splits, partial_out,
                                                    partial_ml, stream);
  }
  return LaunchSplit<T, kVec, kLanes, kChunks, 8>(p, split_size, num_splits, partial_out,
                                                  partial_ml, stream);
}

// Rows as 16-byte vectors (kVec elements) when head_dim is a multiple of kVec, one key group
// lane per vector; else element by element, 32 lanes per entry.
template <typename T>
cudaError_t DispatchLayout(const DecodeAttentionParams<T>& p, int split_size, int num_splits,
                           float* partial_out, float* partial_ml, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int hd = p.kv.head_dim;
  if (hd % kVec == 0) {
    const int vectors = hd / kVec;
    if (vectors <= 8) {
      return DispatchHeads<T, kVec, 8, 1>(p, split_size, num_splits, partial_out, partial_ml,
                                          stream);
    }
    if (vectors <= 16) {
      return DispatchHeads<T, kVec, 16, 1>(p, split_size, num_splits, partial_out, partial_ml,
                                           stream);
    }
    if (vectors <= 32) {
      return DispatchHeads<T, kVec, 32, 1>(p, split_size, num_splits, partial_out, partial_ml,
                                           stream);
    }
    if constexpr (kVec * 32 < kMaxHeadDim) {  // f32: 64 vectors at most
      return DispatchHeads<T, kVec, 32, 2>(p, split_size, num_splits, partial_out, partial_ml,
                                           stream);
    }
  }
  if (hd <= 32) {
    return DispatchHeads<T, 1, 32, 1>(p, split_size, num_splits, partial_out, partial_ml, stream);
  }
  if (hd <= 64) {
    return DispatchHeads<T, 1, 32, 2>(p, split_size, num_splits, partial_out, partial_ml, stream);
  }
  if (hd <= 128) {
    return DispatchHeads<T, 1, 32, 4>(p, split_size, num_splits, partial_out, partial_ml, stream);
  }
  return DispatchHeads<T, 1, 32, 8>(p, split_size, num_splits, partial_out, partial_ml, stream);
}

}  // namespace

size_t DecodeAttentionWorkspaceBytes(int num_heads, int head_dim, int32_t max_length,
                                     int split_size) {
  // Nothing for a call the launcher rejects.
  if (num_heads <= 0 || head_dim <= 0 || head_dim > kMaxHeadDim || split_size < 0 ||
      max_length < 0) {
    return 0;
  }
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
  DecodeAttentionParams<T> dense = p;
  if (dense.kv.row_stride == 0) dense.kv.row_stride = hd;
  float* partial_out = static_cast<float*>(workspace);
  float* partial_ml =
      num_splits > 1 ? partial_out + static_cast<int64_t>(p.num_heads) * num_splits * hd : nullptr;
  const cudaError_t err =
      DispatchLayout<T>(dense, split_size, num_splits, partial_out, partial_ml, stream);
  if (err != cudaSuccess || num_splits == 1) return err;
  if (hd % 4 == 0) {
    DecodeCombineKernel<T, 4><<<p.num_heads, kCombineThreads, 0, stream>>>(
        num_splits, hd, partial_out, partial_ml, p.out);
  } else {
    DecodeCombineKernel<T, 1><<<p.num_heads, kCombineThreads, 0, stream>>>(
        num_splits, hd, partial_out, partial_ml, p.out);
  }
  return cudaGetLastError();
}

template cudaError_t LaunchDecodeAttention<float>(const DecodeAttentionParams<float>&, void*,
                                                  size_t, cudaStream_t);
template cudaError_t LaunchDecodeAttention<__nv_bfloat16>(
    const DecodeAttentionParams<__nv_bfloat16>&, void*, size_t, cudaStream_t);
template cudaError_t LaunchDecodeAttention<__half>(const DecodeAttentionParams<__half>&, void*,
                                                   size_t, cudaStream_t);

}  // namespace kvmem
