#include "engine/kv_cache.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/kv_blocks.h"
#include "engine/status_macros.h"

namespace kvmem {

void HeadKv::Append(int64_t position, const float* key, const float* value, int head_dim) {
  KVMEM_CHECK(positions.empty() || position > positions.back());
  positions.push_back(position);
  keys.insert(keys.end(), key, key + head_dim);
  values.insert(values.end(), value, value + head_dim);
}

KvCache::KvCache(int num_layers, int num_kv_heads, int head_dim, RowHome rows)
    : num_layers_(num_layers),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      heads_(static_cast<size_t>(num_layers) * num_kv_heads),
      versions_(heads_.size(), 0),
      row_home_(rows),
      fresh_(rows == RowHome::kBackend ? num_layers : 0) {}

KvCache::KvCache(const KvCache& other)
    : num_layers_(other.num_layers_),
      num_kv_heads_(other.num_kv_heads_),
      head_dim_(other.head_dim_),
      heads_(other.heads_),
      versions_(other.versions_),
      row_home_(other.row_home_),
      fresh_(other.fresh_) {}

KvCache& KvCache::operator=(const KvCache& other) {
  if (this == &other) return *this;
  num_layers_ = other.num_layers_;
  num_kv_heads_ = other.num_kv_heads_;
  head_dim_ = other.head_dim_;
  heads_ = other.heads_;
  row_home_ = other.row_home_;
  fresh_ = other.fresh_;
  row_source_ = nullptr;
  // Versions must not repeat ones a backend may have seen for this cache's former entries.
  versions_.resize(heads_.size(), 0);
  for (size_t i = 0; i < versions_.size(); ++i) {
    versions_[i] = std::max(versions_[i], other.versions_[i]) + 1;
  }
  attachment_.reset();
  return *this;
}

int64_t KvCache::fresh_size(int layer) const {
  return static_cast<int64_t>(fresh_[layer].rows.size()) / (num_kv_heads_ * head_dim_);
}

void KvCache::AppendFresh(int layer, int64_t first, int64_t n, const float* keys,
                          const float* values) {
  AppendFresh(layer, first, n, BlockDType::kF32, keys, values);
}

void KvCache::AppendFresh(int layer, int64_t first, int64_t n, BlockDType dtype, const void* keys,
                          const void* values) {
  const auto [k, v] = GrowFresh(layer, first, n, dtype);
  const size_t bytes = static_cast<size_t>(n) * num_kv_heads_ * head_dim_ *
                       (dtype == BlockDType::kF32 ? sizeof(float) : sizeof(uint16_t));
  if (bytes == 0) return;
  std::memcpy(k, keys, bytes);
  std::memcpy(v, values, bytes);
}

std::pair<void*, void*> KvCache::GrowFresh(int layer, int64_t first, int64_t n, BlockDType dtype) {
  KVMEM_CHECK(row_home_ == RowHome::kBackend);
  FreshRows& f = fresh_[layer];
  const int64_t held = fresh_size(layer);
  if (held == 0) {
    f.first = first;
    f.rows.Resize(0);
    f.rows.dtype = dtype;
  }
  KVMEM_CHECK(f.first + held == first && f.rows.dtype == dtype);
  const size_t at = f.rows.size();
  f.rows.Resize(at + static_cast<size_t>(n) * num_kv_heads_ * head_dim_);
  return {f.rows.KeysAt(at), f.rows.ValuesAt(at)};
}

// Rows dropped down to none give their memory back: a session between turns holds no fresh
// rows, and many idle sessions must not each keep a turn's worth.
void KvCache::DropFreshFrom(int64_t position) {
  for (int l = 0; l < static_cast<int>(fresh_.size()); ++l) {
    FreshRows& f = fresh_[l];
    const int64_t keep = std::clamp<int64_t>(position - f.first, 0, fresh_size(l));
    if (keep == 0) {
      f = FreshRows();
    } else {
      f.rows.Resize(static_cast<size_t>(keep) * num_kv_heads_ * head_dim_);
    }
  }
}

void KvCache::DropFreshBefore(int64_t position) {
  for (int l = 0; l < static_cast<int>(fresh_.size()); ++l) {
    FreshRows& f = fresh_[l];
    const int64_t held = fresh_size(l);
    const int64_t drop = std::clamp<int64_t>(position - f.first, 0, held);
    if (drop == held) {
      f = FreshRows();
    } else {
      f.rows.EraseFront(static_cast<size_t>(drop) * num_kv_heads_ * head_dim_);
      f.first += drop;
    }
  }
}

namespace {

// One row of f32 as E: copied (f32) or rounded to bf16 bits.
void RowAs(const float* in, size_t n, float* out) { std::memcpy(out, in, n * sizeof(float)); }
void RowAs(const float* in, size_t n, uint16_t* out) {
  for (size_t i = 0; i < n; ++i) out[i] = Bf16Rne(in[i]);
}

}  // namespace

namespace {

// The rows' source call for E.
absl::Status SourceRows(KvRowSource& source, int layer, int head,
                        absl::Span<const int64_t> positions, float* keys, float* values) {
  return source.ReadRows(layer, head, positions, keys, values);
}
absl::Status SourceRows(KvRowSource& source, int layer, int head,
                        absl::Span<const int64_t> positions, uint16_t* keys, uint16_t* values) {
  return source.ReadRowsBf16(layer, head, positions, keys, values);
}
absl::Status SourceLayerRows(KvRowSource& source, int layer, absl::Span<const KvRowRef> rows,
                             float* keys, float* values) {
  return source.ReadLayerRows(layer, rows, keys, values);
}
absl::Status SourceLayerRows(KvRowSource& source, int layer, absl::Span<const KvRowRef> rows,
                             uint16_t* keys, uint16_t* values) {
  return source.ReadLayerRowsBf16(layer, rows, keys, values);
}

// KvRowSource's default layer read: head by head, scattered back into row order.
template <typename E>
absl::Status LayerRowsByHead(KvRowSource& source, int layer, absl::Span<const KvRowRef> rows,
                             int head_dim, E* keys, E* values) {
  const size_t hd = static_cast<size_t>(head_dim);
  std::vector<std::vector<size_t>> of_head;  // row indices, by head
  for (size_t i = 0; i < rows.size(); ++i) {
    const size_t h = static_cast<size_t>(rows[i].head);
    if (h >= of_head.size()) of_head.resize(h + 1);
    of_head[h].push_back(i);
  }
  std::vector<int64_t> positions;
  std::vector<E> k, v;
  for (size_t h = 0; h < of_head.size(); ++h) {
    if (of_head[h].empty()) continue;
    positions.clear();
    for (size_t i : of_head[h]) positions.push_back(rows[i].position);
    k.resize(positions.size() * hd);
    v.resize(k.size());
    KVMEM_RETURN_IF_ERROR(
        SourceRows(source, layer, static_cast<int>(h), positions, k.data(), v.data()));
    for (size_t j = 0; j < of_head[h].size(); ++j) {
      std::memcpy(keys + of_head[h][j] * hd, &k[j * hd], hd * sizeof(E));
      std::memcpy(values + of_head[h][j] * hd, &v[j * hd], hd * sizeof(E));
    }
  }
  return absl::OkStatus();
}

}  // namespace

template <typename E>
absl::Status KvCache::ReadRowsAs(int layer, int kv_head, absl::Span<const int64_t> positions,
                                 E* keys, E* values) const {
  KVMEM_CHECK(layer >= 0 && layer < num_layers_ && kv_head >= 0 && kv_head < num_kv_heads_);
  const size_t hd = static_cast<size_t>(head_dim_);
  if (row_home_ == RowHome::kHost) {
    const HeadKv& h = heads_[layer * num_kv_heads_ + kv_head];
    for (size_t i = 0; i < positions.size(); ++i) {
      auto it = std::lower_bound(h.positions.begin(), h.positions.end(), positions[i]);
      if (it == h.positions.end() || *it != positions[i]) {
        return absl::NotFoundError(absl::StrCat("position ", positions[i], " is not cached"));
      }
      const size_t e = static_cast<size_t>(it - h.positions.begin());
      RowAs(&h.keys[e * hd], hd, keys + i * hd);
      RowAs(&h.values[e * hd], hd, values + i * hd);
    }
    return absl::OkStatus();
  }
  // Fresh rows here, the rest from the source in one call.
  const FreshRows& f = fresh_[layer];
  const int64_t fresh_end = f.first + fresh_size(layer);
  std::vector<int64_t> older;
  std::vector<size_t> older_at;
  for (size_t i = 0; i < positions.size(); ++i) {
    const int64_t p = positions[i];
    if (p >= f.first && p < fresh_end) {
      const size_t off = (static_cast<size_t>(p - f.first) * num_kv_heads_ + kv_head) * hd;
      f.rows.ReadKv(off, hd, keys + i * hd, values + i * hd);
    } else {
      older.push_back(p);
      older_at.push_back(i);
    }
  }
  if (older.empty()) return absl::OkStatus();
  if (row_source_ == nullptr) {
    return absl::FailedPreconditionError(
        "this cache keeps its rows with the backend and has no row source to read them from");
  }
  // Fresh rows hold the newest positions, so the older ones usually come first: then the
  // source writes them in place.
  if (older_at.back() == older.size() - 1) {
    return SourceRows(*row_source_, layer, kv_head, older, keys, values);
  }
  std::vector<E> k(older.size() * hd), v(older.size() * hd);
  KVMEM_RETURN_IF_ERROR(SourceRows(*row_source_, layer, kv_head, older, k.data(), v.data()));
  for (size_t j = 0; j < older.size(); ++j) {
    std::memcpy(keys + older_at[j] * hd, &k[j * hd], hd * sizeof(E));
    std::memcpy(values + older_at[j] * hd, &v[j * hd], hd * sizeof(E));
  }
  return absl::OkStatus();
}

absl::Status KvRowSource::ReadLayerRows(int, absl::Span<const KvRowRef>, float*, float*) {
  return absl::UnimplementedError("this row source reads head by head");
}
absl::Status KvRowSource::ReadLayerRowsBf16(int, absl::Span<const KvRowRef>, uint16_t*, uint16_t*) {
  return absl::UnimplementedError("this row source reads head by head");
}

absl::Status KvCache::ReadRows(int layer, int kv_head, absl::Span<const int64_t> positions,
                               float* keys, float* values) const {
  return ReadRowsAs(layer, kv_head, positions, keys, values);
}

absl::Status KvCache::ReadRowsBf16(int layer, int kv_head, absl::Span<const int64_t> positions,
                                   uint16_t* keys, uint16_t* values) const {
  return ReadRowsAs(layer, kv_head, positions, keys, values);
}

template <typename E>
absl::Status KvCache::ReadLayerRowsAs(int layer, absl::Span<const KvRowRef> rows, E* keys,
                                      E* values) const {
  KVMEM_CHECK(layer >= 0 && layer < num_layers_);
  const size_t hd = static_cast<size_t>(head_dim_);
  for (const KvRowRef& r : rows) KVMEM_CHECK(r.head >= 0 && r.head < num_kv_heads_);
  if (row_home_ == RowHome::kHost) {
    for (size_t i = 0; i < rows.size(); ++i) {
      KVMEM_RETURN_IF_ERROR(ReadRowsAs(layer, rows[i].head,
                                       absl::MakeConstSpan(&rows[i].position, 1), keys + i * hd,
                                       values + i * hd));
    }
    return absl::OkStatus();
  }
  // Fresh rows here (they are laid out like a block: by position, then head), the rest from the
  // source in one call.
  const FreshRows& f = fresh_[layer];
  const int64_t fresh_end = f.first + fresh_size(layer);
  std::vector<KvRowRef> older;
  std::vector<size_t> older_at;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t p = rows[i].position;
    if (p >= f.first && p < fresh_end) {
      const size_t off = (static_cast<size_t>(p - f.first) * num_kv_heads_ + rows[i].head) * hd;
      f.rows.ReadKv(off, hd, keys + i * hd, values + i * hd);
    } else {
      older.push_back(rows[i]);
      older_at.push_back(i);
    }
  }
  if (older.empty()) return absl::OkStatus();
  if (row_source_ == nullptr) {
    return absl::FailedPreconditionError(
        "this cache keeps its rows with the backend and has no row source to read them from");
  }
  const bool in_place = older_at.back() == older.size() - 1;
  std::vector<E> k(in_place ? 0 : older.size() * hd), v(k.size());
  E* const out_k = in_place ? keys : k.data();
  E* const out_v = in_place ? values : v.data();
  absl::Status s = SourceLayerRows(*row_source_, layer, older, out_k, out_v);
  if (absl::IsUnimplemented(s)) {
    s = LayerRowsByHead(*row_source_, layer, absl::MakeConstSpan(older), head_dim_, out_k, out_v);
  }
  KVMEM_RETURN_IF_ERROR(s);
  if (in_place) return absl::OkStatus();
  for (size_t j = 0; j < older.size(); ++j) {
    std::memcpy(keys + older_at[j] * hd, &k[j * hd], hd * sizeof(E));
    std::memcpy(values + older_at[j] * hd, &v[j * hd], hd * sizeof(E));
  }
  return absl::OkStatus();
}

