#include "tiers/cold_store.h"

#include <algorithm>
#include <future>
#include <set>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"
#include "rocksdb/db.h"
#include "rocksdb/env.h"
#include "rocksdb/options.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"

namespace kvmem {
namespace {

enum Cf { kDefault, kSessions, kTurns, kBlocks, kDigests, kHot, kRefs, kRequests, kNumCfs };
const char* const kCfNames[] = {"default", "sessions",  "turns", "blocks",
                                "digests", "hot_index", "refs",  "requests"};

void PutBE(std::string* s, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::string SessionKey(const std::string& tenant, const std::string& id) {
  return tenant + '\x1f' + id;
}
std::string UidKey(uint64_t uid) {
  std::string k;
  PutBE(&k, uid, 8);
  return k;
}
std::string TurnKey(uint64_t uid, int64_t turn) {
  std::string k = UidKey(uid);
  PutBE(&k, static_cast<uint64_t>(turn), 8);
  return k;
}
std::string BlockKeyBytes(const BlockKey& key) {
  std::string k = UidKey(key.owner);
  PutBE(&k, static_cast<uint32_t>(key.layer), 4);
  PutBE(&k, static_cast<uint64_t>(key.index), 8);
  return k;
}
std::string HotKey(uint64_t uid, int layer, int head) {
  std::string k = UidKey(uid);
  PutBE(&k, static_cast<uint32_t>(layer), 4);
  PutBE(&k, static_cast<uint32_t>(head), 4);
  return k;
}
std::string RequestKey(uint64_t uid, const std::string& request_id) {
  return UidKey(uid) + request_id;
}
std::string U64Value(uint64_t v) {
  std::string s;
  PutBE(&s, v, 8);
  return s;
}
uint64_t ParseU64(const std::string& s) {
  uint64_t v = 0;
  for (size_t i = 0; i < s.size() && i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(s[i]);
  return v;
}

absl::Status FromRocks(const rocksdb::Status& s, std::string_view what) {
  if (s.ok()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cold store ", std::string(what), ": ", s.ToString()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ColdStore>> ColdStore::Open(const ColdStoreOptions& options) {
  auto store = std::unique_ptr<ColdStore>(new ColdStore());
  store->options_ = options;
  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  db_options.max_background_jobs = 2;
  db_options.max_total_wal_size = options.max_log_bytes;
  std::string path = options.path;
  if (path.empty()) {
    store->mem_env_.reset(rocksdb::NewMemEnv(rocksdb::Env::Default()));
    db_options.env = store->mem_env_.get();
    path = "/kvmem-in-memory";
  }
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  for (int i = 0; i < kNumCfs; ++i) {
    rocksdb::ColumnFamilyOptions cf;
    if (i == kBlocks || i == kDigests) {
      rocksdb::BlockBasedTableOptions table;
      table.block_size = 64 << 10;
      cf.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
      cf.compression = rocksdb::kNoCompression;  // float data barely compresses
    }
    cfs.emplace_back(kCfNames[i], cf);
  }
  rocksdb::Status s = rocksdb::DB::Open(db_options, path, cfs, &store->handles_, &store->db_);
  if (!s.ok()) {
    return absl::UnavailableError(
        absl::StrCat("cannot open the session store at ", path, ": ", s.ToString()));
  }
  if (!options.path.empty()) {
    store->block_dir_ = options.path + "/kvblocks";
    KVMEM_ASSIGN_OR_RETURN(store->block_files_,
                           BlockFiles::Open(store->block_dir_, {.sync = options.sync}));
    KVMEM_RETURN_IF_ERROR(store->RemoveUnreferencedBlockFiles());
  }
  return store;
}

ColdStore::~ColdStore() {
  if (db_ == nullptr) return;
  // Everything into tables, so that the next open replays no log. A failure here loses
  // nothing: the log still holds every write.
  if (mem_env_ == nullptr) {
    rocksdb::FlushOptions flush;
    flush.allow_write_stall = true;
    db_->Flush(flush, handles_).PermitUncheckedError();
  }
  for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
  db_->Close().PermitUncheckedError();
  delete db_;
}

absl::StatusOr<std::vector<SessionRecord>> ColdStore::ListSessions() {
  std::vector<SessionRecord> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator({}, handles_[kSessions]));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    auto record = DecodeSessionRecord(it->value().ToStringView());
    if (!record.ok()) {
      return absl::DataLossError(absl::StrCat("session record \"", it->key().ToString(),
                                              "\": ", record.status().message()));
    }
    out.push_back(std::move(*record));
  }
  KVMEM_RETURN_IF_ERROR(FromRocks(it->status(), "listing sessions"));
  return out;
}

absl::StatusOr<SessionRecord> ColdStore::ReadSession(const std::string& tenant,
                                                     const std::string& id) {
  std::string value;
  rocksdb::Status s = db_->Get({}, handles_[kSessions], SessionKey(tenant, id), &value);
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat("no session \"", id, "\""));
  KVMEM_RETURN_IF_ERROR(FromRocks(s, "reading a session record"));
  return DecodeSessionRecord(value);
}

absl::Status ColdStore::CreateSession(SessionRecord* record) {
  std::lock_guard<std::mutex> lock(meta_mu_);
  const std::string key = SessionKey(record->tenant, record->session_id);
  std::string existing;
  if (db_->Get({}, handles_[kSessions], key, &existing).ok()) {
    return absl::AlreadyExistsError(
        absl::StrCat("session \"", record->session_id, "\" already exists"));
  }
  std::string next;
  uint64_t uid = 1;
  if (db_->Get({}, handles_[kDefault], "next_uid", &next).ok()) uid = ParseU64(next);
  record->uid = uid;
  record->owners = {{0, uid}};
  rocksdb::WriteBatch batch;
  batch.Put(handles_[kDefault], "next_uid", U64Value(uid + 1));
  batch.Put(handles_[kSessions], key, EncodeSessionRecord(*record));
  batch.Put(handles_[kRefs], UidKey(uid), U64Value(1));
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync;
  return FromRocks(db_->Write(wo, &batch), "creating a session");
}

absl::Status ColdStore::CommitTurn(const SessionRecord& record, const TurnCommit& commit,
                                   const std::string& request_id, int num_kv_heads, int head_dim) {
  rocksdb::WriteBatch batch;
  batch.Put(handles_[kSessions], SessionKey(record.tenant, record.session_id),
            EncodeSessionRecord(record));
  if (commit.text != nullptr) {
    TurnRecord turn{static_cast<Role>(commit.role), *commit.text, *commit.tokens,
                    commit.first_position};
    batch.Put(handles_[kTurns], TurnKey(record.uid, commit.turn_index), EncodeTurn(turn));
  }
  // Full blocks of this session go to its block file, synced before the batch that refers to
  // them; partial ones (rewritten as they fill) and every digest go into the batch.
  const size_t n = commit.blocks.size();
  // A 16-bit block's record points into the block (no copy of its values); commit.blocks
  // keeps the blocks alive until the write is done.
  std::vector<BlockRecord> encoded(n);
  std::vector<std::string> digests(n);
  std::vector<char> to_file(n, 0);
  SharedThreadPool().ParallelFor(static_cast<int64_t>(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const KvBlock& b = *commit.blocks[i].block;
      encoded[i] = EncodeBlockRecord(b, num_kv_heads, head_dim);
      digests[i] = EncodeFloats(commit.blocks[i].digest);
      to_file[i] = block_files_ != nullptr && options_.block_files &&
                   commit.blocks[i].key.owner == record.uid &&
                   static_cast<size_t>(b.filled) * num_kv_heads * head_dim == b.size();
    }
  });
  {
    // From here on this process may leave bytes in the file that a replayed write refers to.
    std::lock_guard<std::mutex> lock(settled_mu_);
    settled_.insert(record.uid);
  }
  std::vector<BlockFiles::RecordPieces> file_records;
  for (size_t i = 0; i < n; ++i) {
    if (!to_file[i]) continue;
    const BlockRecord& r = encoded[i];
    file_records.push_back({r.head, r.keys, r.mid, r.values, r.tail});
  }
  // The file append and its sync run on a thread of their own while the rest of the batch is
  // encoded and built here; the references go in once it is done.
  std::vector<BlockFileRef> refs;
  std::future<absl::Status> appended;
  if (!file_records.empty()) {
    appended = std::async(std::launch::async,
                          [&] { return block_files_->Append(record.uid, file_records, &refs); });
  }
  for (size_t i = 0; i < n; ++i) {
    const std::string key = BlockKeyBytes(commit.blocks[i].key);
    if (!to_file[i]) batch.Put(handles_[kBlocks], key, encoded[i].Flatten());
    batch.Put(handles_[kDigests], key, digests[i]);
  }
  const int layers = static_cast<int>(commit.hot_positions.size()) / num_kv_heads;
  std::vector<std::string> hot(commit.hot_positions.size());
  SharedThreadPool().ParallelFor(static_cast<int64_t>(hot.size()), [&](int64_t begin, int64_t end) {
    static const std::vector<double> kNoScores;
    for (int64_t i = begin; i < end; ++i) {
      hot[i] = EncodeHotIndex(*commit.hot_positions[i],
                              static_cast<size_t>(i) < commit.policy_scores.size()
                                  ? commit.policy_scores[i]
                                  : kNoScores);
    }
  });
  for (int l = 0; l < layers; ++l) {
    for (int g = 0; g < num_kv_heads; ++g) {
      batch.Put(handles_[kHot], HotKey(record.uid, l, g),
                hot[static_cast<size_t>(l) * num_kv_heads + g]);
    }
  }
  if (appended.valid()) {
    KVMEM_RETURN_IF_ERROR(appended.get());
    for (size_t i = 0, f = 0; i < n; ++i) {
      if (!to_file[i]) continue;
      batch.Put(handles_[kBlocks], BlockKeyBytes(commit.blocks[i].key),
                EncodeBlockFileRef(refs[f++]));
    }
  }
  if (!request_id.empty()) {
    batch.Put(handles_[kRequests], RequestKey(record.uid, request_id),
              U64Value(static_cast<uint64_t>(commit.turn_index)));
  }
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync;
  // When this fails the appended blocks stay in the file unreferenced: a write RocksDB reports
  // as failed may still be replayed from its log, so cutting them back could lose a turn.
  return FromRocks(db_->Write(wo, &batch), "committing a turn");
}

void ColdStore::SettleBlockFile(uint64_t owner) {
  if (block_files_ == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(settled_mu_);
    if (!settled_.insert(owner).second) return;
  }
  uint64_t end = 0;
  const std::string prefix = UidKey(owner);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator({}, handles_[kBlocks]));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    if (!IsBlockFileRef(it->value().ToStringView())) continue;
    absl::StatusOr<BlockFileRef> ref = DecodeBlockFileRef(it->value().ToStringView());
    if (!ref.ok()) return;  // a damaged reference: cut nothing, its read reports it
    end = std::max<uint64_t>(end, ref->offset + ref->length);
  }
  // A failed scan or cut leaves the leftovers, which later appends skip: nothing is lost.
  if (!it->status().ok()) return;
  block_files_->CutBack(owner, end).IgnoreError();
}

