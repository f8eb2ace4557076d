#include "tiers/record_codec.h"

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"
#include "tiers/crc32c.h"

namespace kvmem {
namespace {

constexpr uint32_t kBlockMagic = 0x4b564231;     // "KVB1"
constexpr uint32_t kBlockRefMagic = 0x4b565231;  // "KVR1"
constexpr uint32_t kSessionMagic = 0x4b565331;   // "KVS1"
constexpr uint8_t kDTypeF32 = 1;
constexpr uint8_t kDTypeBF16 = 2;
constexpr uint8_t kDTypeF16 = 3;

// The narrowest of bf16, f16 and f32 that holds every value of `parts` exactly; for the 16-bit
// types, (*codes)[i] holds part i's values.
uint8_t Narrowest(std::initializer_list<absl::Span<const float>> parts,
                  std::vector<std::vector<uint16_t>>* codes) {
  // bf16 first, in two passes the compiler vectorizes: a value is a bf16 exactly when the low
  // 16 bits of its f32 are zero; then the high halves are the codes.
  uint32_t low = 0;
  for (absl::Span<const float> part : parts) {
    const float* v = part.data();
    for (size_t i = 0; i < part.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, &v[i], sizeof(bits));
      low |= bits & 0xffffu;
    }
  }
  codes->assign(parts.size(), {});
  if (low == 0) {
    size_t p = 0;
    for (absl::Span<const float> part : parts) {
      std::vector<uint16_t>& out = (*codes)[p++];
      out.resize(part.size());
      for (size_t i = 0; i < part.size(); ++i) {
        uint32_t bits;
        std::memcpy(&bits, &part[i], sizeof(bits));
        out[i] = static_cast<uint16_t>(bits >> 16);
      }
    }
    return kDTypeBF16;
  }
  size_t p = 0;
  for (absl::Span<const float> part : parts) {
    std::vector<uint16_t>& out = (*codes)[p++];
    out.resize(part.size());
    for (size_t i = 0; i < part.size(); ++i) {
      if (!ExactF16Bits(part[i], &out[i])) {
        codes->clear();
        return kDTypeF32;
      }
    }
  }
  return kDTypeF16;
}

void Widen(uint8_t dtype, const std::vector<uint16_t>& in, std::vector<float>* out) {
  out->resize(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    (*out)[i] = dtype == kDTypeBF16 ? BFloat16ToFloat(in[i]) : HalfToFloat(in[i]);
  }
}

// Values written as `dtype`: f32 as they are, the 16-bit types as their codes.
void WriteValues(ByteWriter& w, uint8_t dtype, absl::Span<const float> values,
                 const std::vector<uint16_t>* codes) {
  if (dtype == kDTypeF32) {
    w.Floats(values);
  } else {
    w.U16s(*codes);
  }
}

bool ReadValues(ByteReader& r, uint8_t dtype, std::vector<float>* values) {
  if (dtype == kDTypeF32) return r.Floats(values);
  if (dtype != kDTypeBF16 && dtype != kDTypeF16) return false;
  std::vector<uint16_t> codes;
  if (!r.U16s(&codes)) return false;
  Widen(dtype, codes, values);
  return true;
}

// Leading U64 of records in a later layout. A record in the first layout starts with an element
// count, which never comes near these values.
constexpr uint64_t kNarrowFloatsTag = 0xfffffffffffffe02ull;
constexpr uint64_t kDeltaHotIndexTag = 0xfffffffffffffe03ull;

absl::Status Corrupt(std::string_view what) {
  return absl::DataLossError(absl::StrCat("stored ", std::string(what), " is corrupt"));
}

}  // namespace

void ByteWriter::U32(uint32_t v) {
  for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void ByteWriter::U64(uint64_t v) {
  for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void ByteWriter::F32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  U32(bits);
}
void ByteWriter::F64(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, 8);
  U64(bits);
}
void ByteWriter::Str(std::string_view s) {
  U64(s.size());
  out_.append(s.data(), s.size());
}
void ByteWriter::Floats(absl::Span<const float> v) {
  U64(v.size());
  out_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}