absl::Status KvCache::ReadLayerRows(int layer, absl::Span<const KvRowRef> rows, float* keys,
                                    float* values) const {
  return ReadLayerRowsAs(layer, rows, keys, values);
}

absl::Status KvCache::ReadLayerRowsBf16(int layer, absl::Span<const KvRowRef> rows, uint16_t* keys,
                                        uint16_t* values) const {
  return ReadLayerRowsAs(layer, rows, keys, values);
}

absl::Status KvRowSource::LocateLayerRows(int, absl::Span<const KvRowRef> rows, BlockDType,
                                          const void** keys, const void** values,
                                          std::vector<std::shared_ptr<const KvBlock>>*) {
  std::fill_n(keys, rows.size(), nullptr);
  std::fill_n(values, rows.size(), nullptr);
  return absl::OkStatus();
}

absl::Status KvCache::LocateLayerRows(int layer, absl::Span<const KvRowRef> rows, BlockDType dtype,
                                      const void** keys, const void** values,
                                      std::vector<std::shared_ptr<const KvBlock>>* holds) const {
  KVMEM_CHECK(layer >= 0 && layer < num_layers_);
  std::fill_n(keys, rows.size(), nullptr);
  std::fill_n(values, rows.size(), nullptr);
  if (row_home_ == RowHome::kHost || row_source_ == nullptr) return absl::OkStatus();
  const FreshRows& f = fresh_[layer];
  const int64_t fresh_end = f.first + fresh_size(layer);
  std::vector<KvRowRef> older;
  std::vector<size_t> older_at;
  for (size_t i = 0; i < rows.size(); ++i) {
    KVMEM_CHECK(rows[i].head >= 0 && rows[i].head < num_kv_heads_);
    const int64_t p = rows[i].position;
    if (p >= f.first && p < fresh_end) continue;
    older.push_back(rows[i]);
    older_at.push_back(i);
  }
  if (older.empty()) return absl::OkStatus();
  if (older.size() == rows.size()) {
    return row_source_->LocateLayerRows(layer, rows, dtype, keys, values, holds);
  }
  std::vector<const void*> k(older.size()), v(older.size());
  KVMEM_RETURN_IF_ERROR(
      row_source_->LocateLayerRows(layer, older, dtype, k.data(), v.data(), holds));
  for (size_t j = 0; j < older.size(); ++j) {
    keys[older_at[j]] = k[j];
    values[older_at[j]] = v[j];
  }
  return absl::OkStatus();
}

