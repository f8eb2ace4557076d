// The cold tier and durable record of every session: RocksDB.
//
// Column families (keys big-endian, so a prefix scan lists one session or one block owner):
//   sessions   tenant 0x1f id                 -> SessionRecord
//   turns      uid(8) turn(8)                 -> TurnRecord
//   blocks     owner(8) layer(4) index(8)     -> KV block (checksummed), or for a full block
//                                                a reference into its owner's block file
//   digests    owner(8) layer(4) index(8)     -> (kv_heads, 2, head_dim) key min/max
//   hot_index  uid(8) layer(4) head(4)        -> hot positions
//   refs       owner(8)                       -> sessions whose blocks include owner's
//   requests   uid(8) request id              -> turn index the request produced
//   default    "next_uid"                     -> next session uid
// A turn commit is one WriteBatch (fsync'd when `sync`), so a crash loses at most the turn in
// flight; its full blocks are appended to block files (tiers/block_files.h) and synced first.
// Blocks of an owner are dropped when no session references them any more, so forks share their
// parent's blocks and outlive it.
#ifndef KVMEM_TIERS_COLD_STORE_H_
#define KVMEM_TIERS_COLD_STORE_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/kv_store.h"
#include "engine/session.h"
#include "tiers/block_files.h"
#include "tiers/record_codec.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
class Env;
}  // namespace rocksdb

namespace kvmem {

struct ColdStoreOptions {
  // Default: "" (an in-memory RocksDB environment: nothing survives the process).
  std::string path;
  // Default: true. fsync every commit before it is acknowledged. Without it a crash of the
  // process loses nothing acknowledged, but a crash of the machine may lose recent turns and,
  // with block files, leave sessions whose newest blocks read as DATA_LOSS.
  bool sync = true;
  // Default: true. Write full KV blocks to per-owner append-only files under
  // <path>/kvblocks (RocksDB keeps a reference) instead of into RocksDB itself, so their bytes
  // are written once rather than through the WAL, a flush and compactions (docs/tiers.md has
  // the measurements). Partial blocks, rewritten as they fill, stay in RocksDB. Blocks either
  // way are always readable. Ignored for an in-memory store.
  bool block_files = true;
  // Default: 64 MiB. The most bytes of RocksDB's write-ahead log kept before the tables whose
  // writes it holds are flushed, which bounds what a restart after a crash replays. (RocksDB's
  // own limit follows its memtables: each turn's digests, partial blocks and hot index went
  // into the log, and at the Llama-3-8B shape a 16K-token session left 355 MB of it, replayed
  // in 0.7-1.4 s at every start.) 0 leaves RocksDB's own limit. A clean close flushes every
  // column family, so that the next open has no log to replay.
  uint64_t max_log_bytes = 64 << 20;
};

class ColdStore {
 public:
  // INTERNAL / IO errors from RocksDB carry its message and the path.
  static absl::StatusOr<std::unique_ptr<ColdStore>> Open(const ColdStoreOptions& options);
  ~ColdStore();

  absl::StatusOr<std::vector<SessionRecord>> ListSessions();
  // NOT_FOUND when the store has no such session.
  absl::StatusOr<SessionRecord> ReadSession(const std::string& tenant, const std::string& id);
  // Assigns record->uid and writes the record. ALREADY_EXISTS for a taken (tenant, id).
  absl::Status CreateSession(SessionRecord* record);
  // One turn: the updated record, the turn, new blocks and digests, the hot index and
  // (when request_id is non-empty) the request's answer, in one atomic write.
  absl::Status CommitTurn(const SessionRecord& record, const TurnCommit& commit,
                          const std::string& request_id, int num_kv_heads, int head_dim);
  // The state a session is restored from.
  absl::StatusOr<SessionSnapshot> LoadSnapshot(const SessionRecord& record, int num_layers,
                                               int num_kv_heads);
  absl::StatusOr<std::shared_ptr<const KvBlock>> ReadBlock(const BlockKey& key, int block_size,
                                                           int num_kv_heads, int head_dim);
  absl::StatusOr<std::vector<float>> ReadDigest(const BlockKey& key);
  // The digests of `keys`, in their order, in one batched read (RocksDB's MultiGet).
  absl::StatusOr<std::vector<std::vector<float>>> ReadDigests(absl::Span<const BlockKey> keys);
  // Writes `child` (uid assigned) as a fork of `parent`: turns and hot index copied, blocks
  // shared by reference.
  absl::Status ForkSession(const SessionRecord& parent, SessionRecord* child, int num_layers,
                           int num_kv_heads);
  // Removes the session from the store; blocks no other session references go too.
  // `freed_owners` receives the owners whose blocks were dropped.
  absl::Status DeleteSession(const SessionRecord& record, std::vector<uint64_t>* freed_owners);
  // The turn index a request id produced, if it was committed.
  absl::StatusOr<std::optional<int64_t>> FindRequest(uint64_t uid, const std::string& request_id);
  absl::StatusOr<TurnRecord> ReadTurn(uint64_t uid, int64_t turn);
  // Stored blocks written by `owner` (all layers).
  absl::StatusOr<int64_t> CountBlocks(uint64_t owner);
  // Stored blocks of `owner` that live in its block file.
  absl::StatusOr<int64_t> CountFileBlocks(uint64_t owner);
  // The directory of block files; empty for an in-memory store.
  const std::string& block_dir() const { return block_dir_; }

  // For tests that damage stored bytes on purpose.
  absl::Status PutRawBlock(const BlockKey& key, const std::string& value);

 private:
  ColdStore() = default;
  // Removes the block files of owners no session references (a crash came between a delete's
  // commit and its unlink).
  absl::Status RemoveUnreferencedBlockFiles();
  // The block a blocks-family reference names, read from its owner's file (a 16-bit block
  // straight into its values) and decoded.
  absl::StatusOr<KvBlock> ReadFileBlock(uint64_t owner, std::string_view ref_value, int block_size,
                                        int num_kv_heads, int head_dim);
  absl::Status AddRefs(const std::vector<uint64_t>& owners, int delta, void* batch,
                       std::vector<uint64_t>* freed);
  // Once per owner and process, before its first commit here: cuts the owner's block file back
  // to the end of the last record its stored references name, dropping the leftovers of
  // commits a crash (or a failed RocksDB write in an earlier process) cut short. Only then is
  // the store's state final: a write RocksDB reported as failed in this process may still be
  // replayed at the next open, so a commit here settles the owner without a cut.
  void SettleBlockFile(uint64_t owner);

  ColdStoreOptions options_;
  std::string block_dir_;
  std::unique_ptr<BlockFiles> block_files_;  // null for an in-memory store
  std::unique_ptr<rocksdb::Env> mem_env_;
  rocksdb::DB* db_ = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  std::mutex meta_mu_;  // serialises uid allocation and reference counting
  std::mutex settled_mu_;
  std::set<uint64_t> settled_;  // owners whose block files need no more cutting back
};

}  // namespace kvmem

#endif  // KVMEM_TIERS_COLD_STORE_H_
