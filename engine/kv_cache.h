// The KV entries a session attends to: per (layer, KV head), ragged across heads.
#ifndef KVMEM_ENGINE_KV_CACHE_H_
#define KVMEM_ENGINE_KV_CACHE_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/kv_blocks.h"

namespace kvmem {

// Entries of one (layer, KV head). Keys are stored after RoPE at their own absolute position,
// so an entry keeps its meaning wherever it sits in the list.
struct HeadKv {
  std::vector<int64_t> positions;  // (n) absolute positions, strictly increasing
  // Empty when the cache's rows live with the backend (KvCache::RowHome::kBackend).
  std::vector<float> keys;    // (n, head_dim)
  std::vector<float> values;  // (n, head_dim)

  int64_t size() const { return static_cast<int64_t>(positions.size()); }
  // Appends one entry; `position` must exceed every position already held.
  void Append(int64_t position, const float* key, const float* value, int head_dim);
};

// One row of a layer: KV head `head` at `position`.
struct KvRowRef {
  int64_t position;
  int32_t head;
};

// Where a cache whose rows live with the backend finds the rows of entries it no longer holds
// on the host: a session reads them from its blocks (tail, warm or cold).
class KvRowSource {
 public:
  virtual ~KvRowSource() = default;
  // Keys and values, each (positions.size(), head_dim), of one (layer, KV head) at `positions`
  // (any order). DATA_LOSS or NOT_FOUND when a block is damaged or missing. A backend may call
  // it from several threads at once, for different heads or positions.
  virtual absl::Status ReadRows(int layer, int kv_head, absl::Span<const int64_t> positions,
                                float* keys, float* values) = 0;
  // The same rows as bf16 bits (rounded to nearest even), for a bf16 device's upload: a source
  // whose blocks are bf16 copies them as they are.
  virtual absl::Status ReadRowsBf16(int layer, int kv_head, absl::Span<const int64_t> positions,
                                    uint16_t* keys, uint16_t* values) = 0;
  // Rows of several heads of one layer: row i is rows[i], in any order. A session's blocks
  // hold every KV head of a position side by side, so rows ordered by position are read in one
  // sweep through each block: for a whole hot set 2-3x faster than head by head, where each
  // row is a separate stride through every block. The default reads head by head.
  virtual absl::Status ReadLayerRows(int layer, absl::Span<const KvRowRef> rows, float* keys,
                                     float* values);
  virtual absl::Status ReadLayerRowsBf16(int layer, absl::Span<const KvRowRef> rows, uint16_t* keys,
                                         uint16_t* values);
  // Where rows of one layer lie in blocks of type `dtype` in the pinned pool
  // (engine/block_memory.h), for a device that reads them there: keys[i] and values[i] point at
  // row rows[i]'s head_dim values, or are null where the row is not in such a block (the
  // caller reads those through ReadLayerRows). Every block pointed into is appended to *holds, which
  // keeps it alive, and its filled rows unchanged, while the caller holds it. DATA_LOSS or
  // NOT_FOUND as ReadLayerRows. The default locates nothing. May be called from several threads
  // at once, as ReadRows.
  virtual absl::Status LocateLayerRows(int layer, absl::Span<const KvRowRef> rows, BlockDType dtype,
                                       const void** keys, const void** values,
                                       std::vector<std::shared_ptr<const KvBlock>>* holds);
};

// A device backend keeps its own copy of the entries beside the cache (the attachment) and
// brings it up to date before every pass; it learns which heads changed from their versions:
// every mutable access to a head counts as a change.
//
// Where the entries' keys and values live on the host (RowHome):
//   kHost     every head holds its rows (f32). The CPU backend attends to them.
//   kBackend  heads hold positions only. The backend's copy is the only full one; the host
//             keeps the rows of the newest positions (the fresh rows, which the session has
//             not yet put into blocks) and reads older ones through the row source when the
//             backend must upload them again (a new copy, a recall, after an error). This
//             spares the host an f32 copy of the hot set and makes eviction a compaction of
//             positions.
class KvCache {
 public:
  enum class RowHome { kHost, kBackend };

  // Rows of consecutive positions [first, first + count) of one layer, all KV heads, in the
  // type the backend handed them over in (its KV type: a bf16 device's rows stay bf16).
  struct FreshRows {
    int64_t first = 0;
    KvBlock rows;  // (count, num_kv_heads, head_dim) as growable rows; index and filled unused
  };

  KvCache(int num_layers, int num_kv_heads, int head_dim, RowHome rows = RowHome::kHost);
  // A copy holds the same entries and fresh rows but no attachment (a backend copies what it
  // needs again) and no row source.
  KvCache(const KvCache& other);
  KvCache& operator=(const KvCache& other);
  // A move hands the attachment over with the entries.
  KvCache(KvCache&& other) noexcept = default;
  KvCache& operator=(KvCache&& other) noexcept = default;