void ByteWriter::U16s(absl::Span<const uint16_t> v) {
  U64(v.size());
  out_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(uint16_t));
}
void ByteWriter::I64s(const std::vector<int64_t>& v) {
  U64(v.size());
  for (int64_t x : v) I64(x);
}
void ByteWriter::I32s(const std::vector<int32_t>& v) {
  U64(v.size());
  for (int32_t x : v) U32(static_cast<uint32_t>(x));
}
ByteReader ByteReader::Unchecked(std::string_view bytes) {
  ByteReader r;
  r.data_ = bytes;
  return r;
}
std::string ByteWriter::Finish() {
  const uint32_t crc = Crc32c(out_.data(), out_.size());
  U32(crc);
  return std::move(out_);
}

absl::StatusOr<ByteReader> ByteReader::Open(std::string_view value, std::string_view what) {
  if (value.size() < 4) return Corrupt(what);
  if (Crc32c(value.data(), value.size() - 4) != TrailingCrc(value)) {
    return absl::DataLossError(
        absl::StrCat("stored ", std::string(what), " fails its checksum (corrupt on disk)"));
  }
  ByteReader r;
  r.data_ = value.substr(0, value.size() - 4);
  return r;
}

bool ByteReader::Take(size_t n, const char** p) {
  if (n > data_.size() - pos_) return false;
  *p = data_.data() + pos_;
  pos_ += n;
  return true;
}
bool ByteReader::U8(uint8_t* v) {
  const char* p;
  if (!Take(1, &p)) return false;
  *v = static_cast<uint8_t>(*p);
  return true;
}
bool ByteReader::U32(uint32_t* v) {
  const char* p;
  if (!Take(4, &p)) return false;
  *v = 0;
  for (int i = 0; i < 4; ++i) *v |= static_cast<uint32_t>(static_cast<uint8_t>(p[i])) << (8 * i);
  return true;
}
bool ByteReader::U64(uint64_t* v) {
  const char* p;
  if (!Take(8, &p)) return false;
  *v = 0;
  for (int i = 0; i < 8; ++i) *v |= static_cast<uint64_t>(static_cast<uint8_t>(p[i])) << (8 * i);
  return true;
}
bool ByteReader::I64(int64_t* v) {
  uint64_t u;
  if (!U64(&u)) return false;
  *v = static_cast<int64_t>(u);
  return true;
}
bool ByteReader::F32(float* v) {
  uint32_t bits;
  if (!U32(&bits)) return false;
  std::memcpy(v, &bits, 4);
  return true;
}
bool ByteReader::F64(double* v) {
  uint64_t bits;
  if (!U64(&bits)) return false;
  std::memcpy(v, &bits, 8);
  return true;
}
bool ByteReader::Str(std::string* s) {
  uint64_t n;
  const char* p;
  if (!U64(&n) || !Take(n, &p)) return false;
  s->assign(p, n);
  return true;
}
bool ByteReader::I64s(std::vector<int64_t>* v) {
  uint64_t n;
  if (!U64(&n) || n > (data_.size() - pos_) / 8) return false;
  v->resize(n);
  for (int64_t& x : *v) {
    if (!I64(&x)) return false;
  }
  return true;
}
bool ByteReader::I32s(std::vector<int32_t>* v) {
  uint64_t n;
  if (!U64(&n) || n > (data_.size() - pos_) / 4) return false;
  v->resize(n);
  for (int32_t& x : *v) {
    uint32_t u;
    if (!U32(&u)) return false;
    x = static_cast<int32_t>(u);
  }
  return true;
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "records store values little-endian, as they are in memory");

// A block's header and the keys' count: magic, dtype, index, filled, block size, heads,
// head_dim, count.
constexpr size_t kBlockHeadBytes = 4 + 1 + 8 + 4 * 4 + 8;

