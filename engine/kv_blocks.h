// Full-fidelity KV of every position a session has seen, in the block form the tiered store
// persists: per layer, blocks of `block_size` consecutive positions holding K and V of all KV
// heads. Hot sets are subsets of this; what leaves hot stays here and can come back.
#ifndef KVMEM_ENGINE_KV_BLOCKS_H_
#define KVMEM_ENGINE_KV_BLOCKS_H_

#include <cstdint>
#include <vector>

namespace kvmem {

struct KvBlock {
  int64_t index = 0;          // holds positions [index * B, (index + 1) * B)
  int filled = 0;             // positions written; < B only for a session's last block
  std::vector<float> keys;    // (B, num_kv_heads, head_dim), RoPE applied
  std::vector<float> values;  // (B, num_kv_heads, head_dim)
};

class BlockTable {
 public:
  BlockTable(int num_layers, int num_kv_heads, int head_dim, int block_size);

  int block_size() const { return block_size_; }
  // Positions held: [0, positions()).
  int64_t positions() const { return positions_; }

  // Appends positions [positions(), positions() + count) of one layer; k and v are
  // (count, num_kv_heads, head_dim). Call for every layer, then Commit(count).
  void Append(int layer, int64_t count, const float* k, const float* v);
  void Commit(int64_t count) { positions_ += count; }

  // K and V (head_dim each) of one position and KV head; false if not held.
  bool Read(int layer, int64_t position, int kv_head, float* k, float* v) const;

  const std::vector<KvBlock>& layer_blocks(int layer) const { return blocks_[layer]; }
  int64_t num_blocks() const;
  int64_t bytes() const;

 private:
  int num_layers_;
  int num_kv_heads_;
  int head_dim_;
  int block_size_;
  int64_t positions_ = 0;
  std::vector<std::vector<KvBlock>> blocks_;  // (layer) -> blocks by index
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_KV_BLOCKS_H_