absl::StatusOr<SessionSnapshot> ColdStore::LoadSnapshot(const SessionRecord& record, int num_layers,
                                                        int num_kv_heads) {
  SettleBlockFile(record.uid);
  SessionSnapshot snap;
  snap.position = record.position;
  snap.last_logits = record.last_logits;
  snap.owners = record.owners;
  const std::string prefix = UidKey(record.uid);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator({}, handles_[kTurns]));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    KVMEM_ASSIGN_OR_RETURN(TurnRecord turn, DecodeTurn(it->value().ToStringView()));
    snap.turns.push_back(std::move(turn));
  }
  KVMEM_RETURN_IF_ERROR(FromRocks(it->status(), "reading turns"));
  if (static_cast<int64_t>(snap.turns.size()) != record.turns) {
    return absl::DataLossError(absl::StrCat("session \"", record.session_id, "\" records ",
                                            record.turns, " turns but ", snap.turns.size(),
                                            " are stored"));
  }
  for (int l = 0; l < num_layers; ++l) {
    for (int g = 0; g < num_kv_heads; ++g) {
      std::string value;
      rocksdb::Status s = db_->Get({}, handles_[kHot], HotKey(record.uid, l, g), &value);
      if (s.IsNotFound() && record.turns == 0) {
        snap.hot_positions.emplace_back();
        snap.policy_scores.emplace_back();
        continue;
      }
      KVMEM_RETURN_IF_ERROR(FromRocks(s, "reading the hot index"));
      std::vector<int64_t> positions;
      std::vector<double> scores;
      KVMEM_RETURN_IF_ERROR(DecodeHotIndex(value, &positions, &scores));
      snap.hot_positions.push_back(std::move(positions));
      snap.policy_scores.push_back(std::move(scores));
    }
  }
  return snap;
}