  int num_layers() const { return num_layers_; }
  int num_kv_heads() const { return num_kv_heads_; }
  int head_dim() const { return head_dim_; }
  RowHome row_home() const { return row_home_; }
  bool host_rows() const { return row_home_ == RowHome::kHost; }
  // Mutable access bumps the head's version, whether or not the caller then changes it.
  HeadKv& head(int layer, int kv_head) {
    const int i = layer * num_kv_heads_ + kv_head;
    ++versions_[i];
    return heads_[i];
  }
  const HeadKv& head(int layer, int kv_head) const {
    return heads_[layer * num_kv_heads_ + kv_head];
  }
  // Grows with every mutable access to the head (see head()).
  uint64_t version(int layer, int kv_head) const {
    return versions_[layer * num_kv_heads_ + kv_head];
  }
  // Backend-private state tied to this cache's lifetime (a device copy of the entries, freed
  // with the cache). Only the backend that set it interprets it.
  const std::shared_ptr<void>& attachment() const { return attachment_; }
  void set_attachment(std::shared_ptr<void> attachment) { attachment_ = std::move(attachment); }

  // kBackend only. The fresh rows of `layer`.
  const FreshRows& fresh(int layer) const { return fresh_[layer]; }
  int64_t fresh_size(int layer) const;
  // Appends rows (n, num_kv_heads, head_dim) of positions [first, first + n) to `layer`'s
  // fresh rows, which must end at `first` unless empty: f32, or the bits of `dtype` (which
  // must be the type of the rows held, unless none are).
  void AppendFresh(int layer, int64_t first, int64_t n, const float* keys, const float* values);
  void AppendFresh(int layer, int64_t first, int64_t n, BlockDType dtype, const void* keys,
                   const void* values);
  // AppendFresh without the copy: makes room for the rows (zeros until written) and returns
  // where their keys and values go, (n, num_kv_heads, head_dim) of `dtype` each, so that a
  // backend copies them there directly. Valid until the layer's fresh rows next change.
  std::pair<void*, void*> GrowFresh(int layer, int64_t first, int64_t n, BlockDType dtype);
  // Forgets fresh rows of positions >= `position` (a rolled-back pass) or < `position`
  // (rows the session has put into blocks), in every layer.
  void DropFreshFrom(int64_t position);
  void DropFreshBefore(int64_t position);
  // Not owned; must outlive its use by this cache.
  void set_row_source(KvRowSource* source) { row_source_ = source; }
  // Keys and values (positions.size(), head_dim) of one head at `positions`: from the head's
  // own rows (kHost), else from the fresh rows or the row source. FAILED_PRECONDITION when a
  // kBackend cache needs its row source and has none.
  absl::Status ReadRows(int layer, int kv_head, absl::Span<const int64_t> positions, float* keys,
                        float* values) const;
  // The same rows as bf16 bits, rounded to nearest even (KvRowSource::ReadRowsBf16).
  absl::Status ReadRowsBf16(int layer, int kv_head, absl::Span<const int64_t> positions,
                            uint16_t* keys, uint16_t* values) const;
  // Rows of several heads of one layer (KvRowSource::ReadLayerRows): fastest ordered by
  // position, as a whole layer's upload is.
  absl::Status ReadLayerRows(int layer, absl::Span<const KvRowRef> rows, float* keys,
                             float* values) const;
  absl::Status ReadLayerRowsBf16(int layer, absl::Span<const KvRowRef> rows, uint16_t* keys,
                                 uint16_t* values) const;
  // KvRowSource::LocateLayerRows through the row source, for rows of a kBackend cache that
  // are not fresh (fresh rows, and every row of a kHost cache, are left null: read them).
  absl::Status LocateLayerRows(int layer, absl::Span<const KvRowRef> rows, BlockDType dtype,
                               const void** keys, const void** values,
                               std::vector<std::shared_ptr<const KvBlock>>* holds) const;
  // A kHost copy of every head (itself when already kHost).
  absl::StatusOr<KvCache> WithHostRows() const;

  // The largest position held by any head, or -1 when empty.
  int64_t MaxPosition() const;
  // Entries summed over all (layer, head).
  int64_t TotalEntries() const;
  // Bytes of keys and values held on the host: every entry (kHost, f32) or the fresh rows.
  int64_t Bytes() const;

 private:
  // ReadRows with rows of E: float, or bf16 bits (uint16_t).
  template <typename E>
  absl::Status ReadRowsAs(int layer, int kv_head, absl::Span<const int64_t> positions, E* keys,
                          E* values) const;
  template <typename E>
  absl::Status ReadLayerRowsAs(int layer, absl::Span<const KvRowRef> rows, E* keys,
                               E* values) const;
  int num_layers_;
  int num_kv_heads_;
  int head_dim_;
  std::vector<HeadKv> heads_;       // (layer, kv_head)
  std::vector<uint64_t> versions_;  // (layer, kv_head)
  RowHome row_home_;
  std::vector<FreshRows> fresh_;  // (layer), kBackend only
  KvRowSource* row_source_ = nullptr;
  std::shared_ptr<void> attachment_;
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_KV_CACHE_H_
