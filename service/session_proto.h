// Translation between kvmem.v1 messages and SessionManager's requests and answers.
//
// Checks that need no session (roles, enum values, sampling values, label sizes, a missing
// session id) happen here and fail with INVALID_ARGUMENT naming the field, before any session
// is touched. Everything else is the SessionManager's to decide.
#ifndef KVMEM_SERVICE_SESSION_PROTO_H_
#define KVMEM_SERVICE_SESSION_PROTO_H_

#include <string>

#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "kvmem/v1/agent_memory.pb.h"
#include "service/auth_tokens.h"
#include "service/session_manager.h"

namespace kvmem {

// INVALID_ARGUMENT naming the field, for an empty session id.
absl::Status RequireSessionId(const std::string& session_id);

absl::StatusOr<CreateSessionRequest> CreateSessionFromProto(const v1::CreateSessionRequest& proto,
                                                            const Caller& caller);
absl::StatusOr<AppendTurnRequest> AppendTurnFromProto(const v1::AppendTurnRequest& proto,
                                                      const Caller& caller);
// Unset sampling fields (0) take the engine's defaults: max_tokens 256, top_p 1.
absl::StatusOr<GenerateRequest> GenerateFromProto(const v1::GenerateRequest& proto,
                                                  const Caller& caller);
absl::StatusOr<ListSessionsRequest> ListSessionsFromProto(const v1::ListSessionsRequest& proto,
                                                          const Caller& caller);

// `config` gives the shape of hot_tokens_per_head (layers x KV heads).
void SessionToProto(const SessionInfo& info, const ModelConfig& config, v1::Session* proto);
void AppendResultToProto(const AppendResult& result, v1::AppendTurnResponse* proto);
void GenerateResultToProto(const GenerateResult& result, v1::GenerateUsage* proto);

}  // namespace kvmem

#endif  // KVMEM_SERVICE_SESSION_PROTO_H_