absl::StatusOr<std::shared_ptr<const KvBlock>> ColdStore::ReadBlock(const BlockKey& key,
                                                                    int block_size,
                                                                    int num_kv_heads,
                                                                    int head_dim) {
  rocksdb::PinnableSlice value;
  rocksdb::Status s = db_->Get({}, handles_[kBlocks], BlockKeyBytes(key), &value);
  if (s.IsNotFound()) {
    return absl::NotFoundError(absl::StrCat("KV block (layer ", key.layer, ", index ", key.index,
                                            ") is missing from the cold store"));
  }
  KVMEM_RETURN_IF_ERROR(FromRocks(s, "reading a block"));
  absl::StatusOr<KvBlock> block;
  if (IsBlockFileRef(value.ToStringView())) {
    block = ReadFileBlock(key.owner, value.ToStringView(), block_size, num_kv_heads, head_dim);
  } else {
    block = DecodeBlock(value.ToStringView(), block_size, num_kv_heads, head_dim);
  }
  if (block.ok() && block->index != key.index) {
    block = absl::DataLossError("stored block index does not match its key");
  }
  if (!block.ok()) {
    // Damaged or missing bytes are DATA_LOSS; anything else (out of descriptors, an I/O error)
    // may pass, so it keeps its own code.
    return absl::Status(absl::IsDataLoss(block.status()) || absl::IsNotFound(block.status())
                            ? absl::StatusCode::kDataLoss
                            : block.status().code(),
                        absl::StrCat("KV block (layer ", key.layer, ", index ", key.index,
                                     "): ", block.status().message()));
  }
  return std::make_shared<const KvBlock>(std::move(*block));
}

