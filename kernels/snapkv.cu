#include <cmath>
#include <cstdint>

#include "kernels/kernel_utils.cuh"
#include "kernels/snapkv.cuh"

namespace kvmem {
namespace {

using kernel_utils::kFullMask;
using kernel_utils::ToFloat;
using kernel_utils::WarpMax;
using kernel_utils::WarpSum;

constexpr int kTile = 32;  // entries per block of the scoring kernels: one per lane
constexpr int kWarps = 8;  // window rows are spread over the warps
constexpr int kTopKThreads = 1024;
constexpr int kMaxHeadDim = 256;

// Workspace: in doubles, row partials (num_kv_heads, rows, tiles, 2), row stats
// (num_kv_heads, rows, 2), votes (num_kv_heads, max_length), pooled (num_kv_heads, max_length);
// then the f32 dot products q . k (num_kv_heads, rows, max_length) the statistics pass computes
// once for the votes pass; rows = group * w and tiles = ceil(max_length / kTile).
struct Workspace {
  double* row_partials;
  double* row_stats;
  double* votes;
  double* pooled;
  float* dots;
};

int64_t Tiles(int32_t max_length) { return (max_length + kTile - 1) / kTile; }

Workspace Carve(void* base, int num_heads, int num_kv_heads, int w, int32_t max_length) {
  const int64_t rows = static_cast<int64_t>(num_heads / num_kv_heads) * w;
  Workspace ws;
  ws.row_partials = static_cast<double*>(base);
  ws.row_stats = ws.row_partials + num_kv_heads * rows * Tiles(max_length) * 2;
  ws.votes = ws.row_stats + num_kv_heads * rows * 2;
  ws.pooled = ws.votes + static_cast<int64_t>(num_kv_heads) * max_length;
  ws.dots = reinterpret_cast<float*>(ws.pooled + static_cast<int64_t>(num_kv_heads) * max_length);
  return ws;
}

size_t TileSharedBytes(int hd) {
  return static_cast<size_t>(kTile) * (hd + 1) * sizeof(float) + kTile * sizeof(int64_t);
}

template <typename T>
struct HeadView {
  int64_t len = 0, candidates = 0;
  bool scored = false;  // the head has more than `budget` entries
};

template <typename T>
__device__ HeadView<T> View(const SnapKvParams<T>& p, int g) {
  HeadView<T> v;
  v.len = min(p.kv.lengths[g], p.kv.max_length);
  v.scored = v.len > p.budget;
  v.candidates = v.len - p.w;
  return v;
}

// Stages keys [e0, min(e0 + kTile, limit)) of head g as f32 rows of hd + 1 floats (the pad
// makes lane j reading row j bank-conflict free) and, with a sliding window, their positions.
template <typename T>
__device__ void LoadKeyTile(const SnapKvParams<T>& p, int g, int64_t e0, int64_t limit, float* s_k,
                            int64_t* s_pos) {
  const int hd = p.kv.head_dim;
  const T* keys = p.kv.keys[g];
  for (int idx = threadIdx.x; idx < kTile * hd; idx += blockDim.x) {
    const int j = idx / hd, d = idx % hd;
    const int64_t e = e0 + j;
    s_k[j * (hd + 1) + d] = e < limit ? ToFloat(keys[e * p.kv.row_stride + d]) : 0.f;
  }
  if (p.sliding_window > 0 && threadIdx.x < kTile) {
    const int64_t e = e0 + threadIdx.x;
    s_pos[threadIdx.x] = e < limit ? p.kv.positions[g][e] : 0;
  }
}

// Whether window row r of head g sees entry e (not past the row's own entry, below `limit`,
// inside the sliding window); pos_e is e's position, read only with a window.
template <typename T>
__device__ bool RowSees(const SnapKvParams<T>& p, int g, const HeadView<T>& v, int r, int64_t e,
                        int64_t limit, int64_t pos_e) {
  const int64_t self = v.candidates + r % p.w;
  bool live = e <= self && e < limit;
  if (live && p.sliding_window > 0) live = p.kv.positions[g][self] - pos_e < p.sliding_window;
  return live;
}

// Window row r's query of head g.
template <typename T>
__device__ const float* RowQuery(const SnapKvParams<T>& p, int g, int r) {
  const int group = p.num_heads / p.kv.num_kv_heads;
  const int gi = r / p.w, i = r % p.w;
  return p.queries + (static_cast<int64_t>(g * group + gi) * p.w + i) * p.kv.head_dim;
}

constexpr int kRowsAtOnce = 4;  // independent dot chains per lane

// dot[i] = q_i . k for rows r0 .. r0 + kRowsAtOnce - 1 (those below `rows`), each summed in
// order, one rounded product and one rounded add per element: bit-identical to SequentialDot
// (and so to the CPU), with the chains interleaved so a lane has several adds in flight.
template <typename T>
__device__ void RowDots(const SnapKvParams<T>& p, int g, int r0, int rows, const float* k,
                        float (&dot)[kRowsAtOnce]) {
  const int hd = p.kv.head_dim;
  const float* q[kRowsAtOnce];
#pragma unroll
  for (int i = 0; i < kRowsAtOnce; ++i) {
    q[i] = RowQuery(p, g, min(r0 + i, rows - 1));  // a row past the end repeats the last
    dot[i] = 0.f;
  }
  int d = 0;
  if (hd % 4 == 0 && reinterpret_cast<uintptr_t>(p.queries) % 16 == 0) {
    for (; d < hd; d += 4) {
      const float k0 = k[d], k1 = k[d + 1], k2 = k[d + 2], k3 = k[d + 3];
#pragma unroll
      for (int i = 0; i < kRowsAtOnce; ++i) {
        const float4 qv = __ldg(reinterpret_cast<const float4*>(q[i] + d));
        dot[i] = __fadd_rn(dot[i], __fmul_rn(qv.x, k0));
        dot[i] = __fadd_rn(dot[i], __fmul_rn(qv.y, k1));
        dot[i] = __fadd_rn(dot[i], __fmul_rn(qv.z, k2));
        dot[i] = __fadd_rn(dot[i], __fmul_rn(qv.w, k3));
      }
    }
  }
  for (; d < hd; ++d) {
#pragma unroll
    for (int i = 0; i < kRowsAtOnce; ++i) dot[i] = __fadd_rn(dot[i], __fmul_rn(q[i][d], k[d]));
  }
}

// Grid (tiles, num_kv_heads), kWarps * 32 threads: per window row, the max logit and the sum
// of exp(logit - max) over the tile's entries; every (row, entry) dot product is kept for the
// votes pass.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    RowStatsKernel(SnapKvParams<T> p, double scale, Workspace ws) {
  extern __shared__ float4 smem_f4[];
  float* s_k = reinterpret_cast<float*>(smem_f4);
  int64_t* s_pos = reinterpret_cast<int64_t*>(s_k + kTile * (p.kv.head_dim + 1));
  const int g = blockIdx.y, tile = blockIdx.x, tiles = gridDim.x;
  const HeadView<T> v = View(p, g);
  const int64_t e0 = static_cast<int64_t>(tile) * kTile;
  if (!v.scored || e0 >= v.len) return;
  LoadKeyTile(p, g, e0, v.len, s_k, s_pos);
  __syncthreads();
  const int rows = p.num_heads / p.kv.num_kv_heads * p.w;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t e = e0 + lane;
  const int64_t pos_e = p.sliding_window > 0 ? s_pos[lane] : 0;
  for (int r0 = warp * kRowsAtOnce; r0 < rows; r0 += kWarps * kRowsAtOnce) {
    float dot[kRowsAtOnce];
    RowDots(p, g, r0, rows, s_k + lane * (p.kv.head_dim + 1), dot);
#pragma unroll
    for (int i = 0; i < kRowsAtOnce; ++i) {
      const int r = r0 + i;
      if (r >= rows) break;  // warp-uniform
      const int64_t item = static_cast<int64_t>(g) * rows + r;
      if (e < v.len) ws.dots[item * p.kv.max_length + e] = dot[i];
      const double logit =
          RowSees(p, g, v, r, e, v.len, pos_e) ? static_cast<double>(dot[i]) * scale : -INFINITY;
      const double m = WarpMax(logit);
      const double l = WarpSum(logit == -INFINITY ? 0.0 : exp(logit - m));
      if (lane == 0) {
        double* out = ws.row_partials + (item * tiles + tile) * 2;
        out[0] = m;
        out[1] = l;
      }
    }
  }
}

// One warp per (KV head, window row): merges the row's tile statistics into its softmax max
// and denominator.
template <typename T>
__global__ void RowCombineKernel(SnapKvParams<T> p, int tiles, Workspace ws) {
  const int rows = p.num_heads / p.kv.num_kv_heads * p.w;
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (item >= static_cast<int64_t>(p.kv.num_kv_heads) * rows) return;  // warp-uniform
  const int g = static_cast<int>(item / rows), r = static_cast<int>(item % rows);
  const HeadView<T> v = View(p, g);
  if (!v.scored) return;
  const int64_t self = v.candidates + r % p.w;
  const int64_t used = self / kTile + 1;  // tiles holding entries 0..self
  const double* part = ws.row_partials + item * tiles * 2;
  double m = -INFINITY;
  for (int64_t t = lane; t < used; t += 32) m = fmax(m, part[2 * t]);
  m = WarpMax(m);
  double l = 0;
  for (int64_t t = lane; t < used; t += 32) {
    if (part[2 * t + 1] > 0) l += part[2 * t + 1] * exp(part[2 * t] - m);
  }
  l = WarpSum(l);
  if (lane == 0) {
    ws.row_stats[item * 2] = m;
    ws.row_stats[item * 2 + 1] = l;
  }
}

// Grid (tiles, num_kv_heads), kWarps * 32 threads: the vote of each candidate in the tile,
// summed over the window rows (each warp a share of them, then the warps in fixed order) and
// averaged over the group, from the dot products the statistics pass kept.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    VotesKernel(SnapKvParams<T> p, double scale, Workspace ws) {
  __shared__ double s_votes[kWarps][kTile];
  const int g = blockIdx.y;
  const HeadView<T> v = View(p, g);
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (!v.scored || e0 >= v.candidates) return;
  const int group = p.num_heads / p.kv.num_kv_heads;
  const int rows = group * p.w;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t e = e0 + lane;
  const int64_t pos_e = p.sliding_window > 0 && e < v.candidates ? p.kv.positions[g][e] : 0;
  double vote = 0;
  for (int r = warp; r < rows; r += kWarps) {
    const int64_t item = static_cast<int64_t>(g) * rows + r;
    if (!RowSees(p, g, v, r, e, v.candidates, pos_e)) continue;
    const double logit = static_cast<double>(ws.dots[item * p.kv.max_length + e]) * scale;
    const double* stat = ws.row_stats + item * 2;
    vote += exp(logit - stat[0]) / stat[1];
  }
  s_votes[warp][lane] = vote;
  __syncthreads();
  if (warp == 0) {
    double total = 0;
    for (int w = 0; w < kWarps; ++w) total += s_votes[w][lane];
    if (e < v.candidates) {
      ws.votes[static_cast<int64_t>(g) * p.kv.max_length + e] = total / group;
    }
  }
}