BlockRecord EncodeBlockRecord(const KvBlock& block, int num_kv_heads, int head_dim) {
  // A 16-bit block is written as it is; an f32 one in the narrowest type that holds it exactly.
  std::vector<std::vector<uint16_t>> codes;
  const uint8_t dtype = block.dtype == BlockDType::kBF16 ? kDTypeBF16
                        : block.dtype == BlockDType::kF16
                            ? kDTypeF16
                            : Narrowest({block.keys, block.values}, &codes);
  const size_t n = block.size();
  ByteWriter w;
  w.Reserve(block.dtype == BlockDType::kF32 ? kBlockHeadBytes + n * 8 + 8 : kBlockHeadBytes);
  w.U32(kBlockMagic);
  w.U8(dtype);
  w.I64(block.index);
  w.U32(static_cast<uint32_t>(block.filled));
  w.U32(static_cast<uint32_t>(n / (static_cast<size_t>(num_kv_heads) * head_dim)));
  w.U32(static_cast<uint32_t>(num_kv_heads));
  w.U32(static_cast<uint32_t>(head_dim));
  BlockRecord r;
  if (block.dtype != BlockDType::kF32) {
    KVMEM_CHECK(block.values16.size() == n);  // the record views n values of each
    w.U64(n);
    r.head = w.Take();
    r.keys = {reinterpret_cast<const char*>(block.keys16.data()), n * sizeof(uint16_t)};
    ByteWriter m;
    m.U64(n);
    r.mid = m.Take();
    r.values = {reinterpret_cast<const char*>(block.values16.data()), n * sizeof(uint16_t)};
  } else {
    WriteValues(w, dtype, block.keys, codes.empty() ? nullptr : &codes[0]);
    WriteValues(w, dtype, block.values, codes.empty() ? nullptr : &codes[1]);
    r.head = w.Take();
  }
  uint32_t crc = Crc32c(r.head.data(), r.head.size());
  crc = Crc32c(r.keys.data(), r.keys.size(), crc);
  crc = Crc32c(r.mid.data(), r.mid.size(), crc);
  r.crc = Crc32c(r.values.data(), r.values.size(), crc);
  ByteWriter t;
  t.U32(r.crc);
  r.tail = t.Take();
  return r;
}

std::string BlockRecord::Flatten() const {
  std::string out;
  out.reserve(size());
  for (std::string_view piece :
       {std::string_view(head), keys, std::string_view(mid), values, std::string_view(tail)}) {
    out.append(piece.data(), piece.size());
  }
  return out;
}

std::string EncodeBlock(const KvBlock& block, int num_kv_heads, int head_dim) {
  return EncodeBlockRecord(block, num_kv_heads, head_dim).Flatten();
}

size_t Block16RecordSize(size_t values) { return kBlockHeadBytes + 4 * values + 8 + 4; }

absl::Status DecodeBlockInto(
    const std::function<absl::Status(const std::vector<MutablePiece>&)>& read, int block_size,
    int num_kv_heads, int head_dim, KvBlock* block) {
  const size_t n = static_cast<size_t>(block_size) * num_kv_heads * head_dim;
  if (block->keys16.size() != n || block->values16.size() != n) {
    return absl::InternalError("DecodeBlockInto needs a block of the layout's size");
  }
  char head[kBlockHeadBytes], mid[8], tail[4];
  KVMEM_RETURN_IF_ERROR(read({{head, sizeof(head)},
                              {reinterpret_cast<char*>(block->keys16.data()), n * 2},
                              {mid, sizeof(mid)},
                              {reinterpret_cast<char*>(block->values16.data()), n * 2},
                              {tail, sizeof(tail)}}));
  uint32_t crc = Crc32c(head, sizeof(head));
  crc = Crc32c(block->keys16.data(), n * 2, crc);
  crc = Crc32c(mid, sizeof(mid), crc);
  crc = Crc32c(block->values16.data(), n * 2, crc);
  if (crc != TrailingCrc({tail, sizeof(tail)})) {
    return absl::DataLossError("stored KV block fails its checksum (corrupt on disk)");
  }
  ByteReader hr = ByteReader::Unchecked({head, sizeof(head)});
  ByteReader mr = ByteReader::Unchecked({mid, sizeof(mid)});
  uint32_t magic, filled, bs, heads, hd;
  uint64_t keys_count, values_count;
  uint8_t dtype;
  int64_t index;
  if (!hr.U32(&magic) || magic != kBlockMagic || !hr.U8(&dtype) ||
      (dtype != kDTypeBF16 && dtype != kDTypeF16) || !hr.I64(&index) || !hr.U32(&filled) ||
      !hr.U32(&bs) || !hr.U32(&heads) || !hr.U32(&hd) || !hr.U64(&keys_count) ||
      !mr.U64(&values_count)) {
    return Corrupt("KV block");
  }
  if (static_cast<int>(bs) != block_size || static_cast<int>(heads) != num_kv_heads ||
      static_cast<int>(hd) != head_dim || filled > bs || keys_count != n || values_count != n) {
    return absl::DataLossError("stored KV block does not match the session's block layout");
  }
  block->index = index;
  block->filled = static_cast<int>(filled);
  block->dtype = dtype == kDTypeBF16 ? BlockDType::kBF16 : BlockDType::kF16;
  return absl::OkStatus();
}

