#include "tiers/warm_store.h"

namespace kvmem {

std::shared_ptr<const KvBlock> WarmStore::Get(const BlockKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = slots_.find(key);
  if (it == slots_.end()) {
    ++misses_;
    return nullptr;
  }
  ++hits_;
  lru_.splice(lru_.begin(), lru_, it->second.lru);
  return it->second.block;
}

void WarmStore::Put(const BlockKey& key, std::shared_ptr<const KvBlock> block, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  PutLocked(key, std::move(block), bytes);
}

void WarmStore::PutLocked(const BlockKey& key, std::shared_ptr<const KvBlock> block,
                          int64_t bytes) {
  auto it = slots_.find(key);
  if (it != slots_.end()) EraseLocked(it);
  if (bytes > budget_) return;
  while (bytes_ + bytes > budget_) EraseLocked(slots_.find(lru_.back()));
  lru_.push_front(key);
  slots_.emplace(key, Slot{std::move(block), bytes, lru_.begin()});
  bytes_ += bytes;
}

void WarmStore::Offer(const BlockKey& key, std::shared_ptr<const KvBlock> block, int block_size,
                      int64_t bytes) {
  if (block->filled < block_size) return;  // may predate a racing commit: see the header
  std::lock_guard<std::mutex> lock(mu_);
  auto it = slots_.find(key);
  if (it != slots_.end() && it->second.block->filled >= block_size) return;  // the same block
  PutLocked(key, std::move(block), bytes);
}

void WarmStore::Erase(const BlockKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = slots_.find(key);
  if (it != slots_.end()) EraseLocked(it);
}

void WarmStore::EraseOwner(uint64_t owner) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = slots_.lower_bound(BlockKey{owner, 0, 0});
  while (it != slots_.end() && it->first.owner == owner) EraseLocked(it++);
}

bool WarmStore::Contains(const BlockKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  return slots_.count(key) > 0;
}

void WarmStore::EraseLocked(std::map<BlockKey, Slot>::iterator it) {
  bytes_ -= it->second.bytes;
  lru_.erase(it->second.lru);
  slots_.erase(it);
}

int64_t WarmStore::bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_;
}
int64_t WarmStore::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(slots_.size());
}
int64_t WarmStore::hits() const {
  std::lock_guard<std::mutex> lock(mu_);
  return hits_;
}
int64_t WarmStore::misses() const {
  std::lock_guard<std::mutex> lock(mu_);
  return misses_;
}

}  // namespace kvmem