absl::StatusOr<KvBlock> ColdStore::ReadFileBlock(uint64_t owner, std::string_view ref_value,
                                                 int block_size, int num_kv_heads, int head_dim) {
  KVMEM_ASSIGN_OR_RETURN(BlockFileRef ref, DecodeBlockFileRef(ref_value));
  if (block_files_ == nullptr) {
    return absl::DataLossError("the block refers to a block file but the store keeps none");
  }
  const size_t n = static_cast<size_t>(block_size) * num_kv_heads * head_dim;
  if (ref.length == Block16RecordSize(n)) {
    // A 16-bit block (what a device backend's sessions write): read straight into the block.
    KvBlock block;
    block.dtype = BlockDType::kBF16;
    block.keys16.resize(n);
    block.values16.resize(n);
    KVMEM_RETURN_IF_ERROR(DecodeBlockInto(
        [&](const std::vector<MutablePiece>& pieces) {
          return block_files_->ReadInto(owner, ref, pieces);
        },
        block_size, num_kv_heads, head_dim, &block));
    return block;
  }
  KVMEM_ASSIGN_OR_RETURN(std::string bytes, block_files_->Read(owner, ref));
  return DecodeBlock(bytes, block_size, num_kv_heads, head_dim);
}

absl::StatusOr<std::vector<float>> ColdStore::ReadDigest(const BlockKey& key) {
  std::string value;
  rocksdb::Status s = db_->Get({}, handles_[kDigests], BlockKeyBytes(key), &value);
  if (s.IsNotFound()) return absl::NotFoundError("block digest is missing from the cold store");
  KVMEM_RETURN_IF_ERROR(FromRocks(s, "reading a digest"));
  return DecodeFloats(value, "block digest");
}