absl::StatusOr<KvCache> KvCache::WithHostRows() const {
  if (row_home_ == RowHome::kHost) return *this;
  KvCache out(num_layers_, num_kv_heads_, head_dim_, RowHome::kHost);
  for (int l = 0; l < num_layers_; ++l) {
    for (int g = 0; g < num_kv_heads_; ++g) {
      const HeadKv& h = heads_[l * num_kv_heads_ + g];
      HeadKv& o = out.head(l, g);
      o.positions = h.positions;
      o.keys.resize(h.positions.size() * head_dim_);
      o.values.resize(o.keys.size());
      KVMEM_RETURN_IF_ERROR(ReadRows(l, g, h.positions, o.keys.data(), o.values.data()));
    }
  }
  return out;
}

int64_t KvCache::Bytes() const {
  if (row_home_ == RowHome::kHost) {
    return TotalEntries() * 2 * head_dim_ * static_cast<int64_t>(sizeof(float));
  }
  int64_t bytes = 0;
  for (const FreshRows& f : fresh_) bytes += f.rows.bytes();
  return bytes;
}

int64_t KvCache::MaxPosition() const {
  int64_t max_pos = -1;
  for (const HeadKv& h : heads_) {
    if (!h.positions.empty()) max_pos = std::max(max_pos, h.positions.back());
  }
  return max_pos;
}

int64_t KvCache::TotalEntries() const {
  int64_t n = 0;
  for (const HeadKv& h : heads_) n += h.size();
  return n;
}

}  // namespace kvmem