// One thread per (candidate, KV head): stride-1 pooling clipped at the ends, as the CPU does.
template <typename T>
__global__ void PoolKernel(SnapKvParams<T> p, Workspace ws, double* pooled) {
  const int g = blockIdx.y;
  const HeadView<T> v = View(p, g);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!v.scored || j >= v.candidates) return;
  const double* votes = ws.votes + static_cast<int64_t>(g) * p.kv.max_length;
  const int64_t half = p.kernel / 2;
  const int64_t lo = max(int64_t{0}, j - half), hi = min(v.candidates - 1, j + half);
  const bool use_max = p.pooling == SnapKvPool::kMax;
  double acc = use_max ? -INFINITY : 0.0;
  for (int64_t t = lo; t <= hi; ++t) acc = use_max ? fmax(acc, votes[t]) : acc + votes[t];
  pooled[static_cast<int64_t>(g) * p.kv.max_length + j] =
      use_max ? acc : acc / static_cast<double>(hi - lo + 1);
}

// Exclusive prefix sum of v over the kTopKThreads-thread block; *total gets the block's sum.
// Every thread must call it.
__device__ int BlockExclusiveSum(int v, int* total) {
  __shared__ int s_warp[kTopKThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
  for (int off = 1; off < 32; off *= 2) {
    const int n = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int x = s_warp[lane];
    for (int off = 1; off < 32; off *= 2) {
      const int n = __shfl_up_sync(kFullMask, x, off);
      if (lane >= off) x += n;
    }
    s_warp[lane] = x;  // inclusive over warps
  }
  __syncthreads();
  const int before = warp > 0 ? s_warp[warp - 1] : 0;
  *total = s_warp[kTopKThreads / 32 - 1];
  __syncthreads();  // s_warp may be reused by the next call
  return before + incl - v;
}

// f64 -> u64 with the same order (for non-NaN values; -0 is folded into +0 first).
__device__ __forceinline__ uint64_t OrderedKey(double s) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(s + 0.0));
  return (bits >> 63) != 0 ? ~bits : bits | (uint64_t{1} << 63);
}

