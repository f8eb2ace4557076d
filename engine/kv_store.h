// Where a session's full-fidelity KV blocks live, seen from the engine.
//
// Every position a session has seen is kept in blocks of B consecutive positions per layer
// (K and V of all KV heads), each with a digest per KV head (per-dimension min and max of the
// keys, Quest-style) for recall scoring. Blocks are immutable once full; a session's last,
// partial block is rewritten as it fills. Forks share their parent's full blocks: a block is
// named by the session that wrote it (its owner) plus (layer, index).
//
// The engine only needs to read blocks and hand over each turn's commit; tiers/ implements
// this over warm host RAM and cold RocksDB, MemoryBlockStore here keeps everything in RAM.
#ifndef KVMEM_ENGINE_KV_STORE_H_
#define KVMEM_ENGINE_KV_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/kv_blocks.h"

namespace kvmem {

struct BlockKey {
  uint64_t owner = 0;  // uid of the session that wrote the block
  int layer = 0;
  int64_t index = 0;  // positions [index * B, (index + 1) * B)
  bool operator<(const BlockKey& o) const {
    return std::tie(owner, layer, index) < std::tie(o.owner, o.layer, o.index);
  }
  bool operator==(const BlockKey& o) const {
    return owner == o.owner && layer == o.layer && index == o.index;
  }
};

// Digest of one block for every KV head: (num_kv_heads, 2, head_dim), [0] = min, [1] = max
// of the keys over the block's filled positions.
std::vector<float> ComputeDigest(const KvBlock& block, int num_kv_heads, int head_dim);

// Quest's upper bound of q . k over a block for one KV head: sum_d max(q_d min_d, q_d max_d).
// digest_head points at that head's (2, head_dim).
float DigestScore(const float* q, const float* digest_head, int head_dim);

struct BlockWrite {
  BlockKey key;
  std::shared_ptr<const KvBlock> block;
  std::vector<float> digest;  // (num_kv_heads, 2, head_dim)
};

// One turn, ready to be made durable in one atomic write.
struct TurnCommit {
  int64_t turn_index = 0;
  int role = 0;  // Role as int
  const std::string* text = nullptr;
  const std::vector<int32_t>* tokens = nullptr;
  int64_t first_position = 0;
  int64_t position = 0;            // absolute position after the turn
  std::vector<BlockWrite> blocks;  // new or rewritten blocks of this session
  // Which session owns each block index: (first block index, owner uid), ascending.
  const std::vector<std::pair<int64_t, uint64_t>>* owners = nullptr;
  // Hot positions after the memory policy, (layer * num_kv_heads + head) -> ascending; the
  // session's own lists, not copies (8 MB a turn at Llama-3-8B shape and budget 4096).
  std::vector<const std::vector<int64_t>*> hot_positions;
  // The memory policy's state aligned with hot_positions (empty for stateless policies).
  std::vector<std::vector<double>> policy_scores;
  const std::vector<float>* last_logits = nullptr;  // (vocab)
};

class BlockSource {
 public:
  virtual ~BlockSource() = default;
  // NOT_FOUND when absent; DATA_LOSS when stored bytes fail their checksum. Sets *from_cold
  // (when non-null) to whether the block had to be read from the cold tier.
  virtual absl::StatusOr<std::shared_ptr<const KvBlock>> ReadBlock(const BlockKey& key,
                                                                   bool* from_cold) = 0;
  virtual absl::StatusOr<std::vector<float>> ReadDigest(const BlockKey& key) = 0;
  // The digests of `keys`, in their order: what a restore reads for every block of a layer.
  // The same errors as ReadDigest; this one reads them one by one.
  //
  // A session calls all three from several threads of the shared pool at once (a restore, a
  // page-in, recall): implementations must be safe for that.
  virtual absl::StatusOr<std::vector<std::vector<float>>> ReadDigests(
      absl::Span<const BlockKey> keys);
};

class CommitSink {
 public:
  virtual ~CommitSink() = default;
  // Makes the turn durable; on error nothing of it is.
  virtual absl::Status Commit(const TurnCommit& commit) = 0;
};

// Blocks and digests in host RAM, shared by a session and its forks (engine-only use:
// tests, simulations). Thread-safe.
class MemoryBlockStore : public BlockSource, public CommitSink {
 public:
  absl::StatusOr<std::shared_ptr<const KvBlock>> ReadBlock(const BlockKey& key,
                                                           bool* from_cold) override;
  absl::StatusOr<std::vector<float>> ReadDigest(const BlockKey& key) override;
  absl::Status Commit(const TurnCommit& commit) override;
  int64_t num_blocks() const;

 private:
  mutable std::mutex mu_;
  std::map<BlockKey, std::shared_ptr<const KvBlock>> blocks_;
  std::map<BlockKey, std::vector<float>> digests_;
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_KV_STORE_H_
