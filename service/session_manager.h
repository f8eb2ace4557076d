// Every session the service holds: creation, ordered calls per session, listing, forks,
// deletion, per-tenant isolation and idempotent retries. The gRPC layer (service/) is a thin
// translation of these calls; the simulator and tests use them directly.
//
// Ordering: calls on one session run one at a time in arrival order (a call on a busy
// session waits its turn); calls on different sessions run concurrently.
//
// Durability: every session lives in a RocksDB store (data_dir; in memory when empty). A call
// that changes a session returns only after its commit; on open, sessions are listed from the
// store and loaded on their first call. A session written under another model fingerprint is
// listed but never served (FAILED_PRECONDITION).
#ifndef KVMEM_SERVICE_SESSION_MANAGER_H_
#define KVMEM_SERVICE_SESSION_MANAGER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "engine/session.h"

namespace kvmem {

struct SessionManagerOptions {
  // Default: "" (in memory only: nothing survives a restart). Directory of the RocksDB store.
  std::string data_dir;
  // Default: raw template, snapkv with budget 1024, window 32, kernel 7, max pooling, block 16.
  // The server's defaults; each session may override the memory policy and template.
  SessionOptions session_defaults;
  // Default: 1 MiB. Longest turn content accepted, in bytes (INVALID_ARGUMENT beyond).
  int64_t max_content_bytes = 1 << 20;
  // Default: 0 (unlimited). Absolute positions a session may reach (RESOURCE_EXHAUSTED beyond).
  int64_t max_session_tokens = 0;
  // Default: 4 GiB. Host RAM for the warm tier's KV blocks (LRU beyond it; cold keeps all).
  int64_t warm_bytes = int64_t{4} << 30;
  // Default: 0 (unlimited). Bytes of all resident sessions' hot sets together, counted where
  // attention reads them (Backend::HotEntryBytes: device memory on the GPU); beyond it the
  // least recently used idle sessions are paged out whole and paged back in on their next call.
  int64_t hot_bytes = 0;
  // Default: true. fsync every commit before the call returns.
  bool sync = true;
  // Default: true. Write full KV blocks to append-only block files beside RocksDB
  // (ColdStoreOptions::block_files); false keeps them inside RocksDB.
  bool cold_block_files = true;
  // Default: none. Test hook: called on the reading thread when a block read misses the warm
  // tier and has read `key` from cold, before the block is offered to the warm tier, so a test
  // can run other calls (commits, evictions) exactly inside that window. With a backend that
  // keeps the hot rows (the GPU), reads made for its uploads run on the shared thread pool while
  // the backend holds its device lock, and a restore's, a page-in's and recall's reads run on the
  // shared pool too: a hook that calls back into the manager must not run there.
  std::function<void(const BlockKey& key)> after_cold_block_read;
};

// Per-session overrides of the server defaults; unset fields keep the default.
struct SessionOverrides {
  std::optional<std::string> policy;
  std::optional<int> budget;
  std::optional<int> window;
  std::optional<int> kernel;
  std::optional<Pooling> pooling;
  std::optional<int> recall_blocks;
  std::optional<std::string> chat_template;
};

struct CreateSessionRequest {
  std::string tenant;      // "" when the server runs without authentication
  std::string session_id;  // generated when empty
  std::map<std::string, std::string> labels;
  SessionOverrides overrides;
};

struct SessionInfo {
  std::string session_id;
  std::map<std::string, std::string> labels;
  SessionOptions options;  // effective options
  int64_t created_unix_ms = 0;
  int64_t updated_unix_ms = 0;
  SessionStats stats;
  int64_t warm_blocks = 0;
  int64_t warm_bytes = 0;
  int64_t cold_blocks = 0;
  int64_t cold_bytes = 0;
  bool resident = false;          // hot set loaded in memory now
  std::string model_fingerprint;  // of the model that wrote the session
};

struct AppendTurnRequest {
  std::string tenant;
  std::string session_id;
  Role role = Role::kUser;
  std::string content;
  // When set, the call applies only if the session has exactly this many turns
  // (FAILED_PRECONDITION otherwise).
  std::optional<int64_t> expected_turns;
  // When non-empty, a retry with the same id is applied once and answered the same.
  std::string request_id;
  // Default: none. Checked once the call's turn on the session has come: true (the client
  // went away or its deadline passed while it waited) returns CANCELLED, nothing applied.
  std::function<bool()> cancelled;
};

struct GenerateRequest {
  std::string tenant;
  std::string session_id;
  GenerateOptions options;
  std::optional<int64_t> expected_turns;
  std::string request_id;
};

struct ListSessionsRequest {
  std::string tenant;
  // Default: 100. At most this many sessions per page (capped at 1000).
  int page_size = 100;
  std::string page_token;                           // from the previous page; "" for the first
  std::map<std::string, std::string> label_filter;  // every pair must match
};

struct ListSessionsResult {
  std::vector<SessionInfo> sessions;  // ordered by session id
  std::string next_page_token;        // "" on the last page
};

class SessionManager {
 public:
  // `model` and `backend` must outlive the manager.
  static absl::StatusOr<std::unique_ptr<SessionManager>> Open(const Model& model, Backend& backend,
                                                              const SessionManagerOptions& options);
  virtual ~SessionManager() = default;

  // ALREADY_EXISTS for a taken id; INVALID_ARGUMENT for a malformed id or bad overrides.
  // Ids: 1-128 characters of [A-Za-z0-9._-].
  virtual absl::StatusOr<SessionInfo> CreateSession(const CreateSessionRequest& request) = 0;
  // NOT_FOUND, INVALID_ARGUMENT (empty or oversized content), FAILED_PRECONDITION
  // (expected_turns mismatch), RESOURCE_EXHAUSTED (turn or session too long).
  virtual absl::StatusOr<AppendResult> AppendTurn(const AppendTurnRequest& request) = 0;
  // Streams text through on_text (returning false cancels: nothing is kept).
  virtual absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                                  const TextCallback& on_text) = 0;
  virtual absl::StatusOr<SessionInfo> GetSession(const std::string& tenant,
                                                 const std::string& session_id) = 0;
  virtual absl::StatusOr<ListSessionsResult> ListSessions(const ListSessionsRequest& request) = 0;
  // The fork starts with the parent's turns, hot set and blocks, then diverges.
  virtual absl::StatusOr<SessionInfo> ForkSession(const std::string& tenant,
                                                  const std::string& session_id,
                                                  const std::string& new_session_id) = 0;
  virtual absl::Status DeleteSession(const std::string& tenant, const std::string& session_id) = 0;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_SESSION_MANAGER_H_
