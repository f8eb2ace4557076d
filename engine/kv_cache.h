// The KV entries a session attends to: per (layer, KV head), ragged across heads.
#ifndef KVMEM_ENGINE_KV_CACHE_H_
#define KVMEM_ENGINE_KV_CACHE_H_

#include <cstdint>
#include <memory>
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

// The entries live in host memory (f32). A device backend keeps its own copy of them beside
// the cache (the attachment) and brings it up to date before every pass; it learns which
// heads changed from their versions: every mutable access to a head counts as a change.
class KvCache {
 public:
  KvCache(int num_layers, int num_kv_heads, int head_dim);
  // A copy holds the same entries but no attachment (a backend copies what it needs again).
  KvCache(const KvCache& other);
  KvCache& operator=(const KvCache& other);
  // A move hands the attachment over with the entries.
  KvCache(KvCache&& other) noexcept = default;
  KvCache& operator=(KvCache&& other) noexcept = default;

  int num_layers() const { return num_layers_; }
  int num_kv_heads() const { return num_kv_heads_; }
  int head_dim() const { return head_dim_; }
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
  std::vector<uint64_t> versions_;  // (layer, kv_head)
  std::shared_ptr<void> attachment_;
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_KV_CACHE_H_
