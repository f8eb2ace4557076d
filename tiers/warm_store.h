// The warm tier: KV blocks in host RAM under a byte budget, least recently used out first.
// A block that leaves warm still lives in cold; warm is a cache, never the only copy.
//
// Freshness invariant: for every key, warm holds nothing, a full block, or the copy of a
// partial block that its owner committed last. So a hit is never older than the last
// completed commit of that key, and a miss falls through to cold, which is written first.
// It holds because
//   - full blocks are immutable (engine/kv_store.h): every copy of one is the same;
//   - a partial block enters warm only through Put, which the owner's commit calls after its
//     cold write; one session's commits run one at a time, so the puts of a key arrive in
//     commit order, and only the owner ever writes its keys;
//   - a read that fell through to cold caches its copy through Offer, which keeps full blocks
//     only. A reader's copy of a partial block (a fork reading its parent's last block) may
//     predate a commit that raced the read, and the newer copy may have been evicted before
//     the reader gets to cache its own, so no check against what warm holds can tell.
#ifndef KVMEM_TIERS_WARM_STORE_H_
#define KVMEM_TIERS_WARM_STORE_H_

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>

#include "engine/kv_store.h"

namespace kvmem {

class WarmStore {
 public:
  // `budget_bytes` <= 0 keeps nothing.
  explicit WarmStore(int64_t budget_bytes) : budget_(budget_bytes) {}

  // The block, marked most recently used; null when not held.
  std::shared_ptr<const KvBlock> Get(const BlockKey& key);
  // Inserts or replaces a block of `bytes`, evicting least recently used blocks until the
  // total fits the budget. A block larger than the whole budget is not kept. Only a commit of
  // `key`'s owner may put a partial block (see the invariant above).
  void Put(const BlockKey& key, std::shared_ptr<const KvBlock> block, int64_t bytes);
  // Caches a block a reader fetched from cold, of `block_size` positions. Like Put for a full
  // block (filled == block_size) unless a full copy is already held; a partial block is never
  // kept, so the next read of it goes to cold.
  void Offer(const BlockKey& key, std::shared_ptr<const KvBlock> block, int block_size,
             int64_t bytes);
  void Erase(const BlockKey& key);
  // Drops every block written by `owner`.
  void EraseOwner(uint64_t owner);
  bool Contains(const BlockKey& key) const;

  int64_t bytes() const;
  int64_t size() const;
  int64_t budget() const { return budget_; }
  int64_t hits() const;
  int64_t misses() const;

 private:
  struct Slot {
    std::shared_ptr<const KvBlock> block;
    int64_t bytes;
    std::list<BlockKey>::iterator lru;  // position in lru_
  };
  void EraseLocked(std::map<BlockKey, Slot>::iterator it);
  void PutLocked(const BlockKey& key, std::shared_ptr<const KvBlock> block, int64_t bytes);

  const int64_t budget_;
  mutable std::mutex mu_;
  std::map<BlockKey, Slot> slots_;
  std::list<BlockKey> lru_;  // most recently used first
  int64_t bytes_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

}  // namespace kvmem

#endif  // KVMEM_TIERS_WARM_STORE_H_