absl::StatusOr<std::vector<std::vector<float>>> ColdStore::ReadDigests(
    absl::Span<const BlockKey> keys) {
  const size_t n = keys.size();
  std::vector<std::string> key_bytes(n);
  std::vector<rocksdb::Slice> slices(n);
  for (size_t i = 0; i < n; ++i) {
    key_bytes[i] = BlockKeyBytes(keys[i]);
    slices[i] = key_bytes[i];
  }
  std::vector<rocksdb::PinnableSlice> values(n);
  std::vector<rocksdb::Status> statuses(n);
  db_->MultiGet({}, handles_[kDigests], n, slices.data(), values.data(), statuses.data());
  std::vector<std::vector<float>> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (statuses[i].IsNotFound()) {
      return absl::NotFoundError(absl::StrCat("the digest of KV block (layer ", keys[i].layer,
                                              ", index ", keys[i].index,
                                              ") is missing from the cold store"));
    }
    KVMEM_RETURN_IF_ERROR(FromRocks(statuses[i], "reading a digest"));
    KVMEM_ASSIGN_OR_RETURN(out[i], DecodeFloats(values[i].ToStringView(), "block digest"));
  }
  return out;
}

absl::Status ColdStore::AddRefs(const std::vector<uint64_t>& owners, int delta, void* batch_ptr,
                                std::vector<uint64_t>* freed) {
  auto* batch = static_cast<rocksdb::WriteBatch*>(batch_ptr);
  for (uint64_t owner : owners) {
    std::string value;
    uint64_t count = 0;
    rocksdb::Status s = db_->Get({}, handles_[kRefs], UidKey(owner), &value);
    if (s.ok()) {
      count = ParseU64(value);
    } else if (!s.IsNotFound()) {
      return FromRocks(s, "reading a block reference count");
    }
    const int64_t next = static_cast<int64_t>(count) + delta;
    if (next > 0) {
      batch->Put(handles_[kRefs], UidKey(owner), U64Value(static_cast<uint64_t>(next)));
      continue;
    }
    batch->Delete(handles_[kRefs], UidKey(owner));
    const std::string begin = UidKey(owner), end = UidKey(owner + 1);
    batch->DeleteRange(handles_[kBlocks], begin, end);
    batch->DeleteRange(handles_[kDigests], begin, end);
    if (freed != nullptr) freed->push_back(owner);
  }
  return absl::OkStatus();
}

namespace {
std::vector<uint64_t> DistinctOwners(const SessionRecord& r) {
  std::set<uint64_t> owners = {r.uid};
  for (const auto& [first, uid] : r.owners) owners.insert(uid);
  return std::vector<uint64_t>(owners.begin(), owners.end());
}
}  // namespace

absl::Status ColdStore::ForkSession(const SessionRecord& parent, SessionRecord* child,
                                    int num_layers, int num_kv_heads) {
  std::lock_guard<std::mutex> lock(meta_mu_);
  const std::string key = SessionKey(child->tenant, child->session_id);
  std::string existing;
  if (db_->Get({}, handles_[kSessions], key, &existing).ok()) {
    return absl::AlreadyExistsError(
        absl::StrCat("session \"", child->session_id, "\" already exists"));
  }
  std::string next;
  uint64_t uid = 1;
  if (db_->Get({}, handles_[kDefault], "next_uid", &next).ok()) uid = ParseU64(next);
  child->uid = uid;
  child->owners = parent.owners;
  child->position = parent.position;
  child->turns = parent.turns;
  child->last_logits = parent.last_logits;
  rocksdb::WriteBatch batch;
  batch.Put(handles_[kDefault], "next_uid", U64Value(uid + 1));
  batch.Put(handles_[kSessions], key, EncodeSessionRecord(*child));
  // Exactly the owners the child's own delete will release.
  KVMEM_RETURN_IF_ERROR(AddRefs(DistinctOwners(*child), +1, &batch, nullptr));
  for (int64_t t = 0; t < parent.turns; ++t) {
    std::string value;
    KVMEM_RETURN_IF_ERROR(
        FromRocks(db_->Get({}, handles_[kTurns], TurnKey(parent.uid, t), &value), "reading turns"));
    batch.Put(handles_[kTurns], TurnKey(uid, t), value);
  }
  for (int l = 0; l < num_layers; ++l) {
    for (int g = 0; g < num_kv_heads; ++g) {
      std::string value;
      rocksdb::Status s = db_->Get({}, handles_[kHot], HotKey(parent.uid, l, g), &value);
      if (s.IsNotFound()) continue;
      KVMEM_RETURN_IF_ERROR(FromRocks(s, "reading the hot index"));
      batch.Put(handles_[kHot], HotKey(uid, l, g), value);
    }
  }
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync;
  return FromRocks(db_->Write(wo, &batch), "forking a session");
}

