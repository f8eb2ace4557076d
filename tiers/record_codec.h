// Byte layouts of everything the cold tier stores, with bounds-checked decoding.
//
// Integers are little-endian inside values; keys are big-endian (keys.h) so that a prefix scan
// lists one session. Every value ends with a CRC-32C of the bytes before it; a mismatch
// decodes as DATA_LOSS.
#ifndef KVMEM_TIERS_RECORD_CODEC_H_
#define KVMEM_TIERS_RECORD_CODEC_H_

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/kv_blocks.h"
#include "engine/session.h"

namespace kvmem {

class ByteWriter {
 public:
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v);
  void U64(uint64_t v);
  void I64(int64_t v) { U64(static_cast<uint64_t>(v)); }
  void F32(float v);
  void F64(double v);
  void Str(std::string_view s);
  void Floats(absl::Span<const float> v);
  void U16s(absl::Span<const uint16_t> v);
  void I64s(const std::vector<int64_t>& v);
  void I32s(const std::vector<int32_t>& v);
  void Reserve(size_t bytes) { out_.reserve(bytes); }
  // Appends the checksum and returns the value.
  std::string Finish();
  // The bytes so far, without a checksum (a piece of a larger record); the writer is empty
  // after.
  std::string Take() {
    std::string out = std::move(out_);
    out_.clear();
    return out;
  }

 private:
  std::string out_;
};

class ByteReader {
 public:
  // DATA_LOSS when the trailing checksum does not match `what`'s bytes.
  static absl::StatusOr<ByteReader> Open(std::string_view value, std::string_view what);
  // Reads `bytes` as they are: a piece of a record whose checksum was checked as a whole.
  static ByteReader Unchecked(std::string_view bytes);
  bool U8(uint8_t* v);
  bool U32(uint32_t* v);
  bool U64(uint64_t* v);
  bool I64(int64_t* v);
  bool F32(float* v);
  bool F64(double* v);
  bool Str(std::string* s);
  // Into a std::vector or a block's BlockVector.
  template <typename Vec>
  bool Floats(Vec* v) {
    return Array(v);
  }
  template <typename Vec>
  bool U16s(Vec* v) {
    return Array(v);
  }
  bool I64s(std::vector<int64_t>* v);
  bool I32s(std::vector<int32_t>* v);
  bool done() const { return pos_ == data_.size(); }

 private:
  bool Take(size_t n, const char** p);
  // A count, then that many values of Vec's element type as they are in memory.
  template <typename Vec>
  bool Array(Vec* v) {
    using E = typename Vec::value_type;
    uint64_t n;
    const char* p;
    if (!U64(&n) || n > (data_.size() - pos_) / sizeof(E) || !Take(n * sizeof(E), &p)) return false;
    v->resize(n);
    std::memcpy(v->data(), p, n * sizeof(E));
    return true;
  }
  std::string_view data_;
  size_t pos_ = 0;
};

// A stored KV block: header (layout version, dtype, index, filled, block size, heads,
// head_dim), K, V, checksum. K and V are stored in the narrowest of bf16, f16 and f32 that
// holds every value exactly: a device backend's bf16 or f16 rows take half the bytes of f32,
// and decoding always gives back the very same floats.
std::string EncodeBlock(const KvBlock& block, int num_kv_heads, int head_dim);
absl::StatusOr<KvBlock> DecodeBlock(std::string_view value, int block_size, int num_kv_heads,
                                    int head_dim);

// EncodeBlock's bytes as pieces, so that a 16-bit block's values are written straight from the
// block with no copy: the record is head, keys, mid, values, tail back to back. `keys` and
// `values` point into the block, which must outlive the record; an f32 block (narrowed first)
// is encoded whole into `head`, with the other pieces but `tail` empty.
struct BlockRecord {
  std::string head;  // header and the keys' count
  std::string_view keys;
  std::string mid;  // the values' count
  std::string_view values;
  std::string tail;  // the CRC-32C of everything before it
  uint32_t crc = 0;

  size_t size() const { return head.size() + keys.size() + mid.size() + values.size() + 4; }
  std::string Flatten() const;
};
BlockRecord EncodeBlockRecord(const KvBlock& block, int num_kv_heads, int head_dim);
// The byte length of a 16-bit block's record of `values` values in K (as many in V); records
// of this length are the ones DecodeBlockInto reads.
size_t Block16RecordSize(size_t values);
// Reads a 16-bit block's record into `block`, whose keys16 and values16 must already have the
// layout's size: `read(pieces)` fills the record's pieces in order (a small header, the keys,
// the values' count, the values, the CRC) straight from storage, so the values land in the
// block without a copy. DATA_LOSS as DecodeBlock for damaged or mismatched bytes; errors of
// `read` pass through. On an error the block's values are undefined.
struct MutablePiece {
  char* data;
  size_t size;
};
absl::Status DecodeBlockInto(
    const std::function<absl::Status(const std::vector<MutablePiece>&)>& read, int block_size,
    int num_kv_heads, int head_dim, KvBlock* block);

// Where a full block lives in its owner's block file (tiers/block_files.h). The blocks column
// family then holds this reference in place of the block; the two are told apart by their
// leading magic, so stores written before block files still read.
struct BlockFileRef {
  uint64_t offset = 0;  // of the record in the file
  uint32_t length = 0;  // of the record, checksum included
  uint32_t crc = 0;     // the record's own trailing CRC-32C: the reference names one record
};
std::string EncodeBlockFileRef(const BlockFileRef& ref);
bool IsBlockFileRef(std::string_view value);
absl::StatusOr<BlockFileRef> DecodeBlockFileRef(std::string_view value);
// The trailing CRC-32C of a record made by ByteWriter::Finish (its size must be at least 4).
uint32_t TrailingCrc(std::string_view record);

std::string EncodeFloats(const std::vector<float>& v);
absl::StatusOr<std::vector<float>> DecodeFloats(std::string_view value, std::string_view what);
// One (layer, KV head)'s hot positions and the memory policy's scores for them (may be empty).
std::string EncodeHotIndex(const std::vector<int64_t>& positions,
                           const std::vector<double>& scores);
absl::Status DecodeHotIndex(std::string_view value, std::vector<int64_t>* positions,
                            std::vector<double>* scores);

std::string EncodeTurn(const TurnRecord& turn);
absl::StatusOr<TurnRecord> DecodeTurn(std::string_view value);

// Everything about a session except its turns, blocks and hot index.
struct SessionRecord {
  std::string tenant;
  std::string session_id;
  uint64_t uid = 0;
  std::string fingerprint;  // of the model that wrote it
  std::map<std::string, std::string> labels;
  SessionOptions options;
  int64_t created_unix_ms = 0;
  int64_t updated_unix_ms = 0;
  int64_t position = 0;
  int64_t turns = 0;
  std::vector<std::pair<int64_t, uint64_t>> owners;  // (first block index, owner uid)
  std::vector<float> last_logits;
};
std::string EncodeSessionRecord(const SessionRecord& r);
absl::StatusOr<SessionRecord> DecodeSessionRecord(std::string_view value);

}  // namespace kvmem

#endif  // KVMEM_TIERS_RECORD_CODEC_H_
