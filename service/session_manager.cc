#include "service/session_manager.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <list>
#include <mutex>
#include <random>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "tiers/cold_store.h"
#include "tiers/warm_store.h"

namespace kvmem {
namespace {

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::Status ValidateSessionId(const std::string& id) {
  if (id.empty() || id.size() > 128) {
    return absl::InvalidArgumentError("session id must be 1-128 characters");
  }
  for (char c : id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) {
      return absl::InvalidArgumentError(
          absl::StrCat("session id \"", id, "\" has a character outside [A-Za-z0-9._-]"));
    }
  }
  return absl::OkStatus();
}

std::string NewSessionId() {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> lock(mu);
  static const char kHex[] = "0123456789abcdef";
  std::string id = "s-";
  uint64_t a = rng(), b = rng();
  for (int i = 0; i < 16; ++i) id.push_back(kHex[(i < 8 ? a >> (i * 4) : b >> ((i - 8) * 4)) & 15]);
  return id;
}

SessionOptions ApplyOverrides(SessionOptions o, const SessionOverrides& v) {
  if (v.policy) o.memory.policy = *v.policy;
  if (v.budget) o.memory.budget = *v.budget;
  if (v.window) o.memory.window = *v.window;
  if (v.kernel) o.memory.kernel = *v.kernel;
  if (v.pooling) o.memory.pooling = *v.pooling;
  if (v.recall_blocks) o.recall_blocks = *v.recall_blocks;
  if (v.chat_template) o.chat_template = *v.chat_template;
  return o;
}

// Answers of recent requests with an id, kept in memory so a retry is answered exactly the
// same; committed requests are also found in the store after a restart.
constexpr size_t kRememberedRequests = 256;

// Host bytes of one block of K and V, in the type the backend's sessions write.
int64_t BlockBytes(const SessionOptions& o, const ModelConfig& c, BlockDType dtype) {
  return 2 * static_cast<int64_t>(o.block_size) * c.kv_dim() * (dtype == BlockDType::kF32 ? 4 : 2);
}

uint64_t OwnerOf(const std::vector<std::pair<int64_t, uint64_t>>& owners, int64_t index) {
  uint64_t owner = owners.front().second;
  for (const auto& [first, uid] : owners) {
    if (first > index) break;
    owner = uid;
  }
  return owner;
}

// Reads blocks through the warm tier, falling back to cold.
class TieredBlockSource : public BlockSource {
 public:
  TieredBlockSource(ColdStore* cold, WarmStore* warm, const SessionOptions& options,
                    const ModelConfig& config,
                    const std::function<void(const BlockKey&)>& after_cold_read)
      : cold_(cold),
        warm_(warm),
        block_size_(options.block_size),
        config_(config),
        after_cold_read_(after_cold_read) {}

  absl::StatusOr<std::shared_ptr<const KvBlock>> ReadBlock(const BlockKey& key,
                                                           bool* from_cold) override {
    if (auto block = warm_->Get(key)) {
      if (from_cold != nullptr) *from_cold = false;
      return block;
    }
    KVMEM_ASSIGN_OR_RETURN(
        auto block, cold_->ReadBlock(key, block_size_, config_.num_kv_heads, config_.head_dim));
    if (after_cold_read_) after_cold_read_(key);
    warm_->Offer(key, block, block_size_, block->bytes());
    if (from_cold != nullptr) *from_cold = true;
    return block;
  }
  absl::StatusOr<std::vector<float>> ReadDigest(const BlockKey& key) override {
    return cold_->ReadDigest(key);
  }
  absl::StatusOr<std::vector<std::vector<float>>> ReadDigests(
      absl::Span<const BlockKey> keys) override {
    return cold_->ReadDigests(keys);
  }

