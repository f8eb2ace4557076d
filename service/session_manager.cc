#include "service/session_manager.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <mutex>
#include <random>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

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
      return absl::InvalidArgumentError(absl::StrCat(
          "session id \"", id, "\" has a character outside [A-Za-z0-9._-]"));
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

// Remembered answers of recent requests with an id, so retries are applied once.
constexpr size_t kRememberedRequests = 256;

struct Entry {
  std::mutex mu;  // held for the whole of every call on this session, so calls apply in order
  std::string tenant;
  std::string id;
  std::map<std::string, std::string> labels;
  int64_t created_unix_ms = 0;
  int64_t updated_unix_ms = 0;
  std::unique_ptr<Session> session;
  bool deleted = false;
  std::map<std::string, AppendResult> appended;     // request id -> answer
  std::map<std::string, GenerateResult> generated;  // request id -> answer
  std::deque<std::string> request_order;
};

void Remember(Entry& e, const std::string& request_id) {
  e.request_order.push_back(request_id);
  if (e.request_order.size() > kRememberedRequests) {
    e.appended.erase(e.request_order.front());
    e.generated.erase(e.request_order.front());
    e.request_order.pop_front();
  }
}

SessionInfo Describe(const Entry& e) {
  SessionInfo info;
  info.session_id = e.id;
  info.labels = e.labels;
  info.options = e.session->options();
  info.created_unix_ms = e.created_unix_ms;
  info.updated_unix_ms = e.updated_unix_ms;
  info.stats = e.session->Stats();
  info.warm_blocks = info.stats.blocks;  // in memory: every block is warm
  info.warm_bytes = info.stats.block_bytes;
  return info;
}

class InMemorySessionManager : public SessionManager {
 public:
  InMemorySessionManager(const Model& model, Backend& backend, const SessionManagerOptions& options)
      : model_(model), backend_(backend), options_(options) {}

