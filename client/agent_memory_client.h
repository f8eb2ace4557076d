// A C++ client of kvmem.v1.AgentMemory: every RPC as a blocking call returning absl::Status or
// absl::StatusOr over the generated stub. Errors carry the server's gRPC code and message
// (UNAVAILABLE when no server answers). Thread-safe: calls may come from many threads at once.
#ifndef KVMEM_CLIENT_AGENT_MEMORY_CLIENT_H_
#define KVMEM_CLIENT_AGENT_MEMORY_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "kvmem/v1/agent_memory.grpc.pb.h"

namespace kvmem {

struct ClientOptions {
  // Default: "127.0.0.1:50051". Where kvmemd listens.
  std::string address = "127.0.0.1:50051";
  // Default: "" (none). Sent as "authorization: Bearer TOKEN" on every call.
  std::string token;
  // Default: 0 (no deadline). Deadline of every call, in milliseconds from its start.
  int64_t timeout_ms = 0;
};

// Called with each generated text delta; returning false cancels the generation.
using TextDeltaCallback = std::function<bool(std::string_view delta)>;

class AgentMemoryClient {
 public:
  // Opens an insecure channel to options.address; it connects on the first call.
  explicit AgentMemoryClient(const ClientOptions& options);
  // Shares `channel` (several clients, e.g. with different tokens or deadlines).
  AgentMemoryClient(std::shared_ptr<grpc::Channel> channel, const ClientOptions& options);

  absl::StatusOr<v1::Session> CreateSession(const v1::CreateSessionRequest& request);
  absl::StatusOr<v1::AppendTurnResponse> AppendTurn(const v1::AppendTurnRequest& request);
  absl::StatusOr<v1::AppendTurnResponse> AppendTurn(const std::string& session_id, v1::Role role,
                                                    const std::string& content);
  // Streams the deltas through `on_text` (may be null) and returns the final usage. When
  // on_text returns false the call is cancelled and the result is CANCELLED; the server keeps
  // nothing of it unless decoding had already ended.
  absl::StatusOr<v1::GenerateUsage> Generate(const v1::GenerateRequest& request,
                                             const TextDeltaCallback& on_text = nullptr);
  absl::StatusOr<v1::Session> GetSession(const std::string& session_id);
  absl::StatusOr<v1::ListSessionsResponse> ListSessions(const v1::ListSessionsRequest& request);
  // Every page of ListSessions, in session id order.
  absl::StatusOr<std::vector<v1::Session>> ListAllSessions(
      const std::map<std::string, std::string>& label_filter = {});
  absl::StatusOr<v1::Session> ForkSession(const std::string& session_id,
                                          const std::string& new_session_id = "");
  absl::Status DeleteSession(const std::string& session_id);

  // OK when the server reports SERVING through the standard health service; UNAVAILABLE
  // when it answers NOT_SERVING; the call's error otherwise.
  absl::Status CheckHealth();

  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  // Applies the token and deadline of options_ to a fresh call.
  void Prepare(grpc::ClientContext* context) const;

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AgentMemory::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// grpc::Status -> absl::Status: same code (the canonical codes are shared), same message.
absl::Status FromGrpcStatus(const grpc::Status& status);

// "system", "user", "assistant", "tool" -> v1::Role; INVALID_ARGUMENT otherwise.
absl::StatusOr<v1::Role> RoleFromName(std::string_view name);
// "max", "avg" -> v1::Pooling; INVALID_ARGUMENT otherwise.
absl::StatusOr<v1::Pooling> PoolingFromName(std::string_view name);
// The short lowercase names used above and by the CLI ("user", "max", "length").
std::string RoleName(v1::Role role);
std::string PoolingName(v1::Pooling pooling);
std::string FinishReasonName(v1::FinishReason reason);

}  // namespace kvmem

#endif  // KVMEM_CLIENT_AGENT_MEMORY_CLIENT_H_
