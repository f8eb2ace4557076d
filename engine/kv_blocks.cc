#include "engine/kv_blocks.h"

#include <cstddef>

namespace kvmem {

KvBlock MakeEmptyBlock(int64_t index, int block_size, int num_kv_heads, int head_dim) {
  KvBlock b;
  b.index = index;
  b.filled = 0;
  const size_t n = static_cast<size_t>(block_size) * num_kv_heads * head_dim;
  b.keys.assign(n, 0.f);
  b.values.assign(n, 0.f);
  return b;
}

}  // namespace kvmem
