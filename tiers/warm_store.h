// The warm tier: KV blocks in host RAM under a byte budget, least recently used out first.
// A block that leaves warm still lives in cold; warm is a cache, never the only copy.
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
  // total fits the budget. A block larger than the whole budget is not kept.
  void Put(const BlockKey& key, std::shared_ptr<const KvBlock> block, int64_t bytes);
  // Like Put for a block read back from cold, except that a held copy with at least as many
  // filled positions wins: a reader racing a commit of the same (partial) block must not
  // replace the newer copy with its older one.
  void Offer(const BlockKey& key, std::shared_ptr<const KvBlock> block, int64_t bytes);
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