// One kTopKThreads block per KV head: keeps all entries of a head within budget; otherwise the
// top budget - w candidates by (score desc, index asc), ascending, then the w window entries.
template <typename T>
__global__ void __launch_bounds__(kTopKThreads)
    TopKKernel(SnapKvParams<T> p, const double* pooled) {
  __shared__ int s_hist[256];
  __shared__ uint64_t s_prefix;
  __shared__ int s_remaining;
  const int g = blockIdx.x;
  const HeadView<T> v = View(p, g);
  int32_t* keep = p.keep + static_cast<int64_t>(g) * p.budget;
  if (!v.scored) {
    for (int64_t i = threadIdx.x; i < v.len; i += blockDim.x) keep[i] = static_cast<int32_t>(i);
    if (threadIdx.x == 0) p.keep_counts[g] = static_cast<int32_t>(v.len);
    return;
  }
  const double* scores = pooled + static_cast<int64_t>(g) * p.kv.max_length;
  const int64_t c = v.candidates;
  const int take = p.budget - p.w;  // < c because len > budget

  // Radix select, most significant byte first: afterwards s_prefix is the key of the take-th
  // largest score and s_remaining how many candidates with exactly that key to keep.
  if (threadIdx.x == 0) {
    s_prefix = 0;
    s_remaining = take;
  }
  uint64_t mask = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) s_hist[b] = 0;
    __syncthreads();
    const uint64_t prefix = s_prefix;
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
      const uint64_t key = OrderedKey(scores[j]);
      if ((key & mask) == prefix) atomicAdd(&s_hist[(key >> shift) & 0xff], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // The first bin from the top where the running count reaches s_remaining: lane i holds
      // bins 255 - 8i .. 248 - 8i; the lane whose share straddles it scans its own bins.
      const int lane = threadIdx.x, remaining = s_remaining;
      int counts[8], sum = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += counts[i] = s_hist[255 - (lane * 8 + i)];
      int incl = sum;
      for (int off = 1; off < 32; off *= 2) {
        const int n = __shfl_up_sync(kFullMask, incl, off);
        if (lane >= off) incl += n;
      }
      int above = incl - sum;
      __syncwarp();  // every lane has read s_remaining before one rewrites it
      if (above < remaining && remaining <= incl) {
        for (int i = 0; i < 8; ++i) {
          if (above + counts[i] >= remaining) {
            s_prefix = prefix | (static_cast<uint64_t>(255 - (lane * 8 + i)) << shift);
            s_remaining = remaining - above;
            break;
          }
          above += counts[i];
        }
      }
    }
    mask |= uint64_t{0xff} << shift;
    __syncthreads();
  }
  const uint64_t threshold = s_prefix;
  const int ties_to_keep = s_remaining;

  // Index-ordered compaction, so the kept candidates come out ascending.
  int ties_before = 0, kept_before = 0;
  for (int64_t base = 0; base < c; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const uint64_t key = j < c ? OrderedKey(scores[j]) : 0;
    const bool tie = j < c && key == threshold;
    int ties_total = 0, kept_total = 0;
    const int tie_rank = ties_before + BlockExclusiveSum(tie ? 1 : 0, &ties_total);
    const bool kept = j < c && (key > threshold || (tie && tie_rank < ties_to_keep));
    const int slot = kept_before + BlockExclusiveSum(kept ? 1 : 0, &kept_total);
    if (kept) keep[slot] = static_cast<int32_t>(j);
    ties_before += ties_total;
    kept_before += kept_total;
  }
  for (int i = threadIdx.x; i < p.w; i += blockDim.x) {
    keep[take + i] = static_cast<int32_t>(c + i);
  }
  if (threadIdx.x == 0) p.keep_counts[g] = take + p.w;
}

}  // namespace