absl::StatusOr<KvBlock> DecodeBlock(std::string_view value, int block_size, int num_kv_heads,
                                    int head_dim) {
  KVMEM_ASSIGN_OR_RETURN(ByteReader r, ByteReader::Open(value, "KV block"));
  uint32_t magic, filled, bs, heads, hd;
  uint8_t dtype;
  KvBlock b;
  if (!r.U32(&magic) || magic != kBlockMagic || !r.U8(&dtype) ||
      (dtype != kDTypeF32 && dtype != kDTypeBF16 && dtype != kDTypeF16) || !r.I64(&b.index) ||
      !r.U32(&filled) || !r.U32(&bs) || !r.U32(&heads) || !r.U32(&hd)) {
    return Corrupt("KV block");
  }
  // 16-bit values stay 16-bit: the block keeps the stored type, bit for bit.
  b.dtype = dtype == kDTypeBF16  ? BlockDType::kBF16
            : dtype == kDTypeF16 ? BlockDType::kF16
                                 : BlockDType::kF32;
  const bool read = b.dtype == BlockDType::kF32 ? r.Floats(&b.keys) && r.Floats(&b.values)
                                                : r.U16s(&b.keys16) && r.U16s(&b.values16);
  if (!read || !r.done()) return Corrupt("KV block");
  const size_t n = b.size(), m = b.dtype == BlockDType::kF32 ? b.values.size() : b.values16.size();
  if (static_cast<int>(bs) != block_size || static_cast<int>(heads) != num_kv_heads ||
      static_cast<int>(hd) != head_dim || filled > bs ||
      n != static_cast<size_t>(bs) * heads * hd || m != n) {
    return absl::DataLossError("stored KV block does not match the session's block layout");
  }
  b.filled = static_cast<int>(filled);
  return b;
}

std::string EncodeBlockFileRef(const BlockFileRef& ref) {
  ByteWriter w;
  w.U32(kBlockRefMagic);
  w.U64(ref.offset);
  w.U32(ref.length);
  w.U32(ref.crc);
  return w.Finish();
}

bool IsBlockFileRef(std::string_view value) {
  uint32_t magic = 0;
  if (value.size() < 4) return false;
  for (int i = 0; i < 4; ++i)
    magic |= static_cast<uint32_t>(static_cast<uint8_t>(value[i])) << (8 * i);
  return magic == kBlockRefMagic;
}

absl::StatusOr<BlockFileRef> DecodeBlockFileRef(std::string_view value) {
  KVMEM_ASSIGN_OR_RETURN(ByteReader r, ByteReader::Open(value, "KV block reference"));
  uint32_t magic;
  BlockFileRef ref;
  if (!r.U32(&magic) || magic != kBlockRefMagic || !r.U64(&ref.offset) || !r.U32(&ref.length) ||
      !r.U32(&ref.crc) || !r.done() || ref.length < 4) {
    return Corrupt("KV block reference");
  }
  return ref;
}

uint32_t TrailingCrc(std::string_view record) {
  uint32_t crc = 0;
  for (int i = 0; i < 4; ++i) {
    crc |= static_cast<uint32_t>(static_cast<uint8_t>(record[record.size() - 4 + i])) << (8 * i);
  }
  return crc;
}

