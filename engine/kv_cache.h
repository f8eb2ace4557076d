// The KV entries a session attends to: per (layer, KV head), ragged across heads.
#ifndef KVMEM_ENGINE_KV_CACHE_H_
#define KVMEM_ENGINE_KV_CACHE_H_

#include <cstdint>
#include <vector>

namespace kvmem {

// Entries of one (layer, KV head). Keys are stored after RoPE at their own absolute position,
// so an entry keeps its meaning wherever it sits in the list.
struct HeadKv {
  std::vector<int64_t> positions;  // (n) absolute positions, strictly increasing
  std::vector<float> keys;         // (n, head_dim)
  std::vector<float> values;       // (n, head_dim)

  int64_t size() const { return static_cast<int64_t>(positions.size()); }
  // Appends one entry; `position` must exceed every position already held.
  void Append(int64_t position, const float* key, const float* value, int head_dim);
};

class KvCache {
 public:
  KvCache(int num_layers, int num_kv_heads, int head_dim);

  int num_layers() const { return num_layers_; }
  int num_kv_heads() const { return num_kv_heads_; }
  int head_dim() const { return head_dim_; }
  HeadKv& head(int layer, int kv_head) { return heads_[layer * num_kv_heads_ + kv_head]; }
  const HeadKv& head(int layer, int kv_head) const {
    return heads_[layer * num_kv_heads_ + kv_head];
  }
  // The largest position held by any head, or -1 when empty.
  int64_t MaxPosition() const;
  // Entries summed over all (layer, head).
  int64_t TotalEntries() const;
  // Bytes of keys and values held (f32).
  int64_t Bytes() const { return TotalEntries() * 2 * head_dim_ * static_cast<int64_t>(sizeof(float)); }

 private:
  int num_layers_;
  int num_kv_heads_;
  int head_dim_;
  std::vector<HeadKv> heads_;  // (layer, kv_head)
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_KV_CACHE_H_
