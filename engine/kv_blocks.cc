#include "engine/kv_blocks.h"

#include <algorithm>
#include <cstring>

#include "engine/status_macros.h"

namespace kvmem {

BlockTable::BlockTable(int num_layers, int num_kv_heads, int head_dim, int block_size)
    : num_layers_(num_layers),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      block_size_(block_size),
      blocks_(num_layers) {
  KVMEM_CHECK(block_size > 0);
}

void BlockTable::Append(int layer, int64_t count, const float* k, const float* v) {
  const int64_t row = static_cast<int64_t>(num_kv_heads_) * head_dim_;
  std::vector<KvBlock>& blocks = blocks_[layer];
  for (int64_t i = 0; i < count; ++i) {
    const int64_t pos = positions_ + i;
    const int64_t index = pos / block_size_;
    const int64_t slot = pos % block_size_;
    if (static_cast<int64_t>(blocks.size()) <= index) {
      KVMEM_CHECK(static_cast<int64_t>(blocks.size()) == index);
      KvBlock& b = blocks.emplace_back();
      b.index = index;
      b.keys.assign(block_size_ * row, 0.f);
      b.values.assign(block_size_ * row, 0.f);
    }
    KvBlock& b = blocks[index];
    KVMEM_CHECK(b.filled == slot);
    std::memcpy(&b.keys[slot * row], k + i * row, row * sizeof(float));
    std::memcpy(&b.values[slot * row], v + i * row, row * sizeof(float));
    ++b.filled;
  }
}

bool BlockTable::Read(int layer, int64_t position, int kv_head, float* k, float* v) const {
  if (position < 0 || position >= positions_) return false;
  const KvBlock& b = blocks_[layer][position / block_size_];
  const int64_t off = ((position % block_size_) * num_kv_heads_ + kv_head) * head_dim_;
  std::memcpy(k, &b.keys[off], head_dim_ * sizeof(float));
  std::memcpy(v, &b.values[off], head_dim_ * sizeof(float));
  return true;
}

int64_t BlockTable::num_blocks() const {
  int64_t n = 0;
  for (const auto& layer : blocks_) n += static_cast<int64_t>(layer.size());
  return n;
}

int64_t BlockTable::bytes() const {
  return num_blocks() * 2 * block_size_ * static_cast<int64_t>(num_kv_heads_) * head_dim_ *
         static_cast<int64_t>(sizeof(float));
}

}  // namespace kvmem