  absl::StatusOr<SessionInfo> CreateSession(const CreateSessionRequest& request) override {
    const std::string id = request.session_id.empty() ? NewSessionId() : request.session_id;
    KVMEM_RETURN_IF_ERROR(ValidateSessionId(id));
    SessionOptions session_options = ApplyOverrides(options_.session_defaults, request.overrides);
    KVMEM_ASSIGN_OR_RETURN(auto session, Session::Create(model_, backend_, session_options));
    auto entry = std::make_shared<Entry>();
    entry->tenant = request.tenant;
    entry->id = id;
    entry->labels = request.labels;
    entry->created_unix_ms = entry->updated_unix_ms = NowUnixMs();
    entry->session = std::move(session);
    std::lock_guard<std::mutex> lock(mu_);
    auto [it, inserted] = sessions_.emplace(Key(request.tenant, id), entry);
    if (!inserted) {
      return absl::AlreadyExistsError(absl::StrCat("session \"", id, "\" already exists"));
    }
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
    std::lock_guard<std::mutex> lock(entry->mu);
    if (entry->deleted) return NotFound(request.session_id);
    if (!request.request_id.empty()) {
      auto it = entry->appended.find(request.request_id);
      if (it != entry->appended.end()) return it->second;
    }
    KVMEM_RETURN_IF_ERROR(CheckExpectedTurns(*entry, request.expected_turns));
    KVMEM_ASSIGN_OR_RETURN(AppendResult result,
                           entry->session->AppendTurn(request.role, request.content));
    entry->updated_unix_ms = NowUnixMs();
    if (!request.request_id.empty()) {
      entry->appended[request.request_id] = result;
      Remember(*entry, request.request_id);
    }
    return result;
  }

  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                          const TextCallback& on_text) override {
    KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, Find(request.tenant, request.session_id));
    std::lock_guard<std::mutex> lock(entry->mu);
    if (entry->deleted) return NotFound(request.session_id);
    if (!request.request_id.empty()) {
      auto it = entry->generated.find(request.request_id);
      if (it != entry->generated.end()) {
        if (on_text && !it->second.generation.text.empty()) on_text(it->second.generation.text);
        return it->second;
      }
    }
    KVMEM_RETURN_IF_ERROR(CheckExpectedTurns(*entry, request.expected_turns));
    if (options_.max_session_tokens > 0 &&
        entry->session->position() + request.options.sampling.max_tokens >
            options_.max_session_tokens) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "session holds ", entry->session->position(), " tokens; ",
          request.options.sampling.max_tokens, " more would pass the limit of ",
          options_.max_session_tokens, ": fork a new session or lower max_tokens"));
    }
    KVMEM_ASSIGN_OR_RETURN(GenerateResult result,
                           entry->session->Generate(request.options, on_text));
    entry->updated_unix_ms = NowUnixMs();
    if (!request.request_id.empty() && result.generation.finish != FinishReason::kCancelled) {
      entry->generated[request.request_id] = result;
      Remember(*entry, request.request_id);
    }
    return result;
  }

  absl::StatusOr<SessionInfo> GetSession(const std::string& tenant,
                                         const std::string& session_id) override {
    KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, Find(tenant, session_id));
    std::lock_guard<std::mutex> lock(entry->mu);
    if (entry->deleted) return NotFound(session_id);
    return Describe(*entry);
  }

  absl::StatusOr<ListSessionsResult> ListSessions(const ListSessionsRequest& request) override {
    const int page_size = request.page_size <= 0 ? 100 : std::min(request.page_size, 1000);
    std::vector<std::shared_ptr<Entry>> matching;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = sessions_.lower_bound(Key(request.tenant, request.page_token));
           it != sessions_.end(); ++it) {
        const Entry& e = *it->second;
        if (e.tenant != request.tenant) break;
        if (!request.page_token.empty() && e.id <= request.page_token) continue;
        bool match = true;
        for (const auto& [k, v] : request.label_filter) {
          auto l = e.labels.find(k);
          if (l == e.labels.end() || l->second != v) match = false;
        }
        if (!match) continue;
        if (static_cast<int>(matching.size()) == page_size) {
          break;
        }
        matching.push_back(it->second);
      }
    }
    ListSessionsResult result;
    for (const auto& entry : matching) {
      std::lock_guard<std::mutex> lock(entry->mu);
      if (!entry->deleted) result.sessions.push_back(Describe(*entry));
    }
    if (static_cast<int>(matching.size()) == page_size) {
      result.next_page_token = matching.back()->id;
    }
    return result;
  }

  absl::StatusOr<SessionInfo> ForkSession(const std::string& tenant, const std::string& session_id,
                                          const std::string& new_session_id) override {
    const std::string id = new_session_id.empty() ? NewSessionId() : new_session_id;
    KVMEM_RETURN_IF_ERROR(ValidateSessionId(id));
    KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Entry> parent, Find(tenant, session_id));
    auto entry = std::make_shared<Entry>();
    {
      std::lock_guard<std::mutex> lock(parent->mu);
      if (parent->deleted) return NotFound(session_id);
      KVMEM_ASSIGN_OR_RETURN(entry->session, parent->session->Fork());
      entry->labels = parent->labels;
    }
    entry->tenant = tenant;
    entry->id = id;
    entry->created_unix_ms = entry->updated_unix_ms = NowUnixMs();
    std::lock_guard<std::mutex> lock(mu_);
    auto [it, inserted] = sessions_.emplace(Key(tenant, id), entry);
    if (!inserted) {
      return absl::AlreadyExistsError(absl::StrCat("session \"", id, "\" already exists"));
    }
    return Describe(*entry);
  }

  absl::Status DeleteSession(const std::string& tenant, const std::string& session_id) override {
    std::shared_ptr<Entry> entry;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = sessions_.find(Key(tenant, session_id));
      if (it == sessions_.end()) return NotFound(session_id);
      entry = it->second;
      sessions_.erase(it);
    }
    std::lock_guard<std::mutex> lock(entry->mu);  // waits for a call in flight
    entry->deleted = true;
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
  absl::StatusOr<std::shared_ptr<Entry>> Find(const std::string& tenant, const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sessions_.find(Key(tenant, id));
    if (it == sessions_.end()) return NotFound(id);
    return it->second;
  }
  static absl::Status CheckExpectedTurns(const Entry& e, const std::optional<int64_t>& expected) {
    if (!expected) return absl::OkStatus();
    const int64_t turns = static_cast<int64_t>(e.session->turns().size());
    if (turns != *expected) {
      return absl::FailedPreconditionError(absl::StrCat(
          "session \"", e.id, "\" has ", turns, " turns, the request expected ", *expected,
          "; re-read the session and retry"));
    }
    return absl::OkStatus();
  }

  const Model& model_;
  Backend& backend_;
  SessionManagerOptions options_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Entry>> sessions_;  // Key(tenant, id) -> entry
};

}  // namespace

absl::StatusOr<std::unique_ptr<SessionManager>> SessionManager::Open(
    const Model& model, Backend& backend, const SessionManagerOptions& options) {
  KVMEM_RETURN_IF_ERROR(ValidateMemoryOptions(options.session_defaults.memory));
  return std::unique_ptr<SessionManager>(new InMemorySessionManager(model, backend, options));
}

}  // namespace kvmem