absl::Status ColdStore::DeleteSession(const SessionRecord& record,
                                      std::vector<uint64_t>* freed_owners) {
  std::lock_guard<std::mutex> lock(meta_mu_);
  rocksdb::WriteBatch batch;
  batch.Delete(handles_[kSessions], SessionKey(record.tenant, record.session_id));
  const std::string begin = UidKey(record.uid), end = UidKey(record.uid + 1);
  batch.DeleteRange(handles_[kTurns], begin, end);
  batch.DeleteRange(handles_[kHot], begin, end);
  batch.DeleteRange(handles_[kRequests], begin, end);
  std::vector<uint64_t> freed;
  KVMEM_RETURN_IF_ERROR(AddRefs(DistinctOwners(record), -1, &batch, &freed));
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync;
  KVMEM_RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "deleting a session"));
  for (uint64_t owner : freed) {
    // The delete is committed, so the call succeeds: a file this fails to remove is removed
    // at the next open.
    if (block_files_ != nullptr) block_files_->Remove(owner).IgnoreError();
    if (freed_owners != nullptr) freed_owners->push_back(owner);
  }
  return absl::OkStatus();
}

absl::Status ColdStore::RemoveUnreferencedBlockFiles() {
  KVMEM_ASSIGN_OR_RETURN(std::vector<uint64_t> owners, block_files_->ListOwners());
  for (uint64_t owner : owners) {
    std::string value;
    rocksdb::Status s = db_->Get({}, handles_[kRefs], UidKey(owner), &value);
    // A file that cannot go now (or whose count cannot be read) is tried again at next open:
    // it holds nothing anyone reads, so it must not keep the store from opening.
    if (s.IsNotFound()) block_files_->Remove(owner).IgnoreError();
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<int64_t>> ColdStore::FindRequest(uint64_t uid,
                                                              const std::string& request_id) {
  std::string value;
  rocksdb::Status s = db_->Get({}, handles_[kRequests], RequestKey(uid, request_id), &value);
  if (s.IsNotFound()) return std::optional<int64_t>();
  KVMEM_RETURN_IF_ERROR(FromRocks(s, "reading a request record"));
  return std::optional<int64_t>(static_cast<int64_t>(ParseU64(value)));
}

absl::StatusOr<TurnRecord> ColdStore::ReadTurn(uint64_t uid, int64_t turn) {
  std::string value;
  KVMEM_RETURN_IF_ERROR(
      FromRocks(db_->Get({}, handles_[kTurns], TurnKey(uid, turn), &value), "reading a turn"));
  return DecodeTurn(value);
}

absl::StatusOr<int64_t> ColdStore::CountBlocks(uint64_t owner) {
  int64_t n = 0;
  const std::string prefix = UidKey(owner);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator({}, handles_[kBlocks]));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) ++n;
  KVMEM_RETURN_IF_ERROR(FromRocks(it->status(), "counting blocks"));
  return n;
}

absl::StatusOr<int64_t> ColdStore::CountFileBlocks(uint64_t owner) {
  int64_t n = 0;
  const std::string prefix = UidKey(owner);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator({}, handles_[kBlocks]));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    n += IsBlockFileRef(it->value().ToStringView());
  }
  KVMEM_RETURN_IF_ERROR(FromRocks(it->status(), "counting blocks"));
  return n;
}

absl::Status ColdStore::PutRawBlock(const BlockKey& key, const std::string& value) {
  return FromRocks(db_->Put({}, handles_[kBlocks], BlockKeyBytes(key), value), "writing a block");
}

}  // namespace kvmem
