// kvmem.v1.AgentMemory over gRPC's callback API: a thin translation of SessionManager calls.
//
// Each handler authenticates on the gRPC thread (a map lookup), then hands the call to the
// WorkerPool; the worker translates the request, calls the SessionManager (which orders calls
// per session: a call on a busy session waits its turn) and finishes the RPC. No engine work
// runs inside a reactor callback.
//
// Generate is a ServerWriteReactor fed by its worker: text deltas are coalesced while a write
// is in flight, so a slow reader never stalls decoding. Client cancellation or an expired
// deadline makes the next delta's callback return false, which stops decoding and keeps
// nothing of the generation.
#ifndef KVMEM_SERVICE_AGENT_MEMORY_SERVICE_H_
#define KVMEM_SERVICE_AGENT_MEMORY_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>

#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "kvmem/v1/agent_memory.grpc.pb.h"
#include "service/auth_tokens.h"
#include "service/session_manager.h"
#include "service/worker_pool.h"

namespace kvmem {

class AgentMemoryService final : public v1::AgentMemory::CallbackService {
 public:
  // `sessions`, `workers`, `config` and `tokens` must outlive the service. `tokens` null means
  // authentication is off: every call acts for tenant "".
  AgentMemoryService(SessionManager& sessions, WorkerPool& workers, const ModelConfig& config,
                     const TokenTable* tokens);

  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* context,
                                          const v1::CreateSessionRequest* request,
                                          v1::Session* response) override;
  grpc::ServerUnaryReactor* AppendTurn(grpc::CallbackServerContext* context,
                                       const v1::AppendTurnRequest* request,
                                       v1::AppendTurnResponse* response) override;
  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context,
                                       const v1::GetSessionRequest* request,
                                       v1::Session* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* context,
                                         const v1::ListSessionsRequest* request,
                                         v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* context,
                                        const v1::ForkSessionRequest* request,
                                        v1::Session* response) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* context,
                                          const v1::DeleteSessionRequest* request,
                                          v1::DeleteSessionResponse* response) override;

 private:
  using Clock = std::chrono::steady_clock;
  // When a call arrived and when a worker took it up.
  struct CallTimes {
    Clock::time_point arrived;
    Clock::time_point started;
  };
  using UnaryWork = std::function<absl::Status(const Caller& caller, const CallTimes& times)>;

  // The caller of `context`. UNAUTHENTICATED without a known token; PERMISSION_DENIED when
  // `mutates` and the token is read-only.
  absl::StatusOr<Caller> Authenticate(grpc::CallbackServerContext* context, bool mutates) const;
  // Authenticates, then runs `work` on a worker unless the call was cancelled meanwhile, and
  // finishes the call with its status.
  grpc::ServerUnaryReactor* RunUnary(grpc::CallbackServerContext* context, bool mutates,
                                     UnaryWork work);

  SessionManager& sessions_;
  WorkerPool& workers_;
  const ModelConfig& config_;
  const TokenTable* tokens_;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_AGENT_MEMORY_SERVICE_H_