 private:
  ColdStore* cold_;
  WarmStore* warm_;
  int block_size_;
  const ModelConfig& config_;
  std::function<void(const BlockKey&)> after_cold_read_;  // test hook; may be empty
};

struct Entry;

// Makes a session's turns durable: the updated record and the turn in one cold write, then
// the new blocks into warm.
class EntryCommitSink : public CommitSink {
 public:
  EntryCommitSink(Entry* entry, ColdStore* cold, WarmStore* warm, const ModelConfig& config)
      : entry_(entry), cold_(cold), warm_(warm), config_(config) {}
  absl::Status Commit(const TurnCommit& commit) override;
  std::string request_id;  // of the call in flight, recorded with its commit

 private:
  Entry* entry_;
  ColdStore* cold_;
  WarmStore* warm_;
  const ModelConfig& config_;
};

// A mutex that admits waiters in arrival order (a ticket lock), so calls on a busy session
// are applied in the order they arrived rather than whichever thread wakes first.
class FifoMutex {
 public:
  void lock() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t ticket = next_ticket_++;
    turn_.wait(lock, [&] { return serving_ == ticket; });
  }
  bool try_lock() {
    std::lock_guard<std::mutex> lock(mu_);
    if (serving_ != next_ticket_) return false;
    ++next_ticket_;
    return true;
  }
  void unlock() {
    std::lock_guard<std::mutex> lock(mu_);
    ++serving_;
    turn_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable turn_;
  uint64_t next_ticket_ = 0;
  uint64_t serving_ = 0;
};

struct Entry {
  FifoMutex mu;  // held for the whole of every call on this session, so calls apply in order
  SessionRecord record;  // as last committed
  std::mutex record_mu;  // guards writes of `record`, and its reads without `mu` (listing)
  std::unique_ptr<Session> session;  // null while paged out
  std::shared_ptr<EntryCommitSink> sink;
  bool foreign = false;  // written under another model fingerprint: never served
  bool deleted = false;
  int64_t hot_bytes = 0;  // of the resident session after its last call
  uint64_t last_used = 0;
  std::map<std::string, AppendResult> appended;     // request id -> answer
  std::map<std::string, GenerateResult> generated;  // request id -> answer
  std::deque<std::string> request_order;
};

absl::Status EntryCommitSink::Commit(const TurnCommit& commit) {
  SessionRecord next = entry_->record;
  next.position = commit.position;
  if (commit.text != nullptr) next.turns = commit.turn_index + 1;
  next.owners = *commit.owners;
  next.last_logits = *commit.last_logits;
  next.updated_unix_ms = NowUnixMs();
  KVMEM_RETURN_IF_ERROR(
      cold_->CommitTurn(next, commit, request_id, config_.num_kv_heads, config_.head_dim));
  {
    std::lock_guard<std::mutex> lock(entry_->record_mu);
    entry_->record = std::move(next);
  }
  // After the cold write and in commit order (a session's calls run one at a time): the warm
  // tier's freshness invariant rests on it (tiers/warm_store.h).
  for (const BlockWrite& w : commit.blocks) warm_->Put(w.key, w.block, w.block->bytes());
  return absl::OkStatus();
}

void Remember(Entry& e, const std::string& request_id) {
  e.request_order.push_back(request_id);
  if (e.request_order.size() > kRememberedRequests) {
    e.appended.erase(e.request_order.front());
    e.generated.erase(e.request_order.front());
    e.request_order.pop_front();
  }
}

class DurableSessionManager : public SessionManager {
 public:
  DurableSessionManager(const Model& model, Backend& backend, const SessionManagerOptions& options,
                        std::unique_ptr<ColdStore> cold)
      : model_(model),
        backend_(backend),
        options_(options),
        cold_(std::move(cold)),
        warm_(options.warm_bytes) {}