std::string EncodeFloats(const std::vector<float>& v) {
  std::vector<std::vector<uint16_t>> codes;
  const uint8_t dtype = Narrowest({v}, &codes);
  ByteWriter w;
  w.U64(kNarrowFloatsTag);
  w.U8(dtype);
  WriteValues(w, dtype, v, codes.empty() ? nullptr : &codes[0]);
  return w.Finish();
}

absl::StatusOr<std::vector<float>> DecodeFloats(std::string_view value, std::string_view what) {
  KVMEM_ASSIGN_OR_RETURN(ByteReader r, ByteReader::Open(value, what));
  std::vector<float> v;
  const ByteReader first = r;
  uint64_t tag;
  uint8_t dtype;
  if (r.U64(&tag) && tag == kNarrowFloatsTag) {
    if (!r.U8(&dtype) || !ReadValues(r, dtype, &v) || !r.done()) return Corrupt(what);
    return v;
  }
  r = first;  // the first layout: a count, then f32 values
  if (!r.Floats(&v) || !r.done()) return Corrupt(what);
  return v;
}

std::string EncodeHotIndex(const std::vector<int64_t>& positions,
                           const std::vector<double>& scores) {
  // Ascending positions as LEB128 varints of their gaps (the first from -1): a byte or two per
  // entry instead of eight.
  ByteWriter w;
  w.U64(kDeltaHotIndexTag);
  w.U64(positions.size());
  int64_t previous = -1;
  for (int64_t p : positions) {
    KVMEM_CHECK(p > previous);
    uint64_t gap = static_cast<uint64_t>(p - previous);
    previous = p;
    while (gap >= 0x80) {
      w.U8(static_cast<uint8_t>(gap | 0x80));
      gap >>= 7;
    }
    w.U8(static_cast<uint8_t>(gap));
  }
  w.U64(scores.size());
  for (double v : scores) w.F64(v);
  return w.Finish();
}

absl::Status DecodeHotIndex(std::string_view value, std::vector<int64_t>* positions,
                            std::vector<double>* scores) {
  KVMEM_ASSIGN_OR_RETURN(ByteReader r, ByteReader::Open(value, "hot index"));
  const ByteReader first = r;
  uint64_t tag, count, n;
  bool ok = true;
  if (r.U64(&tag) && tag == kDeltaHotIndexTag) {
    ok = r.U64(&count) && count <= value.size();  // at least a byte per entry
    positions->clear();
    int64_t previous = -1;
    for (uint64_t i = 0; ok && i < count; ++i) {
      uint64_t gap = 0;
      uint8_t byte = 0x80;
      for (int shift = 0; ok && (byte & 0x80) != 0; shift += 7) {
        ok = shift < 63 && r.U8(&byte);
        gap |= static_cast<uint64_t>(byte & 0x7f) << shift;
      }
      ok = ok && gap >= 1 && gap <= static_cast<uint64_t>(INT64_MAX - previous);
      if (ok) positions->push_back(previous += static_cast<int64_t>(gap));
    }
  } else {
    r = first;  // the first layout: eight bytes per position
    ok = r.I64s(positions);
  }
  ok = ok && r.U64(&n) && n <= positions->size();
  scores->resize(ok ? n : 0);
  for (uint64_t i = 0; ok && i < n; ++i) ok = r.F64(&(*scores)[i]);
  if (!ok || !r.done()) return Corrupt("hot index");
  return absl::OkStatus();
}

std::string EncodeTurn(const TurnRecord& turn) {
  ByteWriter w;
  w.U8(static_cast<uint8_t>(turn.role));
  w.Str(turn.text);
  w.I32s(turn.tokens);
  w.I64(turn.first_position);
  return w.Finish();
}

absl::StatusOr<TurnRecord> DecodeTurn(std::string_view value) {
  KVMEM_ASSIGN_OR_RETURN(ByteReader r, ByteReader::Open(value, "turn"));
  TurnRecord t;
  uint8_t role;
  if (!r.U8(&role) || role > 3 || !r.Str(&t.text) || !r.I32s(&t.tokens) ||
      !r.I64(&t.first_position) || !r.done()) {
    return Corrupt("turn");
  }
  t.role = static_cast<Role>(role);
  return t;
}

