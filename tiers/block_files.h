// Full KV blocks in append-only files beside RocksDB, one file per block owner.
//
// A full block never changes once written, so it gains nothing from passing through RocksDB's
// write-ahead log, memtable flush and compactions, which write each block's bytes at least three
// times (docs/tiers.md has the measurements). Instead a turn's full blocks are appended to their
// owner's file and made durable first; the turn's RocksDB batch then stores a small reference
// (BlockFileRef) to each, so the turn still commits atomically: a crash between the two leaves
// bytes at the end of the file that nothing refers to, and later appends go after them.
//
// Layout: <dir>/<owner as 16 hex digits>.kvb, records back to back, each the encoded block
// (EncodeBlock: magic, layout, values, CRC-32C). A file is removed when its owner's blocks are
// dropped (ColdStore::DeleteSession), or at open when no session references its owner any more
// (a crash between the delete's commit and the unlink).
#ifndef KVMEM_TIERS_BLOCK_FILES_H_
#define KVMEM_TIERS_BLOCK_FILES_H_

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "tiers/record_codec.h"

namespace kvmem {

class BlockFiles {
 public:
  struct Options {
    // Default: true. fdatasync each append before it returns.
    bool sync = true;
    // Default: 256. Descriptors kept open between calls (least recently used are closed).
    int max_open_files = 256;
  };

  // Creates `dir` when it does not exist. INTERNAL when it cannot be created or read.
  static absl::StatusOr<std::unique_ptr<BlockFiles>> Open(const std::string& dir,
                                                          const Options& options);
  ~BlockFiles();
  BlockFiles(const BlockFiles&) = delete;
  BlockFiles& operator=(const BlockFiles&) = delete;

  // Appends `records` (each ending with its CRC-32C, as ByteWriter::Finish makes them) to
  // owner's file and, with `sync`, makes them and the file's directory entry durable. On
  // success (*refs)[i] locates records[i]. On failure nothing is appended (the file is cut
  // back): RESOURCE_EXHAUSTED when the disk, descriptors or memory ran out, else INTERNAL.
  // Appends for one owner must not run concurrently: one session writes its own blocks.
  absl::Status Append(uint64_t owner, const std::vector<std::string>& records,
                      std::vector<BlockFileRef>* refs);
  // The same with each record given as pieces written back to back (BlockRecord's, which point
  // into the blocks themselves); a record's last piece holds at least its 4-byte CRC.
  using RecordPieces = std::vector<std::string_view>;
  absl::Status Append(uint64_t owner, const std::vector<RecordPieces>& records,
                      std::vector<BlockFileRef>* refs);
  // One record. DATA_LOSS when the file is missing, shorter than `ref`, or holds other bytes
  // there (the record's checksum differs from the reference's).
  absl::StatusOr<std::string> Read(uint64_t owner, const BlockFileRef& ref);
  // The same straight into `pieces` (in order; their sizes add up to ref.length and the last
  // holds at least the 4-byte CRC), which checks that the record ends with the reference's CRC.
  // Checking the record's bytes against it is the caller's part.
  absl::Status ReadInto(uint64_t owner, const BlockFileRef& ref,
                        const std::vector<MutablePiece>& pieces);
  // Deletes owner's file; OK when there is none.
  absl::Status Remove(uint64_t owner);
  // Cuts owner's file back to `length` bytes (durably, with `sync`) when it is longer: the
  // bytes past the last record a committed turn refers to are leftovers of a commit that never
  // happened. No-op when there is no file or it is not longer. Appends for the owner must not
  // run at the same time.
  absl::Status CutBack(uint64_t owner, uint64_t length);
  // Owners that have a file.
  absl::StatusOr<std::vector<uint64_t>> ListOwners() const;

 private:
  struct File;
  BlockFiles(std::string dir, const Options& options) : dir_(std::move(dir)), options_(options) {}
  std::string PathOf(uint64_t owner) const;
  // The open file of `owner`; `create` makes a missing one (NOT_FOUND otherwise).
  absl::StatusOr<std::shared_ptr<File>> Get(uint64_t owner, bool create);

  const std::string dir_;
  const Options options_;
  std::mutex mu_;            // guards the descriptor cache
  std::list<uint64_t> lru_;  // most recently used first
  struct Entry {
    std::shared_ptr<File> file;
    std::list<uint64_t>::iterator lru;
  };
  std::unordered_map<uint64_t, Entry> open_;
  uint64_t removals_ = 0;  // Remove calls so far
};

}  // namespace kvmem

#endif  // KVMEM_TIERS_BLOCK_FILES_H_
