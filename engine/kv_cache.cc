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
      heads_(static_cast<size_t>(num_layers) * num_kv_heads) {}

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
