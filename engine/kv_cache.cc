#include "engine/kv_cache.h"

#include <algorithm>

#include "engine/status_macros.h"

namespace kvmem {

void HeadKv::Append(int64_t position, const float* key, const float* value, int head_dim) {
  KVMEM_CHECK(positions.empty() || position > positions.back());
  positions.push_back(position);
  keys.insert(keys.end(), key, key + head_dim);
  values.insert(values.end(), value, value + head_dim);
}

KvCache::KvCache(int num_layers, int num_kv_heads, int head_dim)
    : num_layers_(num_layers),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      heads_(static_cast<size_t>(num_layers) * num_kv_heads),
      versions_(heads_.size(), 0) {}

KvCache::KvCache(const KvCache& other)
    : num_layers_(other.num_layers_),
      num_kv_heads_(other.num_kv_heads_),
      head_dim_(other.head_dim_),
      heads_(other.heads_),
      versions_(other.versions_) {}

KvCache& KvCache::operator=(const KvCache& other) {
  if (this == &other) return *this;
  num_layers_ = other.num_layers_;
  num_kv_heads_ = other.num_kv_heads_;
  head_dim_ = other.head_dim_;
  heads_ = other.heads_;
  // Versions must not repeat ones a backend may have seen for this cache's former entries.
  versions_.resize(heads_.size(), 0);
  for (size_t i = 0; i < versions_.size(); ++i) {
    versions_[i] = std::max(versions_[i], other.versions_[i]) + 1;
  }
  attachment_.reset();
  return *this;
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