size_t SnapKvWorkspaceBytes(int num_heads, int num_kv_heads, int w, int32_t max_length) {
  if (num_kv_heads <= 0 || w <= 0 || max_length < 0) return 0;
  const int64_t rows = static_cast<int64_t>(num_heads / num_kv_heads) * w;
  const int64_t doubles = num_kv_heads * rows * Tiles(max_length) * 2 + num_kv_heads * rows * 2 +
                          2 * static_cast<int64_t>(num_kv_heads) * max_length;
  const int64_t floats = num_kv_heads * rows * static_cast<int64_t>(max_length);
  return static_cast<size_t>(doubles) * sizeof(double) +
         static_cast<size_t>(floats) * sizeof(float);
}

template <typename T>
cudaError_t LaunchSnapKv(const SnapKvParams<T>& p, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  const int hd = p.kv.head_dim;
  if (hd <= 0 || hd > kMaxHeadDim || p.kv.num_kv_heads <= 0 || p.num_heads <= 0 ||
      p.num_heads % p.kv.num_kv_heads != 0 || p.w <= 0 || p.budget <= p.w || p.kernel <= 0 ||
      p.kernel % 2 == 0 || p.kv.max_length < 0 || p.kv.row_stride < 0 ||
      (p.kv.row_stride > 0 && p.kv.row_stride < hd) || p.keep == nullptr ||
      p.keep_counts == nullptr || (!p.top_k && p.scores == nullptr) ||
      workspace_bytes <
          SnapKvWorkspaceBytes(p.num_heads, p.kv.num_kv_heads, p.w, p.kv.max_length)) {
    return cudaErrorInvalidValue;
  }
  SnapKvParams<T> dense = p;
  if (dense.kv.row_stride == 0) dense.kv.row_stride = hd;
  const Workspace ws = Carve(workspace, p.num_heads, p.kv.num_kv_heads, p.w, p.kv.max_length);
  double* pooled = p.scores != nullptr ? p.scores : ws.pooled;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));  // as SnapKvScores
  const int64_t tiles = Tiles(p.kv.max_length);
  const int64_t rows = static_cast<int64_t>(p.num_heads / p.kv.num_kv_heads) * p.w;
  // The positions follow kTile * (hd + 1) floats, an even count: 8-byte aligned.
  static_assert(kTile % 2 == 0, "positions alignment");
  const size_t smem = TileSharedBytes(hd);
  if (tiles > 0) {
    const dim3 grid(static_cast<unsigned>(tiles), p.kv.num_kv_heads);
    RowStatsKernel<T><<<grid, kWarps * 32, smem, stream>>>(dense, scale, ws);
    const int64_t warps = p.kv.num_kv_heads * rows;
    RowCombineKernel<T><<<static_cast<unsigned>((warps + 7) / 8), 256, 0, stream>>>(
        dense, static_cast<int>(tiles), ws);
    VotesKernel<T><<<grid, kWarps * 32, 0, stream>>>(dense, scale, ws);
    const dim3 pool_grid(static_cast<unsigned>((p.kv.max_length + 255) / 256), p.kv.num_kv_heads);
    PoolKernel<T><<<pool_grid, 256, 0, stream>>>(dense, ws, pooled);
  }
  if (p.top_k) TopKKernel<T><<<p.kv.num_kv_heads, kTopKThreads, 0, stream>>>(dense, pooled);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchSnapKvTopK(const SnapKvParams<T>& p, cudaStream_t stream) {
  if (p.scores == nullptr || p.keep == nullptr || p.keep_counts == nullptr || p.w <= 0 ||
      p.budget <= p.w || p.kv.num_kv_heads <= 0 || p.kv.max_length < 0) {
    return cudaErrorInvalidValue;
  }
  TopKKernel<T><<<p.kv.num_kv_heads, kTopKThreads, 0, stream>>>(p, p.scores);
  return cudaGetLastError();
}

template cudaError_t LaunchSnapKvTopK<float>(const SnapKvParams<float>&, cudaStream_t);
template cudaError_t LaunchSnapKvTopK<__nv_bfloat16>(const SnapKvParams<__nv_bfloat16>&,
                                                     cudaStream_t);
template cudaError_t LaunchSnapKvTopK<__half>(const SnapKvParams<__half>&, cudaStream_t);

template cudaError_t LaunchSnapKv<float>(const SnapKvParams<float>&, void*, size_t, cudaStream_t);
template cudaError_t LaunchSnapKv<__nv_bfloat16>(const SnapKvParams<__nv_bfloat16>&, void*, size_t,
                                                 cudaStream_t);
template cudaError_t LaunchSnapKv<__half>(const SnapKvParams<__half>&, void*, size_t, cudaStream_t);

}  // namespace kvmem