std::string EncodeSessionRecord(const SessionRecord& s) {
  ByteWriter w;
  w.U32(kSessionMagic);
  w.Str(s.tenant);
  w.Str(s.session_id);
  w.U64(s.uid);
  w.Str(s.fingerprint);
  w.U64(s.labels.size());
  for (const auto& [k, v] : s.labels) {
    w.Str(k);
    w.Str(v);
  }
  const SessionOptions& o = s.options;
  w.Str(o.chat_template);
  w.Str(o.memory.policy);
  w.U32(static_cast<uint32_t>(o.memory.budget));
  w.U32(static_cast<uint32_t>(o.memory.window));
  w.U32(static_cast<uint32_t>(o.memory.kernel));
  w.U8(o.memory.pooling == Pooling::kAvg ? 1 : 0);
  w.U32(static_cast<uint32_t>(o.memory.sink_tokens));
  w.U32(static_cast<uint32_t>(o.block_size));
  w.U32(static_cast<uint32_t>(o.max_turn_tokens));
  w.U32(static_cast<uint32_t>(o.recall_blocks));
  w.F64(o.memory.min_head_share);
  w.F64(o.memory.recent_share);
  w.I64(s.created_unix_ms);
  w.I64(s.updated_unix_ms);
  w.I64(s.position);
  w.I64(s.turns);
  w.U64(s.owners.size());
  for (const auto& [first, uid] : s.owners) {
    w.I64(first);
    w.U64(uid);
  }
  w.Floats(s.last_logits);
  return w.Finish();
}

absl::StatusOr<SessionRecord> DecodeSessionRecord(std::string_view value) {
  KVMEM_ASSIGN_OR_RETURN(ByteReader r, ByteReader::Open(value, "session record"));
  SessionRecord s;
  uint32_t magic;
  uint64_t labels, owners;
  bool ok = r.U32(&magic) && magic == kSessionMagic && r.Str(&s.tenant) && r.Str(&s.session_id) &&
            r.U64(&s.uid) && r.Str(&s.fingerprint) && r.U64(&labels);
  for (uint64_t i = 0; ok && i < labels; ++i) {
    std::string k, v;
    ok = r.Str(&k) && r.Str(&v);
    s.labels[k] = v;
  }
  SessionOptions& o = s.options;
  uint32_t budget, window, kernel, sinks, block, max_turn, recall;
  uint8_t pooling;
  ok = ok && r.Str(&o.chat_template) && r.Str(&o.memory.policy) && r.U32(&budget) &&
       r.U32(&window) && r.U32(&kernel) && r.U8(&pooling) && r.U32(&sinks) && r.U32(&block) &&
       r.U32(&max_turn) && r.U32(&recall) && r.F64(&o.memory.min_head_share) &&
       r.F64(&o.memory.recent_share) && r.I64(&s.created_unix_ms) && r.I64(&s.updated_unix_ms) &&
       r.I64(&s.position) && r.I64(&s.turns) && r.U64(&owners);
  for (uint64_t i = 0; ok && i < owners; ++i) {
    int64_t first;
    uint64_t uid;
    ok = r.I64(&first) && r.U64(&uid);
    s.owners.push_back({first, uid});
  }
  ok = ok && r.Floats(&s.last_logits) && r.done();
  if (!ok) return Corrupt("session record");
  o.memory.budget = static_cast<int>(budget);
  o.memory.window = static_cast<int>(window);
  o.memory.kernel = static_cast<int>(kernel);
  o.memory.pooling = pooling ? Pooling::kAvg : Pooling::kMax;
  o.memory.sink_tokens = static_cast<int>(sinks);
  o.block_size = static_cast<int>(block);
  o.max_turn_tokens = static_cast<int>(max_turn);
  o.recall_blocks = static_cast<int>(recall);
  return s;
}

}  // namespace kvmem