  // Lists the sessions of the store (loaded lazily on their first call).
  absl::Status LoadIndex() {
    KVMEM_ASSIGN_OR_RETURN(std::vector<SessionRecord> records, cold_->ListSessions());
    std::lock_guard<std::mutex> lock(mu_);
    for (SessionRecord& r : records) {
      auto entry = NewEntry(std::move(r));
      sessions_[Key(entry->record.tenant, entry->record.session_id)] = entry;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<SessionInfo> CreateSession(const CreateSessionRequest& request) override {
    const std::string id = request.session_id.empty() ? NewSessionId() : request.session_id;
    KVMEM_RETURN_IF_ERROR(ValidateSessionId(id));
    for (const auto& [k, v] : request.labels) {
      if (k.empty() || k.size() > 256 || v.size() > 1024) {
        return absl::InvalidArgumentError(
            "labels need a key of 1-256 bytes and a value of at most 1024 bytes");
      }
    }
    SessionRecord record;
    record.tenant = request.tenant;
    record.session_id = id;
    record.fingerprint = model_.fingerprint();
    record.labels = request.labels;
    record.options = ApplyOverrides(options_.session_defaults, request.overrides);
    record.created_unix_ms = record.updated_unix_ms = NowUnixMs();
    // Validate the options by building the session before anything is stored.
    KVMEM_RETURN_IF_ERROR(Session::Create(model_, backend_, record.options).status());
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (sessions_.count(Key(request.tenant, id)) > 0) {
        return absl::AlreadyExistsError(absl::StrCat("session \"", id, "\" already exists"));
      }
    }
    KVMEM_RETURN_IF_ERROR(cold_->CreateSession(&record));
    auto entry = NewEntry(std::move(record));
    std::lock_guard<FifoMutex> entry_lock(entry->mu);
    {
      std::lock_guard<std::mutex> lock(mu_);
      sessions_[Key(request.tenant, id)] = entry;
    }
    KVMEM_RETURN_IF_ERROR(Load(*entry));
    return Describe(*entry);
  }

  absl::StatusOr<AppendResult> AppendTurn(const AppendTurnRequest& request) override {
    if (request.content.empty()) {
      return absl::InvalidArgumentError("content is empty; send the text of the turn");
    }
    if (static_cast<int64_t>(request.content.size()) > options_.max_content_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("content is ", request.content.size(),
                                                     " bytes, more than the limit of ",
                                                     options_.max_content_bytes));
    }
    KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, Find(request.tenant, request.session_id));
    std::unique_lock<FifoMutex> lock(entry->mu);
    KVMEM_RETURN_IF_ERROR(CheckServable(*entry));
    if (!request.request_id.empty()) {
      auto it = entry->appended.find(request.request_id);
      if (it != entry->appended.end()) return it->second;
      KVMEM_RETURN_IF_ERROR(CheckRequestKind(*entry, request.request_id, kAppendTag));
      KVMEM_ASSIGN_OR_RETURN(
          auto done, cold_->FindRequest(entry->record.uid, kAppendTag + request.request_id));
      if (done) {
        KVMEM_ASSIGN_OR_RETURN(TurnRecord turn, cold_->ReadTurn(entry->record.uid, *done));
        AppendResult replay;
        replay.turn_index = *done;
        replay.turn_tokens = static_cast<int64_t>(turn.tokens.size());
        replay.total_tokens = turn.first_position + replay.turn_tokens;
        return replay;
      }
    }
    if (request.cancelled && request.cancelled()) return CancelledWhileWaiting();
    KVMEM_RETURN_IF_ERROR(CheckExpectedTurns(*entry, request.expected_turns));
    KVMEM_RETURN_IF_ERROR(Load(*entry));
    if (options_.max_session_tokens > 0 &&
        entry->session->position() >= options_.max_session_tokens) {
      return absl::ResourceExhaustedError(
          absl::StrCat("session holds ", entry->session->position(), " tokens, the limit is ",
                       options_.max_session_tokens, ": fork or start a new session"));
    }
    entry->sink->request_id = request.request_id.empty() ? "" : kAppendTag + request.request_id;
    auto result = entry->session->AppendTurn(request.role, request.content);
    entry->sink->request_id.clear();
    AfterCall(*entry);
    if (!result.ok()) return result.status();
    if (!request.request_id.empty()) {
      entry->appended[request.request_id] = *result;
      Remember(*entry, request.request_id);
    }
    lock.unlock();
    EnforceHotBudget(entry.get());
    return result;
  }

  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                          const TextCallback& on_text) override {
    KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, Find(request.tenant, request.session_id));
    std::unique_lock<FifoMutex> lock(entry->mu);
    KVMEM_RETURN_IF_ERROR(CheckServable(*entry));
    if (!request.request_id.empty()) {
      auto it = entry->generated.find(request.request_id);
      if (it != entry->generated.end()) {
        if (on_text && !it->second.generation.text.empty()) on_text(it->second.generation.text);
        return it->second;
      }
      KVMEM_RETURN_IF_ERROR(CheckRequestKind(*entry, request.request_id, kGenerateTag));
      KVMEM_ASSIGN_OR_RETURN(
          auto done, cold_->FindRequest(entry->record.uid, kGenerateTag + request.request_id));
      if (done) {
        KVMEM_ASSIGN_OR_RETURN(TurnRecord turn, cold_->ReadTurn(entry->record.uid, *done));
        GenerateResult replay;
        replay.turn_index = *done;
        replay.generation.text = turn.text;
        replay.generation.tokens = turn.tokens;
        if (on_text && !turn.text.empty()) on_text(turn.text);
        return replay;
      }
    }
    if (request.options.cancelled && request.options.cancelled()) return CancelledWhileWaiting();
    KVMEM_RETURN_IF_ERROR(CheckExpectedTurns(*entry, request.expected_turns));
    KVMEM_RETURN_IF_ERROR(Load(*entry));
    if (options_.max_session_tokens > 0 &&
        entry->session->position() + request.options.sampling.max_tokens >
            options_.max_session_tokens) {
      return absl::ResourceExhaustedError(
          absl::StrCat("session holds ", entry->session->position(), " tokens; ",
                       request.options.sampling.max_tokens, " more would pass the limit of ",
                       options_.max_session_tokens, ": fork a new session or lower max_tokens"));
    }
    entry->sink->request_id = request.request_id.empty() ? "" : kGenerateTag + request.request_id;
    auto result = entry->session->Generate(request.options, on_text);
    entry->sink->request_id.clear();
    AfterCall(*entry);
    if (!result.ok()) return result.status();
    if (!request.request_id.empty() && result->generation.finish != FinishReason::kCancelled) {
      entry->generated[request.request_id] = *result;
      Remember(*entry, request.request_id);
    }
    lock.unlock();
    EnforceHotBudget(entry.get());
    return result;
  }

  absl::StatusOr<SessionInfo> GetSession(const std::string& tenant,
                                         const std::string& session_id) override {
    KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, Find(tenant, session_id));
    std::unique_lock<FifoMutex> lock(entry->mu);
    if (entry->deleted) return NotFound(session_id);
    if (!entry->foreign) {
      KVMEM_RETURN_IF_ERROR(Load(*entry));
      AfterCall(*entry);
    }
    SessionInfo info = Describe(*entry);
    lock.unlock();
    EnforceHotBudget(entry.get());
    return info;
  }

  absl::StatusOr<ListSessionsResult> ListSessions(const ListSessionsRequest& request) override {
    const int page_size = request.page_size <= 0 ? 100 : std::min(request.page_size, 1000);
    std::vector<std::shared_ptr<Entry>> candidates;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = sessions_.upper_bound(Key(request.tenant, request.page_token));
           it != sessions_.end(); ++it) {
        if (it->second->record.tenant != request.tenant) break;
        candidates.push_back(it->second);
      }
    }
    ListSessionsResult result;
    for (const auto& entry : candidates) {
      // A session busy with a call (a long generation to a slow reader) is described from
      // its last commit rather than waited for, so listing never stalls behind it.
      std::unique_lock<FifoMutex> lock(entry->mu, std::try_to_lock);
      SessionRecord busy_record;
      if (lock.owns_lock()) {
        if (entry->deleted) continue;
      } else {
        std::lock_guard<std::mutex> record_lock(entry->record_mu);
        busy_record = entry->record;
      }
      const SessionRecord& record = lock.owns_lock() ? entry->record : busy_record;
      bool match = true;
      for (const auto& [k, v] : request.label_filter) {
        auto l = record.labels.find(k);
        if (l == record.labels.end() || l->second != v) match = false;
      }
      if (!match) continue;
      if (static_cast<int>(result.sessions.size()) == page_size) {
        result.next_page_token = result.sessions.back().session_id;
        break;
      }
      result.sessions.push_back(lock.owns_lock() ? Describe(*entry)
                                                 : DescribeRecord(record, nullptr, true));
    }
    return result;
  }

  absl::StatusOr<SessionInfo> ForkSession(const std::string& tenant, const std::string& session_id,
                                          const std::string& new_session_id) override {
    const std::string id = new_session_id.empty() ? NewSessionId() : new_session_id;
    KVMEM_RETURN_IF_ERROR(ValidateSessionId(id));
    KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Entry> parent, Find(tenant, session_id));
    SessionRecord child;
    {
      std::lock_guard<FifoMutex> lock(parent->mu);
      KVMEM_RETURN_IF_ERROR(CheckServable(*parent));
      {
        std::lock_guard<std::mutex> map_lock(mu_);
        if (sessions_.count(Key(tenant, id)) > 0) {
          return absl::AlreadyExistsError(absl::StrCat("session \"", id, "\" already exists"));
        }
      }
      child.tenant = tenant;
      child.session_id = id;
      child.fingerprint = parent->record.fingerprint;
      child.labels = parent->record.labels;
      child.options = parent->record.options;
      child.created_unix_ms = child.updated_unix_ms = NowUnixMs();
      KVMEM_RETURN_IF_ERROR(cold_->ForkSession(parent->record, &child, model_.config().num_layers,
                                               model_.config().num_kv_heads));
    }
    auto entry = NewEntry(std::move(child));
    {
      std::lock_guard<std::mutex> lock(mu_);
      sessions_[Key(tenant, id)] = entry;
    }
    std::lock_guard<FifoMutex> lock(entry->mu);
    return Describe(*entry);
  }

  absl::Status DeleteSession(const std::string& tenant, const std::string& session_id) override {
    KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, Find(tenant, session_id));
    std::lock_guard<FifoMutex> lock(entry->mu);  // waits for a call in flight
    if (entry->deleted) return NotFound(session_id);
    std::vector<uint64_t> freed;
    KVMEM_RETURN_IF_ERROR(cold_->DeleteSession(entry->record, &freed));
    for (uint64_t owner : freed) warm_.EraseOwner(owner);
    entry->deleted = true;
    entry->session.reset();
    std::lock_guard<std::mutex> map_lock(mu_);
    sessions_.erase(Key(tenant, session_id));
    return absl::OkStatus();
  }

 private:
  // Sessions are namespaced by tenant; '\x1f' cannot occur in ids.
  static std::string Key(const std::string& tenant, const std::string& id) {
    return tenant + '\x1f' + id;
  }
  static absl::Status NotFound(const std::string& id) {
    return absl::NotFoundError(absl::StrCat("no session \"", id, "\""));
  }
  static absl::Status CancelledWhileWaiting() {
    return absl::CancelledError(
        "the call was cancelled while it waited for the session; nothing was applied");
  }

  std::shared_ptr<Entry> NewEntry(SessionRecord record) {
    auto entry = std::make_shared<Entry>();
    entry->foreign = record.fingerprint != model_.fingerprint();
    entry->record = std::move(record);
    entry->sink =
        std::make_shared<EntryCommitSink>(entry.get(), cold_.get(), &warm_, model_.config());
    return entry;
  }

  absl::StatusOr<std::shared_ptr<Entry>> Find(const std::string& tenant, const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sessions_.find(Key(tenant, id));
    if (it == sessions_.end()) return NotFound(id);
    return it->second;
  }

  absl::Status CheckServable(const Entry& e) const {
    if (e.deleted) return NotFound(e.record.session_id);
    if (e.foreign) {
      return absl::FailedPreconditionError(absl::StrCat(
          "session \"", e.record.session_id, "\" was written by model ", e.record.fingerprint,
          " but this server runs model ", model_.fingerprint(),
          "; its KV cache cannot be used with other weights: serve it with the model it was "
          "written with, or delete it"));
    }
    return absl::OkStatus();
  }

  // Request ids are stored tagged with the call that used them, so an id reused for the other
  // kind of call is an error rather than a wrong replay.
  static constexpr char kAppendTag[] = "append:";
  static constexpr char kGenerateTag[] = "generate:";
  absl::Status CheckRequestKind(const Entry& e, const std::string& id, const char* tag) {
    const bool append = std::string_view(tag) == kAppendTag;
    const char* other = append ? kGenerateTag : kAppendTag;
    bool used = append ? e.generated.count(id) > 0 : e.appended.count(id) > 0;
    if (!used) {
      KVMEM_ASSIGN_OR_RETURN(auto found, cold_->FindRequest(e.record.uid, other + id));
      used = found.has_value();
    }
    if (!used) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        "request id \"", id, "\" was already used by ", append ? "a Generate" : "an AppendTurn",
        " call on this session; use a fresh request id for each call"));
  }

  static absl::Status CheckExpectedTurns(const Entry& e, const std::optional<int64_t>& expected) {
    if (!expected) return absl::OkStatus();
    if (e.record.turns != *expected) {
      return absl::FailedPreconditionError(absl::StrCat(
          "session \"", e.record.session_id, "\" has ", e.record.turns,
          " turns, the request expected ", *expected, "; re-read the session and retry"));
    }
    return absl::OkStatus();
  }

  // Pages the session in (restoring it from its last commit) unless it is resident. A session
  // whose last commit failed is dropped and restored. Call with entry.mu held.
  absl::Status Load(Entry& e) {
    if (e.session != nullptr && !e.session->broken()) return absl::OkStatus();
    if (e.session != nullptr) {
      // A failed commit: the durable record, not the in-memory one, is the truth.
      KVMEM_ASSIGN_OR_RETURN(SessionRecord stored,
                             cold_->ReadSession(e.record.tenant, e.record.session_id));
      std::lock_guard<std::mutex> lock(e.record_mu);
      e.record = std::move(stored);
    }
    e.session.reset();
    const ModelConfig& c = model_.config();
    SessionStorage storage;
    storage.uid = e.record.uid;
    storage.source = std::make_shared<TieredBlockSource>(cold_.get(), &warm_, e.record.options, c,
                                                         options_.after_cold_block_read);
    storage.sink = e.sink;
    KVMEM_ASSIGN_OR_RETURN(SessionSnapshot snapshot,
                           cold_->LoadSnapshot(e.record, c.num_layers, c.num_kv_heads));
    auto session = Session::Restore(model_, backend_, e.record.options, std::move(storage),
                                    std::move(snapshot));
    if (!session.ok()) {
      return absl::Status(session.status().code(),
                          absl::StrCat("session \"", e.record.session_id,
                                       "\" cannot be loaded: ", session.status().message()));
    }
    e.session = std::move(*session);
    return absl::OkStatus();
  }

  // Bookkeeping after a call on a resident session (entry.mu held).
  void AfterCall(Entry& e) {
    std::lock_guard<std::mutex> lock(lru_mu_);
    e.last_used = ++clock_;
    e.hot_bytes = e.session != nullptr ? e.session->Stats().hot_bytes : 0;
  }

  // Pages out least recently used idle sessions while all hot sets together exceed hot_bytes.
  void EnforceHotBudget(const Entry* current) {
    if (options_.hot_bytes <= 0) return;
    std::vector<std::shared_ptr<Entry>> resident;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [key, e] : sessions_) resident.push_back(e);
    }
    int64_t total = 0;
    {
      std::lock_guard<std::mutex> lock(lru_mu_);
      for (const auto& e : resident) total += e->hot_bytes;
      std::sort(resident.begin(), resident.end(),
                [](const auto& a, const auto& b) { return a->last_used < b->last_used; });
    }
    for (const auto& e : resident) {
      if (total <= options_.hot_bytes) break;
      if (e.get() == current || e->hot_bytes == 0) continue;
      std::unique_lock<FifoMutex> lock(e->mu, std::try_to_lock);
      if (!lock.owns_lock() || e->session == nullptr) continue;  // busy: not idle
      e->session.reset();
      std::lock_guard<std::mutex> lru_lock(lru_mu_);
      total -= e->hot_bytes;
      e->hot_bytes = 0;
      ++page_outs_;
    }
  }

  // Call with e.mu held.
  SessionInfo Describe(const Entry& e) const {
    return DescribeRecord(e.record, e.session.get(), e.session != nullptr);
  }

  // `session` (may be null) supplies live statistics; otherwise they come from `record`.
  SessionInfo DescribeRecord(const SessionRecord& record, const Session* session,
                             bool resident) const {
    const ModelConfig& c = model_.config();
    SessionInfo info;
    info.session_id = record.session_id;
    info.labels = record.labels;
    info.options = record.options;
    info.created_unix_ms = record.created_unix_ms;
    info.updated_unix_ms = record.updated_unix_ms;
    info.model_fingerprint = record.fingerprint;
    info.resident = resident;
    if (session != nullptr) {
      info.stats = session->Stats();
    } else {
      info.stats.total_tokens = record.position;
      info.stats.turns = record.turns;
    }
    const int B = record.options.block_size;
    const int64_t blocks = (record.position + B - 1) / B;
    const int64_t block_bytes = BlockBytes(record.options, c, backend_.KvDType());
    info.cold_blocks = blocks * c.num_layers;
    info.cold_bytes = info.cold_blocks * block_bytes;
    if (!record.owners.empty()) {
      for (int l = 0; l < c.num_layers; ++l) {
        for (int64_t b = 0; b < blocks; ++b) {
          if (warm_.Contains({OwnerOf(record.owners, b), l, b})) ++info.warm_blocks;
        }
      }
    }
    info.warm_bytes = info.warm_blocks * block_bytes;
    return info;
  }

  const Model& model_;
  Backend& backend_;
  SessionManagerOptions options_;
  std::unique_ptr<ColdStore> cold_;
  WarmStore warm_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Entry>> sessions_;  // Key(tenant, id) -> entry
  std::mutex lru_mu_;
  uint64_t clock_ = 0;
  int64_t page_outs_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<SessionManager>> SessionManager::Open(
    const Model& model, Backend& backend, const SessionManagerOptions& options) {
  KVMEM_RETURN_IF_ERROR(ValidateMemoryOptions(options.session_defaults.memory));
  ColdStoreOptions cold;
  cold.path = options.data_dir;
  cold.sync = options.sync && !options.data_dir.empty();
  cold.block_files = options.cold_block_files;
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<ColdStore> store, ColdStore::Open(cold));
  auto manager = std::make_unique<DurableSessionManager>(model, backend, options, std::move(store));
  KVMEM_RETURN_IF_ERROR(manager->LoadIndex());
  return std::unique_ptr<SessionManager>(std::move(manager));
}

}  // namespace kvmem
