#include "service/agent_memory_service.h"

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "service/grpc_status.h"
#include "service/session_proto.h"

namespace kvmem {
namespace {

using Clock = std::chrono::steady_clock;

double MillisBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

const grpc::Status& CancelledStatus() {
  static const grpc::Status* status = new grpc::Status(
      grpc::StatusCode::CANCELLED,
      "the call was cancelled (by the client or its deadline) before it finished; nothing was "
      "kept");
  return *status;
}

// One Generate call. Lifetime: owned by `self_` until gRPC's OnDone, and by the worker task
// while it runs, so neither side can see it freed.
//
// The worker produces (Emit, Complete); gRPC reactions consume (OnWriteDone, OnCancel).
// At most one write is in flight; deltas that arrive meanwhile are appended to
// `pending_text_` and go out as one message. Finish is called once, after the worker completed
// and every queued message was written (or the call was cancelled).
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  static std::shared_ptr<GenerateReactor> Create() {
    auto reactor = std::shared_ptr<GenerateReactor>(new GenerateReactor());
    reactor->self_ = reactor;
    return reactor;
  }

  // Worker: runs the generation and finishes the call.
  void Run(SessionManager& sessions, const v1::GenerateRequest& proto, const Caller& caller,
           Clock::time_point arrived) {
    const Clock::time_point started = Clock::now();
    if (IsCancelled()) return Complete(CancelledStatus(), std::nullopt);
    absl::StatusOr<GenerateRequest> request = GenerateFromProto(proto, caller);
    if (!request.ok()) return Complete(ToGrpcStatus(request.status()), std::nullopt);
    request->options.cancelled = [this] { return IsCancelled(); };
    absl::StatusOr<GenerateResult> result =
        sessions.Generate(*request, [this](std::string_view delta) { return Emit(delta); });
    if (!result.ok()) return Complete(ToGrpcStatus(result.status()), std::nullopt);
    if (result->generation.finish == FinishReason::kCancelled) {
      return Complete(CancelledStatus(), std::nullopt);
    }
    v1::GenerateResponse last;
    GenerateResultToProto(*result, last.mutable_usage());
    v1::Timings* timings = last.mutable_usage()->mutable_timings();
    timings->set_queue_ms(MillisBetween(arrived, started));
    timings->set_total_ms(MillisBetween(arrived, Clock::now()));
    Complete(grpc::Status::OK, std::move(last));
  }

  // The worker is done: `last` (if any) is written, then the call finishes with `status`.
  void Complete(grpc::Status status, std::optional<v1::GenerateResponse> last) {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = std::move(status);
    last_ = std::move(last);
    worker_done_ = true;
    WriteNextLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) cancelled_ = true;  // the stream is gone: stop decoding
    WriteNextLocked();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
  }

  void OnDone() override { self_.reset(); }

 private:
  GenerateReactor() = default;

  bool IsCancelled() {
    std::lock_guard<std::mutex> lock(mu_);
    return cancelled_;
  }

  // Worker, from the decode loop: queues a delta. False once the call is cancelled, which
  // makes the SessionManager stop decoding and keep nothing.
  bool Emit(std::string_view delta) {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_) return false;
    pending_text_.append(delta);
    WriteNextLocked();
    return true;
  }

  // Starts the next write, or finishes the call once nothing is left to write.
  void WriteNextLocked() {
    if (writing_ || finished_) return;
    if (!cancelled_) {
      if (!pending_text_.empty()) {
        in_flight_.Clear();
        in_flight_.set_text(std::move(pending_text_));
        pending_text_.clear();
        writing_ = true;
        StartWrite(&in_flight_);
        return;
      }
      if (last_.has_value()) {
        in_flight_ = std::move(*last_);
        last_.reset();
        writing_ = true;
        StartWrite(&in_flight_);
        return;
      }
    }
    if (!worker_done_) return;
    finished_ = true;
    Finish(cancelled_ && status_.ok() ? CancelledStatus() : status_);
  }

  std::shared_ptr<GenerateReactor> self_;  // released in OnDone

  std::mutex mu_;
  std::string pending_text_;                  // deltas not yet written
  std::optional<v1::GenerateResponse> last_;  // the usage message, once the worker is done
  v1::GenerateResponse in_flight_;            // the message being written
  grpc::Status status_;
  bool worker_done_ = false;
  bool writing_ = false;
  bool cancelled_ = false;
  bool finished_ = false;
};

}  // namespace

AgentMemoryService::AgentMemoryService(SessionManager& sessions, WorkerPool& workers,
                                       const ModelConfig& config, const TokenTable* tokens)
    : sessions_(sessions), workers_(workers), config_(config), tokens_(tokens) {}

absl::StatusOr<Caller> AgentMemoryService::Authenticate(grpc::CallbackServerContext* context,
                                                        bool mutates) const {
  if (tokens_ == nullptr) return Caller{};
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  std::string_view value;
  if (it != metadata.end()) value = std::string_view(it->second.data(), it->second.size());
  KVMEM_ASSIGN_OR_RETURN(Caller caller,
                         tokens_->Authenticate(it == metadata.end() ? nullptr : &value));
  if (mutates && caller.read_only) {
    return absl::PermissionDeniedError(absl::StrCat(
        "this token of tenant \"", caller.tenant,
        "\" is read-only: it may read sessions and generate with discard, not change them"));
  }
  return caller;
}

