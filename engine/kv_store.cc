#include "engine/kv_store.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace kvmem {

std::vector<float> ComputeDigest(const KvBlock& block, int num_kv_heads, int head_dim) {
  std::vector<float> digest(static_cast<size_t>(num_kv_heads) * 2 * head_dim);
  for (int g = 0; g < num_kv_heads; ++g) {
    std::fill_n(&digest[(g * 2) * head_dim], head_dim, std::numeric_limits<float>::infinity());
    std::fill_n(&digest[(g * 2 + 1) * head_dim], head_dim, -std::numeric_limits<float>::infinity());
  }
  // Rows in the block's order (position, then head), each widened to f32 in a small buffer
  // (an f32 block's are read in place).
  std::vector<float> wide(block.dtype == BlockDType::kF32 ? 0 : head_dim);
  for (int s = 0; s < block.filled; ++s) {
    for (int g = 0; g < num_kv_heads; ++g) {
      const size_t off = (static_cast<size_t>(s) * num_kv_heads + g) * head_dim;
      const float* k = block.keys.data() + off;
      if (block.dtype != BlockDType::kF32) {
        block.ReadKeys(off, head_dim, wide.data());
        k = wide.data();
      }
      float* lo = &digest[(g * 2) * head_dim];
      float* hi = &digest[(g * 2 + 1) * head_dim];
      // std::min and std::max, written as the selects they are, in a loop the compiler
      // vectorizes (lo, hi and k never overlap).
#pragma omp simd
      for (int d = 0; d < head_dim; ++d) {
        lo[d] = k[d] < lo[d] ? k[d] : lo[d];
        hi[d] = hi[d] < k[d] ? k[d] : hi[d];
      }
    }
  }
  return digest;
}

float DigestScore(const float* q, const float* digest_head, int head_dim) {
  const float* lo = digest_head;
  const float* hi = digest_head + head_dim;
  // In element order, one rounded add per element: LaunchDigestScores reproduces it bit for bit
  // (kernels/digest.cuh), so both backends recall the same blocks. No reassociation here.
  float score = 0.f;
  for (int d = 0; d < head_dim; ++d) score += std::max(q[d] * lo[d], q[d] * hi[d]);
  return score;
}

absl::StatusOr<std::shared_ptr<const KvBlock>> MemoryBlockStore::ReadBlock(const BlockKey& key,
                                                                           bool* from_cold) {
  std::lock_guard<std::mutex> lock(mu_);
  if (from_cold != nullptr) *from_cold = false;
  auto it = blocks_.find(key);
  if (it == blocks_.end()) {
    return absl::NotFoundError(absl::StrCat("no KV block (owner ", key.owner, ", layer ", key.layer,
                                            ", index ", key.index, ")"));
  }
  return it->second;
}

absl::StatusOr<std::vector<std::vector<float>>> BlockSource::ReadDigests(
    absl::Span<const BlockKey> keys) {
  std::vector<std::vector<float>> out;
  out.reserve(keys.size());
  for (const BlockKey& key : keys) {
    KVMEM_ASSIGN_OR_RETURN(std::vector<float> digest, ReadDigest(key));
    out.push_back(std::move(digest));
  }
  return out;
}

absl::StatusOr<std::vector<float>> MemoryBlockStore::ReadDigest(const BlockKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = digests_.find(key);
  if (it == digests_.end()) return absl::NotFoundError("no digest for KV block");
  return it->second;
}

absl::Status MemoryBlockStore::Commit(const TurnCommit& commit) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const BlockWrite& w : commit.blocks) {
    blocks_[w.key] = w.block;
    digests_[w.key] = w.digest;
  }
  return absl::OkStatus();
}

int64_t MemoryBlockStore::num_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(blocks_.size());
}

}  // namespace kvmem
