// A KV block: full-fidelity K and V of `block_size` consecutive positions of one layer, all KV
// heads. Every position a session has seen lives in blocks; hot sets are subsets of them.
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

// A zeroed block with nothing filled.
KvBlock MakeEmptyBlock(int64_t index, int block_size, int num_kv_heads, int head_dim);

}  // namespace kvmem

#endif  // KVMEM_ENGINE_KV_BLOCKS_H_