grpc::ServerUnaryReactor* AgentMemoryService::RunUnary(grpc::CallbackServerContext* context,
                                                       bool mutates, UnaryWork work) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const Clock::time_point arrived = Clock::now();
  absl::StatusOr<Caller> caller = Authenticate(context, mutates);
  if (!caller.ok()) {
    reactor->Finish(ToGrpcStatus(caller.status()));
    return reactor;
  }
  absl::Status submitted = workers_.Submit(
      [context, reactor, caller = *std::move(caller), work = std::move(work), arrived] {
        if (context->IsCancelled()) return reactor->Finish(CancelledStatus());
        reactor->Finish(ToGrpcStatus(work(caller, {arrived, Clock::now()})));
      });
  if (!submitted.ok()) reactor->Finish(ToGrpcStatus(submitted));
  return reactor;
}

grpc::ServerUnaryReactor* AgentMemoryService::CreateSession(grpc::CallbackServerContext* context,
                                                            const v1::CreateSessionRequest* request,
                                                            v1::Session* response) {
  return RunUnary(
      context, /*mutates=*/true, [this, request, response](const Caller& caller, const CallTimes&) {
        KVMEM_ASSIGN_OR_RETURN(CreateSessionRequest r, CreateSessionFromProto(*request, caller));
        KVMEM_ASSIGN_OR_RETURN(SessionInfo info, sessions_.CreateSession(r));
        SessionToProto(info, config_, response);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* AgentMemoryService::AppendTurn(grpc::CallbackServerContext* context,
                                                         const v1::AppendTurnRequest* request,
                                                         v1::AppendTurnResponse* response) {
  return RunUnary(context, /*mutates=*/true,
                  [this, context, request, response](const Caller& caller,
                                                     const CallTimes& times) {
                    KVMEM_ASSIGN_OR_RETURN(AppendTurnRequest r,
                                           AppendTurnFromProto(*request, caller));
                    r.cancelled = [context] { return context->IsCancelled(); };
                    KVMEM_ASSIGN_OR_RETURN(AppendResult result, sessions_.AppendTurn(r));
                    AppendResultToProto(result, response);
                    v1::Timings* timings = response->mutable_timings();
                    timings->set_queue_ms(MillisBetween(times.arrived, times.started));
                    timings->set_total_ms(MillisBetween(times.arrived, Clock::now()));
                    return absl::OkStatus();
                  });
}

grpc::ServerWriteReactor<v1::GenerateResponse>* AgentMemoryService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  const Clock::time_point arrived = Clock::now();
  std::shared_ptr<GenerateReactor> reactor = GenerateReactor::Create();
  absl::StatusOr<Caller> caller = Authenticate(context, /*mutates=*/!request->discard());
  if (!caller.ok()) {
    reactor->Complete(ToGrpcStatus(caller.status()), std::nullopt);
    return reactor.get();
  }
  absl::Status submitted =
      workers_.Submit([this, reactor, request, caller = *std::move(caller), arrived] {
        reactor->Run(sessions_, *request, caller, arrived);
      });
  if (!submitted.ok()) reactor->Complete(ToGrpcStatus(submitted), std::nullopt);
  return reactor.get();
}

grpc::ServerUnaryReactor* AgentMemoryService::GetSession(grpc::CallbackServerContext* context,
                                                         const v1::GetSessionRequest* request,
                                                         v1::Session* response) {
  return RunUnary(context, /*mutates=*/false,
                  [this, request, response](const Caller& caller, const CallTimes&) {
                    KVMEM_RETURN_IF_ERROR(RequireSessionId(request->session_id()));
                    KVMEM_ASSIGN_OR_RETURN(
                        SessionInfo info,
                        sessions_.GetSession(caller.tenant, request->session_id()));
                    SessionToProto(info, config_, response);
                    return absl::OkStatus();
                  });
}

grpc::ServerUnaryReactor* AgentMemoryService::ListSessions(grpc::CallbackServerContext* context,
                                                           const v1::ListSessionsRequest* request,
                                                           v1::ListSessionsResponse* response) {
  return RunUnary(context, /*mutates=*/false,
                  [this, request, response](const Caller& caller, const CallTimes&) {
                    KVMEM_ASSIGN_OR_RETURN(ListSessionsRequest r,
                                           ListSessionsFromProto(*request, caller));
                    KVMEM_ASSIGN_OR_RETURN(ListSessionsResult result, sessions_.ListSessions(r));
                    for (const SessionInfo& info : result.sessions) {
                      SessionToProto(info, config_, response->add_sessions());
                    }
                    response->set_next_page_token(result.next_page_token);
                    return absl::OkStatus();
                  });
}

grpc::ServerUnaryReactor* AgentMemoryService::ForkSession(grpc::CallbackServerContext* context,
                                                          const v1::ForkSessionRequest* request,
                                                          v1::Session* response) {
  return RunUnary(
      context, /*mutates=*/true, [this, request, response](const Caller& caller, const CallTimes&) {
        KVMEM_RETURN_IF_ERROR(RequireSessionId(request->session_id()));
        KVMEM_ASSIGN_OR_RETURN(
            SessionInfo info,
            sessions_.ForkSession(caller.tenant, request->session_id(), request->new_session_id()));
        SessionToProto(info, config_, response);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* AgentMemoryService::DeleteSession(grpc::CallbackServerContext* context,
                                                            const v1::DeleteSessionRequest* request,
                                                            v1::DeleteSessionResponse* response) {
  return RunUnary(context, /*mutates=*/true,
                  [this, request](const Caller& caller, const CallTimes&) {
                    KVMEM_RETURN_IF_ERROR(RequireSessionId(request->session_id()));
                    return sessions_.DeleteSession(caller.tenant, request->session_id());
                  });
}

}  // namespace kvmem
